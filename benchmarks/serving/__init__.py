"""Benchmark split serving: a tail on a real TorchServe against offloading the whole image.

One run does everything on one machine:

1. trains (or loads: ``--checkpoint``, or the copy cached in ``--work-dir``) a narrow VGG11 on
   Fashion-MNIST at 32 px, inserts a bottleneck at ``--cut`` and retrains it, exports the
   head/tail pair and archives two models with the project's handler: the tail, and a
   *full-image* endpoint (the whole model, preprocessing included, as a "tail" whose code is
   the raw 28x28 image, sent as fp16, exact for 0..255);
2. starts its own TorchServe (``scripts/torchserve``, temporary artifact root and run dir,
   free ports, the project's ``services/tail-serving/config.properties``), or reuses one given
   by ``--inference-url``/``--management-url``/``--model-store``; registers the tail twice
   (``--max-batch-delay-ms``, default 0, and ``--batched-delay-ms``, default 1) and the
   full-image model; serves the same two models from bare FastAPI endpoints (uvicorn, one
   process each, the same handler class, no batching);
3. sends the 10,000 test images through the served tail (batched requests) per encoding and
   through the full-image endpoint; reports agreement with the full model run locally;
4. after ``--warmup`` requests per endpoint (the JVM compiles TorchServe's request path as it
   goes), measures single-image requests at each ``--concurrency`` (one keep-alive HTTP/1.1
   connection per client thread): p50/p95 latency, throughput, bytes per request and the mean
   server-side batch; the handler called in-process (no HTTP) gives the floor;
5. head to head: TorchServe (both registrations) and the bare endpoint taken in turn for
   ``--rounds`` rounds, medians reported, and the goals checked on them;
6. side by side, per tail (the VGG11 tail above, and a ResNet-18 at 64 px, cached, cut at
   ``--resnet-cut`` without a bottleneck, whose tail costs milliseconds): the handler
   in-process, the bare endpoint, and TorchServe without batching (batch 1) and with batch
   ``--batch-size`` at each of ``--batch-delays``, at each ``--concurrency``, in alternating
   rounds, with the goals per registration (``--side-by-side-only`` runs this step alone);
7. unless ``--no-tuning``: the tuning experiments (stock TorchServe and torch threads, the
   project config, batch size and delay, workers, a quiet log4j2), also in alternating rounds.

Prints tables and writes JSON (``--json-out``). Exits 1 when a request failed. Everything
shares the machine with the client: on a shared 2-core box, run it without ``nice`` (a
niced TorchServe, three processes per request, suffers more than a one-process endpoint)
and at a quiet moment; the JSON records the load average before and after.

    .venv/bin/python -m benchmarks.serving --json-out var/bench-serving.json
"""
