"""config.toml validation: good files load, bad files are refused naming the key and why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.config import RegexMatch, load_config
from dicom_node.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

VALID = """
[node]
ae_title = "NODE"
port = 11112
data_dir = "data"

[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242

[[models]]
name = "m"
path = "models/m"

[[routes]]
name = "chest"
match = { Modality = ["CR", "DX"], StudyDescription = { regex = "(?i)thorax" } }
models = ["m"]
send_to = ["pacs"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_valid_config_resolves_relative_paths_against_its_folder(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, VALID))
    assert config.node.data_dir == tmp_path / "data"
    assert config.models[0].path == tmp_path / "models" / "m"
    assert config.database.url == f"sqlite:///{tmp_path}/var/dicom-node.db"
    assert isinstance(config.routes[0].match["StudyDescription"], RegexMatch)


def test_shipped_config_is_valid() -> None:
    config = load_config(REPO / "config.toml")
    assert config.routes[0].models == ("chest-xray-cnn", "report-drafter")


@pytest.mark.parametrize("change, expected", [
    (("port = 11112", "port = 70000"), "node.port: Input should be less than or equal to 65535"),
    (("ae_title = \"NODE\"", "ae_title = \"A_VERY_LONG_AE_TITLE_X\""),
     "node.ae_title: an AE title has at most 16 characters"),
    (("send_to = [\"pacs\"]", "send_to = [\"pacs2\"]"),
     "routes[0].send_to: unknown destination 'pacs2'"),
    (("models = [\"m\"]", "models = [\"nope\"]"), "routes[0].models: unknown model 'nope'"),
    (("Modality = ", "Modalty = "), "'Modalty' is not a DICOM keyword"),
    (("regex = \"(?i)thorax\"", "regex = \"(unclosed\""), "invalid regular expression"),
    (("data_dir = \"data\"", "data_dir = \"data\"\nprot = 1"), "node.prot: unknown key"),
])
def test_invalid_config_names_the_key_and_why(tmp_path: Path, change: tuple[str, str],
                                              expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(_write(tmp_path, VALID.replace(*change)))
    assert expected in str(excinfo.value)


def test_check_config_command_exits_nonzero_with_the_message(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID.replace("port = 4242", "port = \"dicom\""))
    result = subprocess.run([sys.executable, "-m", "dicom_node", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "destinations[0].port" in result.stderr


def test_toml_syntax_error_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[node\nport = 1"))
