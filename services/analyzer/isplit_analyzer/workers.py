"""Warm analysis workers: each job still runs in its own process, forked from a server that
has torch, torchvision, the model zoo and the job code imported already.

A spawned process imports torch before it does anything (5-9 s on a small machine); a process
forked from a preloaded ``forkserver`` starts in milliseconds. The forkserver is a separate,
single-threaded process (forking the service itself, with its HTTP, Kafka and job-runner
threads, would not be safe), started in the background when the analyzer starts. A job process
is a plain ``multiprocessing.Process``: cancelling terminates it, a crash is seen as its exit
code, and it stops itself when the service dies (its parent, the forkserver, exits with the
service, see ``run_analysis_job``). With ``memory_limit_bytes`` each job process is limited
(``RLIMIT_DATA``: its heap and anonymous mappings) so that ``ISPLIT_ANALYZER_WORKERS`` jobs side
by side stay within workers x limit (the limit counts what the job process shares with the
forkserver too: torch's own data, a few hundred MiB); a job over its limit fails, the service
and the other jobs carry on.
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
import threading
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("isplit.analyzer.workers")

# Imported once in the forkserver; every job process starts with them in memory.
PRELOAD = ["torch", "torchvision", "isplit.zoo", "isplit.analysis", "isplit_analyzer.jobs"]


class AnalysisWorkers:
    """Starts job processes from a preloaded forkserver."""

    def __init__(self, memory_limit_bytes: int = 0) -> None:
        self.memory_limit_bytes = memory_limit_bytes
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)  # one forkserver per service process
        self.ready = threading.Event()
        threading.Thread(target=self._warm_up, name="forkserver-warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        # Start the forkserver now, not on the first job: its imports take seconds.
        try:
            from multiprocessing import forkserver

            forkserver.ensure_running()
        except Exception:  # the first job will try again (and report what fails)
            log.exception("could not start the analysis forkserver")
        self.ready.set()

    def start(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> BaseProcess:
        """A started daemon process running ``target(*args)`` (with the memory limit applied)."""
        proc = self._ctx.Process(target=_bounded, args=(self.memory_limit_bytes, target, args), name=name, daemon=True)
        proc.start()
        return proc


def _bounded(memory_limit_bytes: int, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    if memory_limit_bytes > 0:
        _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        limit = memory_limit_bytes if hard == resource.RLIM_INFINITY else min(memory_limit_bytes, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    target(*args)
