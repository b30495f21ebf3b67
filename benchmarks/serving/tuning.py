"""The tuning experiments: TorchServe and torch settings taken in alternating rounds."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from .load import load_test
from .results import THREADS_ENV, TUNING_KEYS, LoadResult, log
from .servers import measure_batched, private_torchserve, serve

STOCK = {key: None for key in TUNING_KEYS}  # TorchServe's defaults for every tuning key
TORCH_DEFAULT_THREADS = {THREADS_ENV: "0"}  # the worker on torch's default thread count (one per core)
# log4j2 for the experiment "quiet logging": TorchServe's own configuration (ts/frontend's
# log4j2.xml) logs about a dozen lines per request at INFO/DEBUG, most of them twice (the
# org.pytorch.serve logger and the root logger share the ts_log appender) and once more to
# stdout; here the per-request loggers are at WARN, nothing is duplicated, and there is no
# access log. Model metrics are unaffected: the frontend parses them before logging.
QUIET_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <RollingFile name="ts_log" fileName="${env:LOG_LOCATION:-logs}/ts_log.log"
                 filePattern="${env:LOG_LOCATION:-logs}/ts_log.%d{dd-MMM}.log.gz">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/></Policies>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="MODEL_LOG" level="warn"/>
    <Logger name="org.pytorch.serve.wlm.WorkerThread" level="warn"/>
    <Logger name="org.pytorch.serve.wlm.BatchAggregator" level="warn"/>
    <Logger name="org.pytorch.serve.wlm.WorkerLifeCycle" level="warn"/>
    <Logger name="org.pytorch.serve.job" level="warn"/>
    <Root level="info"><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
"""


def quiet_logging(directory: Path) -> dict[str, str]:
    """Config overrides that point TorchServe's JVM at :data:`QUIET_LOG4J2` (written to ``directory``)."""
    path = directory / "log4j2-quiet.xml"
    path.write_text(QUIET_LOG4J2)
    return {"vmargs": f"-Dlog4j.configurationFile=file://{path}"}


def tuning_experiments(tail_mar: Path, payloads: Sequence[bytes], args: argparse.Namespace) -> list[dict]:
    """fp16 at concurrency 1 and 16 under server and registration variants, one change at a time.

    Every variant runs at once (a TorchServe per server variant, each registration warmed up);
    rounds take the variants in turn and the medians are reported, as in :func:`head_to_head`."""
    trainer_default = [("batch 8, delay 5 ms (trainer default)", 8, 5, 1)]
    servers = [
        ("stock TorchServe, torch default threads", STOCK, TORCH_DEFAULT_THREADS, trainer_default),
        ("stock TorchServe, handler on 1 thread", STOCK, {}, trainer_default),
        ("project config.properties", {}, {}, [
            *trainer_default,
            ("batch 1 (no batching)", 1, 0, 1),
            ("batch 16, delay 0 ms", 16, 0, 1),
            ("batch 16, delay 1 ms", 16, 1, 1),
            ("batch 16, delay 2 ms", 16, 2, 1),
            ("batch 16, delay 0 ms, 2 workers", 16, 0, 2),
            ("batch 16, delay 1 ms, 2 workers", 16, 1, 2),
        ]),
        ("project config + quiet log4j2", quiet_logging(args.work_dir), {}, [
            ("batch 16, delay 0 ms", 16, 0, 1),
            ("batch 16, delay 1 ms", 16, 1, 1),
        ]),
    ]  # fmt: skip
    cells = []  # (server label, registration label, server, model name, URL)
    results: dict[int, dict[str, list[LoadResult]]] = {}
    with ExitStack() as stack:
        for server_label, overrides, env, registrations in servers:
            log(f"tuning: starting {server_label} ...")
            server = stack.enter_context(private_torchserve(overrides, env))
            for index, (reg_label, batch, delay, workers) in enumerate(registrations):
                name = f"tune-{index}"
                url = serve(server, tail_mar, name, batch_size=batch, delay_ms=delay, workers=workers)
                load_test(url, payloads, 16, 0, warmup=args.warmup)
                cells.append((server_label, reg_label, server, name, url))
        for round_ in range(args.rounds):
            log(f"tuning: round {round_ + 1} of {args.rounds} over {len(cells)} variants ...")
            for i, (_s, _r, server, name, url) in enumerate(cells):
                by_c = results.setdefault(i, {"c1": [], "c16": []})
                by_c["c1"].append(measure_batched("tuning", server, name, url, "fp16", payloads, 1, args.requests))
                by_c["c16"].append(
                    measure_batched("tuning", server, name, url, "fp16", payloads, 16, 2 * args.requests)
                )
    rows = []
    for i, (server_label, reg_label, *_rest) in enumerate(cells):
        c1, c16 = results[i]["c1"], results[i]["c16"]
        batches = [r.mean_batch for r in c16 if r.mean_batch is not None]
        rows.append({
            "server": server_label,
            "registration": reg_label,
            "c1_p50_ms": statistics.median(r.p50_ms for r in c1),
            "c1_p95_ms": statistics.median(r.p95_ms for r in c1),
            "c1_rps": statistics.median(r.throughput_rps for r in c1),
            "c16_p50_ms": statistics.median(r.p50_ms for r in c16),
            "c16_rps": statistics.median(r.throughput_rps for r in c16),
            "c16_mean_batch": statistics.median(batches) if batches else None,
            "errors": sum(r.errors for r in (*c1, *c16)),
        })  # fmt: skip
    return rows
