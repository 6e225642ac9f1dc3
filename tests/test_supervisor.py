"""`dicom-node serve`'s supervision: a child that dies is started again, sooner after a long run."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest

from dicom_node.processes import MAX_RESTART_DELAY, STABLE_SECONDS, RestartPolicy
from tests.support import peers
from tests.support.peers import NodeProcess, dcmtk

node_factory = peers.node_factory


def test_restart_delay_doubles_while_a_child_keeps_dying_and_is_capped() -> None:
    policy = RestartPolicy()
    delays = [policy.delay(ran_seconds=0.5) for _ in range(8)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0, MAX_RESTART_DELAY, MAX_RESTART_DELAY,
                      MAX_RESTART_DELAY]
    assert policy.failures == 8


def test_a_child_that_ran_long_is_restarted_after_the_shortest_delay_again() -> None:
    policy = RestartPolicy()
    for _ in range(6):
        policy.delay(ran_seconds=1.0)
    assert policy.delay(ran_seconds=STABLE_SECONDS - 1) == MAX_RESTART_DELAY
    assert policy.delay(ran_seconds=STABLE_SECONDS) == 2.0
    assert policy.failures == 1
    assert policy.delay(ran_seconds=3.0) == 4.0


@pytest.mark.slow
def test_serve_restarts_a_killed_worker_and_the_receiver_keeps_answering(
    node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory("serve")
    node.wait_for_log("worker_started", timeout=60)
    [started] = node.find_logs("process_started", process="worker-1")
    os.kill(started["pid"], signal.SIGKILL)

    died = node.wait_for_log("process_died", process="worker-1")
    assert died["exit_code"] == -signal.SIGKILL
    assert died["failures_in_a_row"] == 1 and died["restart_in_seconds"] == 2.0
    # The receiver is a separate process: it answers while the worker is down.
    assert dcmtk("echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.port)).returncode == 0
    restarted = node.wait_for_log("process_started", count=2, process="worker-1", timeout=30)
    assert restarted["pid"] != started["pid"]
    node.wait_for_log("worker_started", count=2, timeout=60)
    assert node.stop() == 0
    assert node.find_logs("worker_stopped")
