"""The chest radiograph model (chest-xray-cnn) as tests configure it, and the node wired to a
PACS.

``CHEST_MODEL`` and ``CHEST_ROUTE`` are the ``[[models]]`` and ``[[routes]]`` entries most
end-to-end tests give the node; :func:`pacs_with_node` starts Orthanc as the PACS,
auto-forwarding to a node that sends its results back; :func:`sr_series` and
:func:`wait_for_the_sr` read what came back. ``ROUTES`` and :func:`routed_config` are an
in-process receiver's config routing CT and CR to the model and sending to a DICOM peer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom import Dataset, dcmread

from dicom_node.config import Config, load_config
from tests.conftest import BASIC_CONFIG, free_port, write_config
from tests.support.peers import NodeProcess, OrthancServer, auto_forward_lua, wait_until

REPO = Path(__file__).resolve().parents[2]
CHEST_MODEL = {"name": "chest-xray-cnn", "path": str(REPO / "models" / "chest-xray-cnn")}
CHEST_ROUTE = {"name": "chest radiographs", "match": {"Modality": ["CR", "DX"]},
               "models": ["chest-xray-cnn"], "send_to": ["pacs"]}


def pacs_with_node(orthanc_factory: Callable[..., OrthancServer],
                   node_factory: Callable[..., NodeProcess], role: str = "serve", *,
                   models: list[dict[str, str]] | None = None,
                   routes: list[dict[str, object]] | None = None,
                   **node_kwargs: object) -> tuple[OrthancServer, NodeProcess]:
    """Orthanc as the PACS, auto-forwarding to a node that sends its results back to it."""
    node = node_factory(role, start=False, models=models or [CHEST_MODEL],
                        routes=routes or [CHEST_ROUTE], **node_kwargs)
    pacs = orthanc_factory(modalities={"node": (node.ae_title, "127.0.0.1", node.port)},
                           stable_age=1, lua=auto_forward_lua("node"))
    node.document["destinations"] = [{"name": "pacs", "ae_title": pacs.ae_title,
                                      "host": "127.0.0.1", "port": pacs.dicom_port}]
    node.document["jobs"] = {"poll_seconds": 0.2, "retry_base_seconds": 1}
    return pacs, node.start()


def sr_series(pacs: OrthancServer, study_uid: str) -> list[dict[str, object]]:
    """The SR series Orthanc holds in a study."""
    return [s for s in pacs.series_of_study(study_uid)
            if s["MainDicomTags"].get("Modality") == "SR"]  # type: ignore[index, union-attr]


def wait_for_the_sr(pacs: OrthancServer, study_uid: str, path: Path) -> Dataset:
    """Wait for the node's one SR (one series, one instance) in the study; write it to ``path``
    and return it."""
    wait_until(lambda: bool(sr_series(pacs, study_uid)), 120,
               "the node's SR to arrive in Orthanc")
    (series,) = sr_series(pacs, study_uid)
    (instance_id,) = series["Instances"]  # type: ignore[misc]
    path.write_bytes(pacs.instance_file(str(instance_id)))
    return dcmread(path)


ROUTES = """
[[destinations]]
name = "pacs"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {pacs_port}

[[models]]
name = "{model}"
path = "{model_path}"

[[routes]]
name = "images"
match = {{ Modality = ["CT", "CR"] }}
models = ["{model}"]
send_to = ["pacs"]
"""


def routed_config(folder: Path, pacs_port: int = 104) -> Config:
    text = BASIC_CONFIG.format(port=free_port(), stable=1, node_extra="") + ROUTES.format(
        pacs_port=pacs_port, model=CHEST_MODEL["name"], model_path=CHEST_MODEL["path"])
    return load_config(write_config(folder, text))
