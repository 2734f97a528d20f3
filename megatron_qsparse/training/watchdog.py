"""Stop a rank whose launcher is gone, so that a scheduler killing the launcher stops the job.

Under ``deepspeed`` the process tree is ``deepspeed`` (the runner) -> ``deepspeed.launcher.launch``
-> the ranks. ``kill -9`` of the runner orphans ``launch.py`` and leaves the ranks training, and no
signal reaches them. Each rank therefore watches its launcher chain: it asks for SIGTERM when its
parent dies (``PR_SET_PDEATHSIG``), and a daemon thread polls the parent and grandparent pids. When
one is gone the rank sends itself SIGTERM: with ``--exit-signal-handler`` (the default) the trainer
saves (with ``--save``) and exits after the current iteration, agreed by all ranks; a rank that has
not exited ``grace`` seconds later is ended with ``os._exit``. ``launch.py`` exits once its ranks
have. Armed only under the DeepSpeed launcher: a plain ``python pretrain_qsparse.py`` started from
a shell that later exits (``nohup``) keeps running.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = ""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        pass
    return state not in ("Z", "X")  # a zombie is dead


def launcher_chain() -> list[int]:
    """The pids to watch: ``launch.py`` and the runner above it; empty when this process was not
    started by the DeepSpeed launcher."""
    parent = os.getppid()
    if "deepspeed.launcher.launch" not in _cmdline(parent):
        return []
    chain = [parent]
    grand = _parent_of(parent)
    if grand and grand > 1:
        chain.append(grand)
    return chain


def start(interval: float = 1.0, grace: float = 20.0) -> threading.Thread | None:
    """Arm the watchdog (no-op outside the DeepSpeed launcher or off Linux)."""
    chain = launcher_chain()
    if not chain:
        return None
    try:  # the kernel's own notice when the parent (launch.py) dies
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    parent = chain[0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval):
            gone = [p for p in chain if not _alive(p)]
            if os.getppid() != parent and parent not in gone:
                gone.append(parent)
            if gone:
                break
        else:
            return
        logger.error("the launcher (pid %s) is gone; stopping this rank (pid %d)",
                     ", ".join(map(str, gone)), os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
        if not stop.wait(grace):
            logger.error("rank did not stop within %.0f s of its launcher's death; exiting", grace)
            os._exit(1)

    thread = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    thread.stop = stop  # type: ignore[attr-defined]
    thread.start()
    return thread
