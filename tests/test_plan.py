"""The deployment planner: latency maths, constraints, Pareto front, binding constraint and
baselines on hand-made profiles; cost profiles of a real model; ``isplit plan`` and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tests.test_analyzer_api as analyzer_api
from isplit import IsplitError
from isplit.analysis import load_result, run_analysis, split_candidates, write_report
from isplit.checkpoint import load_model
from isplit.cli import build_parser, main
from isplit.cuts import find_cut_points, split_at
from isplit.dev.demo import deployment_spec
from isplit.importance import CutScore, ImportanceCurve
from isplit.messages import BottleneckSpec, DatasetSpec, ModelSpec
from isplit.plan import (
    DEMO_DEPLOYMENT,
    DEVICE_PRESETS,
    LINK_PRESETS,
    SERVER_PRESETS,
    Constraints,
    CostProfile,
    CutCost,
    CutTiming,
    Deployment,
    DeploymentSpec,
    DeviceMeasurement,
    DeviceProfile,
    LinkProfile,
    MeasuredCut,
    ServerProfile,
    cut_costs,
    make_plan,
    measured_from_results,
    parse_deployment_spec,
    plan_analysis,
    plan_table,
    resolve_deployment,
)
from isplit.plots import plot_plan
from isplit.retrain import count_flops
from isplit_analyzer.jobs import report_dir
from isplit_analyzer.store import CandidateRow, Job

# -- hand-made profiles ---------------------------------------------------------------------


def curve(
    log10: dict[str, float], *, skipped: tuple[str, ...] = (), sizes: dict[str, int] | None = None
) -> ImportanceCurve:
    """A curve over the given cuts (network order); candidates = local maxima, best = maximum."""
    names = list(log10)
    sizes = sizes or {n: 1000 for n in names}
    points = [
        CutScore(module=n, kind="Conv2d", skipped=n in skipped, output_shape=[sizes[n] // 4], output_bytes=sizes[n],
                 cui=10 ** log10[n], log10_cui=log10[n])
        for n in names
    ]  # fmt: skip
    active = [n for n in names if n not in skipped]
    vals = [log10[n] for n in active]
    cands = [active[i] for i in range(1, len(vals) - 1) if vals[i] > vals[i - 1] and vals[i] > vals[i + 1]]
    best = max(active, key=lambda n: log10[n])
    return ImportanceCurve(
        target="label", classes=None, num_images=10, points=points, candidates=cands, best=best, per_class={},
        size_ranking=sorted(active, key=lambda n: sizes[n]),
    )  # fmt: skip


def costs(head_gflop: dict[str, float], payload_fp32: dict[str, int], total_gflop: float = 10.0) -> CostProfile:
    """Costs with head FLOPs in GFLOP and fp32 payloads in bytes (fp16 = half, int8 = quarter)."""
    total = int(total_gflop * 1e9)
    cuts = [
        CutCost(module=n, head_flops=int(g * 1e9), tail_flops=total - int(g * 1e9), head_flops_fraction=g / total_gflop,
                head_params=0, head_param_bytes=0, head_peak_activation_bytes=0,
                payload_bytes={"fp32": payload_fp32[n], "fp16": payload_fp32[n] // 2, "int8": payload_fp32[n] // 4})
        for n, g in head_gflop.items()
    ]  # fmt: skip
    return CostProfile(input_shape=[1, 10, 10], input_bytes=100, total_flops=total, total_params=0, cuts=cuts)


def deployment(**constraints: float) -> Deployment:
    """1 GFLOP/s device (encode 1 MB/s), 8 Mbit/s link with 10 ms RTT, 100 GFLOP/s server."""
    return Deployment(
        device=DeviceProfile(gflops=1.0, encode_mb_per_s=1.0),
        link=LinkProfile(uplink_mbps=8.0, rtt_ms=10.0),
        server=ServerProfile(gflops=100.0),
        constraints=Constraints(**constraints),
        encoding="fp16",
    )


# a, c, e are local maxima of the curve; e is its best.
CURVE_VALUES = {"a0": -3.0, "a": -2.0, "b": -2.5, "c": -1.5, "d": -2.2, "e": -1.0, "f": -1.2}
CURVE = curve(CURVE_VALUES)
COSTS = costs(
    {"a0": 0.5, "a": 1.0, "b": 2.0, "c": 3.0, "d": 6.0, "e": 8.0, "f": 9.0},
    {"a0": 8000, "a": 4000, "b": 2000, "c": 2000, "d": 1000, "e": 800, "f": 400},
)


def test_latency_is_head_plus_encode_plus_transfer_plus_tail_plus_rtt() -> None:
    cut = make_plan(CURVE, COSTS, deployment()).cut("c")
    assert cut.head_ms == pytest.approx(3000.0)  # 3 GFLOP at 1 GFLOP/s
    assert cut.encode_ms == pytest.approx(2.0)  # 2000 fp32 bytes at 1 MB/s
    assert cut.payload_bytes == 1000 and cut.payload_source == "raw"  # fp16
    assert cut.transfer_ms == pytest.approx(1.0)  # 8000 bit at 8 Mbit/s
    assert cut.tail_ms == pytest.approx(70.0)  # 7 GFLOP at 100 GFLOP/s
    assert cut.rtt_ms == 10.0
    assert cut.latency_ms == pytest.approx(3000 + 2 + 1 + 70 + 10)


def test_unconstrained_plan_recommends_the_curves_best_cut() -> None:
    plan = make_plan(CURVE, COSTS, deployment())
    assert plan.recommended == plan.unconstrained == "e"
    assert plan.binding == [] and "nothing" in plan.binding_detail
    assert all(c.feasible for c in plan.cuts)


def test_head_budget_picks_the_best_candidate_within_it_and_names_the_binding_constraint() -> None:
    plan = make_plan(CURVE, COSTS, deployment(max_head_flops_fraction=0.5))
    assert plan.recommended == "c"  # e (0.8) is over budget; c is the next local maximum
    assert plan.recommended_is_candidate
    assert plan.binding == ["max_head_flops_fraction"]
    assert "excludes `e`" in plan.binding_detail
    assert plan.cut("e").violates == ["max_head_flops_fraction"] and not plan.cut("e").feasible


def test_latency_and_payload_limits_exclude_cuts() -> None:
    plan = make_plan(CURVE, COSTS, deployment(max_latency_ms=2500))
    assert plan.recommended == "a"  # only a0 and a run their head in under 2.5 s
    assert plan.binding == ["max_latency_ms"]
    plan = make_plan(CURVE, COSTS, deployment(max_payload_bytes=999))  # fp16: c sends 1000 B
    assert plan.recommended == "e"
    plan = make_plan(CURVE, COSTS, deployment(max_payload_bytes=999, max_head_flops_fraction=0.5))
    assert plan.recommended is None


def test_when_no_cut_is_feasible_the_binding_constraint_is_named() -> None:
    plan = make_plan(CURVE, COSTS, deployment(max_head_flops_fraction=0.01))
    assert plan.recommended is None and plan.size_only is None
    assert plan.binding == ["max_head_flops_fraction"]
    assert plan.binding_detail.startswith("no cut satisfies every constraint")


def test_binding_names_the_constraints_of_the_least_violating_cuts() -> None:
    # Heads above a quarter of the FLOPs are too big, payloads over 999 B (fp16) too large:
    # a0, a, b break the payload limit only, d, e, f the head budget only.
    plan = make_plan(CURVE, COSTS, deployment(max_head_flops_fraction=0.25, max_payload_bytes=999))
    assert plan.recommended is None
    assert plan.binding == ["max_head_flops_fraction", "max_payload_bytes"]


def test_without_a_feasible_candidate_the_best_feasible_other_cut_is_offered() -> None:
    plan = make_plan(CURVE, COSTS, deployment(max_head_flops_fraction=0.08))
    assert plan.recommended == "a0" and not plan.recommended_is_candidate


def test_min_accuracy_excludes_measured_cuts_below_it_and_keeps_unmeasured_ones() -> None:
    measured = {"c": MeasuredCut(accuracy=0.6), "a": MeasuredCut(accuracy=0.9)}
    plan = make_plan(CURVE, COSTS, deployment(min_accuracy=0.8, max_head_flops_fraction=0.5), measured)
    assert plan.cut("c").violates == ["min_accuracy"]
    assert plan.recommended == "a"
    assert plan.binding == ["max_head_flops_fraction", "min_accuracy"]
    assert plan.best_measured == "a"
    assert plan.cut("b").feasible  # not measured: accuracy unknown


def test_measured_bottleneck_payload_and_flops_replace_the_raw_estimates() -> None:
    measured = {"c": MeasuredCut(accuracy=0.9, bytes_per_image={"fp32": 400, "fp16": 200, "int8": 100},
                                 head_flops=int(3.5e9), tail_flops=int(7.5e9), latency_ms=4.0)}  # fmt: skip
    cut = make_plan(CURVE, COSTS, deployment(), measured).cut("c")
    assert cut.payload_bytes == 200 and cut.payload_source == "bottleneck"
    assert cut.encode_ms == pytest.approx(0.4)  # 100 elements, 400 fp32 bytes at 1 MB/s
    assert cut.head_ms == pytest.approx(3500.0) and cut.tail_ms == pytest.approx(75.0)
    d = deployment()
    d.server.use_registration_latency = True
    assert make_plan(CURVE, COSTS, d, measured).cut("c").tail_ms == 4.0


def test_a_measured_device_profile_gives_the_head_time_of_its_own_model() -> None:
    timing = {n: CutTiming(head_ms=float(i + 1)) for i, n in enumerate(CURVE.ranking())}
    m = DeviceMeasurement(input_shape=[1, 10, 10], total_flops=COSTS.total_flops, total_ms=50.0, gflops=0.2,
                          encode_mb_per_s=1.0, cuts=timing)  # fmt: skip
    d = deployment()
    d.device.measured = m
    plan = make_plan(CURVE, COSTS, d)
    assert plan.cut("c").head_ms == timing["c"].head_ms and plan.cut("c").head_source == "measured"
    assert plan.baselines["all_on_device"].latency_ms == 50.0
    other = COSTS.model_copy(update={"total_flops": COSTS.total_flops + 1})
    plan = make_plan(CURVE, other, d)
    assert plan.cut("c").head_source == "flops"
    assert any("another model" in n for n in plan.notes)


PARETO_CURVE = curve({"x1": -3.0, "x2": -3.0, "x3": -1.0, "x4": -2.0})
PARETO_COSTS = costs({"x1": 0.05, "x2": 0.05, "x3": 0.1, "x4": 0.2}, {n: 800 for n in ("x1", "x2", "x3", "x4")})


def test_pareto_front_drops_dominated_cuts_and_keeps_ties() -> None:
    plan = make_plan(PARETO_CURVE, PARETO_COSTS, deployment())
    # x4: lower CUI than x3, slower, same payload -> dominated; x1 and x2 are identical: both stay.
    assert plan.pareto == ["x1", "x2", "x3"]


def test_pareto_front_compares_measured_accuracies_when_both_cuts_have_one() -> None:
    measured = {"x3": MeasuredCut(accuracy=0.8), "x4": MeasuredCut(accuracy=0.9)}
    assert make_plan(PARETO_CURVE, PARETO_COSTS, deployment(), measured).pareto == ["x1", "x2", "x3", "x4"]


def test_equal_cui_goes_to_the_faster_cut() -> None:
    tied = curve({"a": -3.0, "b": -1.0, "c": -2.0, "d": -1.0, "e": -3.0})
    # b sends 40 MB (fp16) over 8 Mbit/s, d 4 kB: d is faster though the curve lists b first.
    cost = costs(
        {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4, "e": 0.5},
        {"a": 10**8, "b": 8 * 10**7, "c": 10**6, "d": 8000, "e": 8000},
    )
    plan = make_plan(tied, cost, deployment())
    assert tied.best == "b"
    assert plan.recommended == "d"


def test_size_only_choice_is_the_smallest_feasible_output() -> None:
    sized = curve(CURVE_VALUES, sizes={"a0": 50, "a": 900, "b": 100, "c": 800, "d": 700, "e": 10, "f": 20})
    assert make_plan(sized, COSTS, deployment()).size_only == "e"
    assert make_plan(sized, COSTS, deployment(max_head_flops_fraction=0.5)).size_only == "a0"


def test_baselines_run_everything_on_one_side() -> None:
    plan = make_plan(CURVE, COSTS, deployment(max_head_flops_fraction=0.5), accuracy_original=0.93)
    device, server = plan.baselines["all_on_device"], plan.baselines["all_on_server"]
    assert device.latency_ms == pytest.approx(10_000.0) and device.payload_bytes == 0
    assert device.violates == ["max_head_flops_fraction"] and device.accuracy == 0.93
    assert server.payload_bytes == 100  # the 1x10x10 image as 8-bit pixels
    assert server.latency_ms == pytest.approx(10 + 0.1 + 100.0)  # rtt + 800 bit at 8 Mbit/s + 10 GFLOP at 100
    assert server.feasible


def test_skipped_points_are_not_planned() -> None:
    skipping = curve({"a": -2.0, "r": -1.0, "b": -1.5, "c": -3.0}, skipped=("r",))
    cost = costs({"a": 1.0, "r": 1.0, "b": 2.0, "c": 3.0}, {"a": 400, "r": 400, "b": 400, "c": 400})
    assert [c.module for c in make_plan(skipping, cost, deployment()).cuts] == ["a", "b", "c"]


def test_training_results_become_measurements_with_subset_accuracy_when_asked() -> None:
    results = [
        {"cut": "c", "status": "succeeded", "accuracy_split": 0.7, "accuracy_split_subset": 0.9,
         "bytes_per_image": {"fp16": 10}, "latency_ms": 3.0},
        {"cut": "d", "status": "failed", "accuracy_split": None},
    ]  # fmt: skip
    assert measured_from_results(results, subset=False)["c"].accuracy == 0.7
    measured = measured_from_results(results, subset=True)
    assert measured["c"].accuracy == 0.9 and measured["c"].latency_ms == 3.0
    assert "d" not in measured


# -- deployment profiles and their validation -----------------------------------------------


def test_every_preset_says_it_is_an_assumption() -> None:
    for presets in (DEVICE_PRESETS, LINK_PRESETS, SERVER_PRESETS):
        assert presets and all("assumed" in p.note for p in presets.values())


def test_spec_figures_override_presets() -> None:
    d = resolve_deployment(DeploymentSpec(device="mcu", uplink_mbps=2.0, max_latency_ms=100))
    assert d.device.name == "mcu" and d.device.gflops == DEVICE_PRESETS["mcu"].gflops
    assert d.link.uplink_mbps == 2.0 and d.link.rtt_ms == LINK_PRESETS["lte"].rtt_ms
    assert d.constraints.max_latency_ms == 100
    demo = resolve_deployment(DEMO_DEPLOYMENT)
    assert (demo.device.name, demo.link.uplink_mbps, demo.constraints.max_head_flops_fraction) == ("rpi4", 10, 0.5)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"device": "toaster"}, "toaster"),
        ({"link": "carrier-pigeon"}, "carrier-pigeon"),
        ({"uplink_mbps": -1}, "uplink_mbps"),
        ({"device_gflops": 0}, "device_gflops"),
        ({"max_head_flops_fraction": 1.5}, "max_head_flops_fraction"),
        ({"min_accuracy": 2}, "min_accuracy"),
        ({"max_payload_bytes": -3}, "max_payload_bytes"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_deployments_raise_an_error_naming_the_value(data: dict, named: str) -> None:
    with pytest.raises(IsplitError, match=named):
        parse_deployment_spec(data)


# -- cost profiles of a real model ----------------------------------------------------------


@pytest.fixture(scope="module")
def digits_model(digits_checkpoint: Path):
    model, info = load_model(digits_checkpoint)
    shape = (info.in_channels, info.input_size, info.input_size)
    return model, shape, find_cut_points(model, shape)


def test_cost_profile_head_flops_equal_those_of_the_split_head(digits_model) -> None:
    model, shape, points = digits_model
    profile = cut_costs(model, shape, points)
    x = torch.zeros(1, *shape)
    assert profile.total_flops == count_flops(model, x)
    for p in points[::3]:
        head, _ = split_at(model, p.module)
        cost = profile.cut(p.module)
        assert cost.head_flops == count_flops(head, x), p.module
        assert cost.head_params == sum(q.numel() for q in head.parameters())
        assert cost.payload_bytes == {"fp32": p.output_bytes, "fp16": p.output_bytes // 2, "int8": p.output_bytes // 4}
    fractions = [c.head_flops_fraction for c in profile.cuts]
    assert fractions == sorted(fractions) and fractions[-1] <= 1.0
    assert profile.cuts[0].head_peak_activation_bytes >= 4 * (1 * 32 * 32)


# -- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def analysis_dir(digits_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "analysis"
    write_report(run_analysis(digits_checkpoint, "digits", max_images=60, batch_size=30, device="cpu"), out)
    return out


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_has_the_documented_fields(analysis_dir: Path, capsys) -> None:
    code, out, _ = run_cli(
        capsys, "plan", "--analysis", str(analysis_dir), "--max-head-flops-fraction", "0.5", "--json"
    )
    assert code == 0
    plan = json.loads(out)
    assert {"recommended", "pareto", "cuts", "binding"} <= set(plan)
    for cut in plan["cuts"]:
        assert {"module", "head_flops_fraction", "payload_bytes", "latency_ms", "feasible"} <= set(cut)
    chosen = next(c for c in plan["cuts"] if c["module"] == plan["recommended"])
    assert chosen["feasible"] and chosen["head_flops_fraction"] <= 0.5
    assert set(plan["pareto"]) <= {c["module"] for c in plan["cuts"]}


def test_plan_table_by_default(analysis_dir: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "plan", "--analysis", str(analysis_dir), "--device", "mcu", "--link", "lora")
    assert code == 0
    assert "| cut |" in out and "recommended:" in out and "assumed" in out


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--uplink-mbps", "-1"], "uplink_mbps"),
        (["--device", "toaster"], "toaster"),
        (["--max-head-flops-fraction", "7"], "max_head_flops_fraction"),
        (["--rtt-ms", "fast"], "--rtt-ms"),
        (["--device", "rpi4", "--device-gflops", "3"], "--device-gflops"),
    ],
)
def test_bad_plan_flags_exit_2_with_one_line(analysis_dir: Path, capsys, flags: list[str], named: str) -> None:
    code, out, err = run_cli(capsys, "plan", "--analysis", str(analysis_dir), *flags)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and named in err


def test_bad_device_profile_file_exits_2(analysis_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "profile.json"
    bad.write_text(json.dumps({"format": "isplit-device-profile/1", "input_shape": [1, 32, 32], "total_flops": 1,
                               "total_ms": -1, "gflops": 1, "encode_mb_per_s": 1, "cuts": {}}))  # fmt: skip
    code, _, err = run_cli(capsys, "plan", "--analysis", str(analysis_dir), "--device-profile", str(bad))
    assert code == 2 and "total_ms" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "plan", "--analysis", str(tmp_path / "missing"))
    assert code == 2 and "result.json" in err


# -- the API ---------------------------------------------------------------------------------

api = analyzer_api.api  # the in-process analyzer (TestClient, fresh store, no Kafka)


def _analysed(api, analysis_dir: Path, **body) -> str:
    """A submitted job whose analysis is done: ``analysis_dir``'s report is its report."""
    job_id = analyzer_api.submit(api, **body)
    shutil.copytree(analysis_dir, report_dir(api.state.settings.artifact_root, job_id))
    with api.state.sessions.begin() as s:
        s.get(Job, job_id).status = "succeeded"
    return job_id


@pytest.mark.parametrize(
    ("deployment", "named"),
    [
        ({"device": "toaster"}, "toaster"),
        ({"uplink_mbps": -1}, "uplink_mbps"),
        ({"max_head_flops_fraction": 0}, "max_head_flops_fraction"),
        ({"warp_drive": True}, "warp_drive"),
    ],
)
def test_a_bad_deployment_in_a_submission_gets_422_naming_the_value(api, deployment: dict, named: str) -> None:
    r = api.post(
        "/v1/analyses", json={"model_id": analyzer_api.MODEL_ID, "dataset": "digits", "deployment": deployment}
    )
    assert r.status_code == 422 and named in r.json()["detail"]


def test_the_api_plan_equals_the_cli_plan(api, analysis_dir: Path, capsys) -> None:
    job_id = _analysed(api, analysis_dir)
    flags = {"device": "phone", "uplink-mbps": "2", "max-head-flops-fraction": "0.4", "max-payload-bytes": "4096"}
    r = api.get(f"/v1/analyses/{job_id}/plan", params={k.replace("-", "_"): v for k, v in flags.items()})
    assert r.status_code == 200, r.text
    argv = [x for k, v in flags.items() for x in (f"--{k}", v)]
    code, out, _ = run_cli(capsys, "plan", "--analysis", str(analysis_dir), *argv, "--json")
    assert code == 0
    assert r.json() == json.loads(out)
    assert r.json()["deployment"]["constraints"]["max_head_flops_fraction"] == 0.4


def test_the_plan_defaults_to_the_submitted_deployment_and_includes_measured_accuracy(api, analysis_dir: Path) -> None:
    job_id = _analysed(api, analysis_dir, deployment={"device": "mcu", "max_head_flops_fraction": 0.5})
    cut = json.loads((analysis_dir / "result.json").read_text())["curve"]["candidates"][0]
    with api.state.sessions.begin() as s:
        s.add(CandidateRow(candidate_id=f"{job_id}-x", analysis_id=job_id, cut=cut, predicted_rank=1, size_rank=1,
                           cui=1.0, log10_cui=0.0, output_bytes=4, message="{}", published=True,
                           result={"status": "succeeded", "cut": cut, "accuracy_split": 0.77}))  # fmt: skip
    plan = api.get(f"/v1/analyses/{job_id}/plan").json()
    assert plan["deployment"]["device"]["name"] == "mcu"
    assert plan["deployment"]["constraints"]["max_head_flops_fraction"] == 0.5
    assert next(c for c in plan["cuts"] if c["module"] == cut)["accuracy"] == 0.77
    overridden = api.get(f"/v1/analyses/{job_id}/plan", params={"max_head_flops_fraction": 0.9}).json()
    assert overridden["deployment"]["constraints"]["max_head_flops_fraction"] == 0.9


@pytest.mark.parametrize(
    ("params", "named"),
    [({"device": "toaster"}, "toaster"), ({"rtt_ms": -5}, "rtt_ms"), ({"uplink_mbps": "fast"}, "uplink_mbps")],
)
def test_bad_plan_queries_get_422_naming_the_value(api, analysis_dir: Path, params: dict, named: str) -> None:
    job_id = _analysed(api, analysis_dir)
    r = api.get(f"/v1/analyses/{job_id}/plan", params=params)
    assert r.status_code == 422 and named in r.json()["detail"]


def test_the_plan_of_an_unfinished_analysis_is_409_and_of_an_unknown_one_404(api) -> None:
    job_id = analyzer_api.submit(api)
    assert api.get(f"/v1/analyses/{job_id}/plan").status_code == 409
    assert api.get("/v1/analyses/a-000000000000/plan").status_code == 404


def test_with_a_deployment_only_feasible_cuts_are_published_recommended_first(analysis_dir: Path) -> None:
    result = load_result(analysis_dir)
    deployment = resolve_deployment(DEMO_DEPLOYMENT)
    spec = dict(model=ModelSpec(arch="vgg11", num_classes=10, in_channels=1, input_size=32, weights_uri="m.pt"),
                dataset=DatasetSpec(name="digits"), bottleneck=BottleneckSpec(), top_k=3)  # fmt: skip
    published = split_candidates(result, "a-0123456789ab", deployment=deployment, **spec)
    plan = plan_analysis(result, deployment)
    assert [c.cut for c in published] == plan.feasible_ranking()[:3]
    assert published[0].cut == plan.recommended
    assert all(plan.cut(c.cut).head_flops_fraction <= 0.5 for c in published)
    unconstrained = split_candidates(result, "a-0123456789ab", **spec)
    assert [c.cut for c in unconstrained] == result.ranking[:3]


# -- the report and the demo's deployment ----------------------------------------------------


def test_the_plan_plot_is_written(analysis_dir: Path, tmp_path: Path) -> None:
    result = load_result(analysis_dir)
    plan = plan_analysis(result, resolve_deployment(DEMO_DEPLOYMENT))
    png = plot_plan(plan, result.curve, tmp_path / "plan.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("* recommended: ") for line in plan_table(plan))


def test_the_demo_deployment_recommends_a_cut_within_its_head_budget(analysis_dir: Path) -> None:
    deployment = resolve_deployment(deployment_spec(build_parser().parse_args(["demo"])))
    assert (deployment.device.name, deployment.link.uplink_mbps) == ("rpi4", 10)
    assert deployment.constraints.max_head_flops_fraction == 0.5
    plan = plan_analysis(load_result(analysis_dir), deployment)
    assert plan.recommended is not None and plan.recommended_is_candidate
    assert plan.cut(plan.recommended).head_flops_fraction <= 0.5
    assert plan.recommended != plan.unconstrained  # the curve's maximum is the classifier's input here
    flags = build_parser().parse_args(["demo", "--max-head-flops-fraction", "0.3", "--link", "wifi"])
    overridden = resolve_deployment(deployment_spec(flags))
    assert overridden.constraints.max_head_flops_fraction == 0.3 and overridden.link.name == "wifi"
