"""Run a test body on N gloo ranks (like DeepSpeed's own distributed tests, with reused workers).

``DistributedPool(n)`` spawns ``n`` processes once; each joins a gloo process group on a free
port and then runs the bodies it is sent: ``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank
(``fn`` must be importable, i.e. module level) and returns the list of per-rank results, or raises
with the failing rank's traceback. A failure or a timeout (e.g. a rank stuck in a collective)
tears the pool down, so the next test gets a fresh one. Workers use one thread each so that runs
are deterministic and do not oversubscribe small machines.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

from tests.helpers import clean_env

DEFAULT_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, inbox, outbox) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=DEFAULT_TIMEOUT))
        outbox.put((rank, True, "ready"))
    except Exception:  # noqa: BLE001 - report anything to the parent
        outbox.put((rank, False, traceback.format_exc()))
        return
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            outbox.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistributedPool:
    """``world_size`` gloo ranks that run test bodies on request."""

    def __init__(self, world_size: int, timeout: float = DEFAULT_TIMEOUT):
        self.world_size = world_size
        self.timeout = timeout
        self.procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(self.world_size)]
        port = free_port()
        env_backup = dict(os.environ)
        child_env = clean_env()  # computed before clearing: it copies the current environment
        os.environ.clear()
        os.environ.update(child_env)  # children inherit no launcher variables
        try:
            self.procs = [ctx.Process(target=_worker, daemon=True,
                                      args=(r, self.world_size, port, self.inboxes[r],
                                            self.outbox))
                          for r in range(self.world_size)]
            for p in self.procs:
                p.start()
        finally:
            os.environ.clear()
            os.environ.update(env_backup)
        self._collect("start-up")

    def _collect(self, what: str) -> list:
        results: dict[int, object] = {}
        failures: dict[int, str] = {}
        while len(results) + len(failures) < self.world_size:
            try:
                rank, ok, value = self.outbox.get(timeout=self.timeout)
            except queue.Empty:
                self.close(force=True)
                missing = sorted(set(range(self.world_size)) - set(results) - set(failures))
                detail = "".join(f"\n--- rank {r} failed:\n{tb}" for r, tb in failures.items())
                raise AssertionError(f"{what}: ranks {missing} did not answer within "
                                     f"{self.timeout:.0f}s (deadlock?){detail}") from None
            if ok:
                results[rank] = value
            else:
                failures[rank] = value
                # the others may now wait forever in a collective: give them a moment, then stop
                self.timeout = min(self.timeout, 20.0)
        if failures:
            self.close(force=True)
            rank = min(failures)
            raise AssertionError(f"{what} failed on rank {rank}:\n{failures[rank]}")
        return [results[r] for r in range(self.world_size)]

    def run(self, fn, *args, **kwargs) -> list:
        """``fn(*args, **kwargs)`` on every rank; the per-rank results in rank order."""
        if not self.procs:
            self.timeout = DEFAULT_TIMEOUT
            self._start()
        for q in self.inboxes:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", str(fn)))

    def close(self, force: bool = False) -> None:
        if not self.procs:
            return
        if not force:
            for q in self.inboxes:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs = []
