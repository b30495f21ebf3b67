"""Warm analysis workers: job processes forked from a preloaded forkserver, each within its
memory limit (the analyzer's cancel and crash behaviour is tested in test_analyzer.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from isplit_analyzer.workers import AnalysisWorkers


def report_preloaded(out: str) -> None:
    Path(out).write_text(",".join(m for m in ("torch", "torchvision", "isplit.zoo") if m in sys.modules))


def allocate(megabytes: int) -> None:
    block = bytearray(megabytes * 2**20)
    block[::4096] = b"x" * len(block[::4096])


def sleep_forever() -> None:
    time.sleep(600)


def test_job_processes_start_with_torch_and_the_zoo_imported(tmp_path):
    workers = AnalysisWorkers()
    assert workers.ready.wait(120), "the forkserver did not start"
    out = tmp_path / "modules"
    proc = workers.start(report_preloaded, (str(out),), name="probe")
    proc.join(60)
    assert proc.exitcode == 0
    assert out.read_text() == "torch,torchvision,isplit.zoo"


def test_a_warm_job_process_starts_in_seconds_not_an_import_of_torch(tmp_path):
    workers = AnalysisWorkers()
    assert workers.ready.wait(120)
    out = tmp_path / "modules"
    start = time.monotonic()
    proc = workers.start(report_preloaded, (str(out),), name="probe")
    proc.join(60)
    # A spawned process importing torch takes 5-9 s on this machine.
    assert proc.exitcode == 0 and time.monotonic() - start < 5.0


def test_a_job_over_its_memory_limit_fails_and_one_within_it_succeeds():
    workers = AnalysisWorkers(memory_limit_bytes=2048 * 2**20)  # torch's own data counts too
    over = workers.start(allocate, (4096,), name="over")
    within = workers.start(allocate, (100,), name="within")
    over.join(60)
    within.join(60)
    assert over.exitcode not in (0, None)
    assert within.exitcode == 0


def test_terminate_stops_a_running_job_process():
    workers = AnalysisWorkers()
    proc = workers.start(sleep_forever, (), name="sleeper")
    proc.terminate()
    proc.join(10)
    assert proc.exitcode is not None and proc.exitcode != 0
