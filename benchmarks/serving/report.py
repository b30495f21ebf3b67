"""The goals checked on the measurements, and the printed tables."""

from __future__ import annotations

from collections.abc import Sequence

from .results import ENCODINGS, TOP_K, Report
from .side_by_side import BARE


def goals(report: Report) -> dict:
    """The issue's goals per TorchServe registration, from the head-to-head medians: p50 at
    concurrency 1 within 2x of the bare endpoint's; throughput at concurrency 16 at least 2x
    (read both ways: against its own at concurrency 1, and against the bare endpoint's at 16);
    and the test-set agreement of the split model with the full model."""
    out: dict = {"torchserve": {}}
    endpoints = report.head_to_head.get("endpoints", {})
    bare = endpoints.get("fastapi tail (bare)")
    for label, e in endpoints.items():
        if bare is None or not label.startswith("torchserve"):
            continue
        p50_ratio = e["c1_p50_ms"] / bare["c1_p50_ms"]
        own_ratio = e["c16_rps"] / e["c1_rps"]
        bare_ratio = e["c16_rps"] / bare["c16_rps"]
        out["torchserve"][label] = {
            "p50_ratio_to_bare_c1": p50_ratio,
            "p50_goal_met": p50_ratio <= 2.0,
            "throughput_c16_over_own_c1": own_ratio,
            "throughput_c16_over_bare_c16": bare_ratio,
            "throughput_goal_met_vs_own_c1": own_ratio >= 2.0,
            "throughput_goal_met_vs_bare_c16": bare_ratio >= 2.0,
        }
    for enc, target in (("fp16", 0.99), ("int8", 0.97)):
        if enc in report.agreement:
            out[f"agreement_{enc}_goal_met"] = report.agreement[enc]["agreement_with_full"] >= target
    out["side_by_side"] = {row["tail"]: side_by_side_goals(row["servers"]) for row in report.side_by_side}
    return out


def side_by_side_goals(servers: dict[str, dict[str, dict]]) -> dict:
    """Per TorchServe registration of one tail: p50 at concurrency 1 within 2x of the bare
    endpoint's, throughput at concurrency 16 at least 2x the bare endpoint's; and ``best``, the
    registration with the highest throughput at 16 among those meeting the latency goal."""
    bare = servers[BARE]
    if "1" not in bare or "16" not in bare:
        return {"torchserve": {}, "best": None}
    out: dict = {"torchserve": {}}
    for label, by_c in servers.items():
        if not label.startswith("torchserve"):
            continue
        p50_ratio = by_c["1"]["p50_ms"] / bare["1"]["p50_ms"]
        rps_ratio = by_c["16"]["rps"] / bare["16"]["rps"]
        out["torchserve"][label] = {
            "p50_ratio_to_bare_c1": p50_ratio,
            "p50_goal_met": p50_ratio <= 2.0,
            "throughput_c16_over_bare_c16": rps_ratio,
            "throughput_goal_met": rps_ratio >= 2.0,
        }
    fast_enough = [label for label, g in out["torchserve"].items() if g["p50_goal_met"]]
    out["best"] = max(fast_enough, key=lambda label: servers[label]["16"]["rps"], default=None)
    return out


def print_report(r: Report) -> None:
    m = r.model
    print(f"\nmachine: {r.machine.get('cpu', 'CPU')}, {r.machine['cpus']} cores, load average {fmt_load(r.machine['load_average'])} before, "
          f"{fmt_load(r.machine['load_average_after'])} after; torch {r.machine['torch']}")  # fmt: skip
    print(f"model: {m['arch']} width {m['width']}, cut {m['cut']} (ratio {m['ratio']}), code {m['code_shape']}, "
          f"image {m['image_shape']}; test accuracy full {m['accuracy_full']:.4f}, split {m['accuracy_split']:.4f}")  # fmt: skip
    if "resnet" in m:
        n = m["resnet"]
        print(f"model: {n['arch']} at {n['input_size']} px, cut {n['cut']} (no bottleneck), code {n['code_shape']}; "
              f"trained {n['epochs']} epoch on {n['train_images']} images, test accuracy "
              f"{n['test_accuracy_first_2000']:.4f} (first 2,000 test images)")  # fmt: skip
    e = r.edge
    print(f"edge (1 image, 1 thread): head {e['head_ms']:.3f} ms; encode " +
          ", ".join(f"{enc} {e[f'encode_{enc}_ms']:.3f} ms" for enc in ENCODINGS))  # fmt: skip

    print("\npayload per image (one wire message, N=1):")
    print(f"  raw image {r.payload['raw_image_bytes']} B (uint8), PNG {r.payload['png_mean_bytes']:.0f} B mean")
    for key in (*ENCODINGS, "full"):
        label = f"code {key}" if key != "full" else "full image fp16"
        print(f"  {label:<16} {r.payload[f'{key}_bytes']:>6} B  = {r.payload[f'{key}_ratio_to_raw']:.3f} x raw")

    if r.agreement:  # not measured with --side-by-side-only
        print("\nagreement on the 10,000 test images (predictions served by TorchServe):")
        for key, a in r.agreement.items():
            vs_fp32 = a.get("agreement_with_split_fp32")
            extra = f"   with the split model in fp32 {100 * vs_fp32:6.2f} %" if vs_fp32 is not None else ""
            print(f"  {key:<11} with the full model {100 * a['agreement_with_full']:6.2f} %{extra}"
                  f"   accuracy {100 * a['accuracy']:6.2f} %")  # fmt: skip

    if r.latency:
        print(f"\nlatency (single-image requests, top-{TOP_K}; batch = mean codes per forward pass):")
        print(
            f"  {'endpoint':<24}{'enc':<6}{'conc':>5}{'p50 ms':>9}{'p95 ms':>9}{'req/s':>9}{'B/req':>8}{'batch':>7}{'err':>5}"
        )
        for x in r.latency:
            batch = f"{x.mean_batch:.1f}" if x.mean_batch is not None else "-"
            print(f"  {x.endpoint:<24}{x.encoding:<6}{x.concurrency:>5}{x.p50_ms:>9.2f}{x.p95_ms:>9.2f}"
                  f"{x.throughput_rps:>9.0f}{x.bytes_per_request:>8.0f}{batch:>7}{x.errors:>5}")  # fmt: skip
        print(
            f"  {'in-process handler':<24}{'fp16':<6}{'-':>5}{r.in_process['p50_ms']:>9.2f}{r.in_process['p95_ms']:>9.2f}"
        )

    h = r.head_to_head
    if h:
        print(f"\nhead to head (fp16; medians of {h['rounds']} rounds taking the endpoints in turn):")
        print(f"  {'endpoint':<24}{'c1 p50 ms':>11}{'c1 req/s':>10}{'c16 p50 ms':>12}{'c16 req/s':>11}{'batch':>7}")
        for label, e in h["endpoints"].items():
            batch = f"{e['c16_mean_batch']:.1f}" if e["c16_mean_batch"] is not None else "-"
            print(f"  {label:<24}{e['c1_p50_ms']:>11.2f}{e['c1_rps']:>10.0f}{e['c16_p50_ms']:>12.2f}"
                  f"{e['c16_rps']:>11.0f}{batch:>7}")  # fmt: skip

    if r.tuning:
        print("\ntuning (fp16 tail; medians of the rounds; each server variant its own TorchServe):")
        print(f"  {'server':<42}{'registration':<40}{'c1 p50':>8}{'c1 p95':>8}{'c1 r/s':>8}{'c16 r/s':>9}{'batch':>7}")
        for t in r.tuning:
            batch = f"{t['c16_mean_batch']:.1f}" if t["c16_mean_batch"] is not None else "-"
            print(f"  {t['server']:<42}{t['registration']:<40}{t['c1_p50_ms']:>8.2f}{t['c1_p95_ms']:>8.2f}"
                  f"{t['c1_rps']:>8.0f}{t['c16_rps']:>9.0f}{batch:>7}")  # fmt: skip

    for row in r.side_by_side:
        print_side_by_side(row)

    g = r.goals
    print("\ngoals:")
    for label, t in g["torchserve"].items():
        print(f"  {label}: p50 c=1 / bare {t['p50_ratio_to_bare_c1']:.2f} (<= 2: {yes(t['p50_goal_met'])}); "
              f"c=16 throughput / own c=1 {t['throughput_c16_over_own_c1']:.2f} "
              f"(>= 2: {yes(t['throughput_goal_met_vs_own_c1'])}), "
              f"/ bare c=16 {t['throughput_c16_over_bare_c16']:.2f} (>= 2: {yes(t['throughput_goal_met_vs_bare_c16'])})")  # fmt: skip
    for enc, target in (("fp16", 99), ("int8", 97)):
        if f"agreement_{enc}_goal_met" in g:
            print(f"  {enc} agreement with the full model >= {target} %: {yes(g[f'agreement_{enc}_goal_met'])}")
    for tail, t in g.get("side_by_side", {}).items():
        for label, x in t["torchserve"].items():
            print(f"  {tail}, {label}: p50 c=1 / bare {x['p50_ratio_to_bare_c1']:.2f} (<= 2: {yes(x['p50_goal_met'])}); "
                  f"c=16 throughput / bare {x['throughput_c16_over_bare_c16']:.2f} (>= 2: {yes(x['throughput_goal_met'])})")  # fmt: skip
        print(f"  {tail}: best registration meeting the latency goal: {t['best']}")


def print_side_by_side(row: dict) -> None:
    """One tail's table: every server at every concurrency (medians of the rounds)."""
    batched = next(k for k in row if k.startswith("tail_ms_per_image_at_batch_"))
    print(f"\nside by side: {row['tail']}, code {row['code_shape']} ({row['bytes_per_request']} B fp16); "
          f"tail {row['tail_ms_per_image']:.2f} ms/image at batch 1, {row[batched]:.2f} at batch "
          f"{batched.rsplit('_', 1)[1]} (1 thread); medians of {row['rounds']} rounds")  # fmt: skip
    print(f"  {'server':<36}{'conc':>5}{'p50 ms':>9}{'p95 ms':>9}{'req/s':>9}{'batch':>7}")
    p = row["in_process"]
    print(f"  {'in-process handler':<36}{1:>5}{p['p50_ms']:>9.2f}{p['p95_ms']:>9.2f}{1e3 / p['p50_ms']:>9.0f}{'-':>7}")
    for label, by_c in row["servers"].items():
        for c, x in by_c.items():
            batch = f"{x['mean_batch']:.1f}" if x["mean_batch"] is not None else "-"
            print(f"  {label:<36}{c:>5}{x['p50_ms']:>9.2f}{x['p95_ms']:>9.2f}{x['rps']:>9.0f}{batch:>7}")


def yes(ok: bool) -> str:
    return "met" if ok else "NOT met"


def fmt_load(load: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in load)
