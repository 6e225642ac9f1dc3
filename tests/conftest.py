"""Shared fixtures: an in-process receiver on a free loopback port, configs in tmp folders."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog
from pydicom.data import get_testdata_file

from dicom_node.config import Config, load_config
from dicom_node.receive.scp import Receiver
from dicom_node.store.db import make_engine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample_file(name: str) -> Path:
    """A file from pydicom's test data or pydicom-data, by exact name (patterns download)."""
    path = get_testdata_file(name)
    assert path is not None, f"test data file {name} not found"
    return Path(str(path))


def write_config(folder: Path, text: str) -> Path:
    path = folder / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


BASIC_CONFIG = """
[node]
ae_title = "DICOM_NODE"
port = {port}
bind = "127.0.0.1"
data_dir = "var"
{node_extra}

[completion]
stable_after_seconds = {stable}
sweep_interval_seconds = 0.2
"""


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Each test starts with structlog's defaults: a test that runs the CLI in-process configures
    logging (level, output) for the whole interpreter."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def node_config(tmp_path: Path) -> Config:
    path = write_config(tmp_path, BASIC_CONFIG.format(port=free_port(), stable=1, node_extra=""))
    return load_config(path)


@contextmanager
def running_receiver(config: Config) -> Iterator[Receiver]:
    """The real SCP of ``config``, in this process, started and stopped around the block."""
    engine = make_engine(config.database.url)
    rx = Receiver(config, engine)
    rx.start()
    try:
        yield rx
    finally:
        rx.stop()
        engine.dispose()  # PostgreSQL: close the pool's connections (a GC'd one warns)


@pytest.fixture
def receiver(node_config: Config) -> Iterator[Receiver]:
    """The real SCP, in this process, on a free loopback port."""
    with running_receiver(node_config) as rx:
        yield rx


pytest_plugins = [
    "tests.support.peers", "tests.support.worklist_peer", "tests.support.postgres_peer",
]
