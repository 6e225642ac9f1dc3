"""Who holds a lease: a name that says which process on which machine, precisely enough that a
restarted node can prove the holder dead.

A lease owner (``jobs.lease_owner``, and the holder of a send slot) reads, for example::

    ct-ai-01:worker-1@ct-ai-01:48213:9731554:5d1f0c2a9b

the worker's name, ``@``, then the host name, the process id, the process's start time (clock
ticks after boot: field 22 of ``/proc/<pid>/stat``) and a token of the running kernel and pid
namespace (from ``/proc/sys/kernel/random/boot_id`` and ``/proc/self/ns/pid``).

Another process on the same machine, in the same pid namespace since the same boot, can then tell
for sure whether that owner still runs: the pid is gone, or belongs to a process that started at
another time (the pid was reused), or is a zombie. Anything else is not provably dead and keeps its
lease until the lease expires: an owner on another host, in another container or from before a
reboot of this one, and an owner written in an older format (``host:worker-1``). Two machines
sharing one database need different host names (they do by default; a container's host name is
its id), which the queue already needs for its logs.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path

#: Column width of jobs.lease_owner; the name is shortened to fit.
OWNER_LENGTH = 128

_OWNER = re.compile(r"^(?P<name>.*)@(?P<host>[^@:/\s]+):(?P<pid>\d+):(?P<started>\d+)"
                    r":(?P<kernel>[0-9a-f]+)(?:/.*)?$", re.DOTALL)


@dataclass(frozen=True)
class Owner:
    """One process that can hold leases."""

    name: str
    host: str
    pid: int
    #: Clock ticks after boot at which the process started.
    started: int
    #: The kernel instance and pid namespace it ran in; "" where /proc does not tell.
    kernel: str

    def __str__(self) -> str:
        tail = f"@{self.host}:{self.pid}:{self.started}:{self.kernel}"
        return self.name[:max(OWNER_LENGTH - len(tail), 0)] + tail


def parse(text: str) -> Owner | None:
    """The owner a lease owner (or send slot holder: ``<owner>/job <id>``) names; None for a
    name in another format, which can never be proved dead."""
    match = _OWNER.match(text)
    if match is None:
        return None
    return Owner(match["name"], match["host"], int(match["pid"]), int(match["started"]),
                 match["kernel"])


def host_name() -> str:
    """This machine's host name, as lease owners write it (no ``@``, ``:``, ``/`` or spaces)."""
    return re.sub(r"[@:/\s]", "_", socket.gethostname()) or "localhost"


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot); None when there is no such process
    or it is a zombie (it has ended; only its exit status waits to be read)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid …": comm may hold spaces and parentheses, so split after the last ")"
    fields = stat[stat.rfind(")") + 2:].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@cache
def kernel_token() -> str:
    """A token of this boot of the kernel and of this pid namespace; "" without /proc."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}\x00{namespace}".encode()).hexdigest()[:10]


def this_process(name: str) -> str:
    """The lease owner of the calling process, under ``name`` (a worker's name)."""
    pid = os.getpid()
    return str(Owner(name, host_name(), pid, start_ticks(pid) or 0, kernel_token()))


def is_dead(text: str) -> bool:
    """Whether the lease owner (or send slot holder) ``text`` is provably dead: it ran on this
    machine, in this pid namespace, since this boot, and its process no longer runs. False for
    anything that cannot be proved (another host, an older format, no /proc)."""
    owner = parse(text)
    if owner is None or owner.host != host_name():
        return False
    kernel = kernel_token()
    if not kernel or owner.kernel != kernel or owner.started == 0:
        return False
    return start_ticks(owner.pid) != owner.started
