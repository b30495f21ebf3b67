"""A plan as text: the Markdown table the CLI prints and the demo's report shows."""

from __future__ import annotations

from isplit.plan.planner import Plan


def plan_table(plan: Plan) -> list[str]:
    """The plan as a Markdown table (one row per cut) with the verdict lines under it."""
    rows = [
        "| cut | I-SPLIT | CUI rank | accuracy | head FLOPs | payload B | head ms | transfer ms | tail ms | latency ms | feasible |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for c in plan.cuts:
        marks = ("**recommended** " if c.module == plan.recommended else "") + (
            "pareto" if c.module in plan.pareto else ""
        )
        rows.append(
            f"| {c.module} | {'cand' if c.candidate else ''} {marks.strip()} | {c.cui_rank} | "
            f"{'-' if c.accuracy is None else f'{100 * c.accuracy:.1f} %'} | {100 * c.head_flops_fraction:.1f} % | "
            f"{c.payload_bytes}{'*' if c.payload_source == 'bottleneck' else ''} | {c.head_ms:.2f} | "
            f"{c.transfer_ms:.2f} | {c.tail_ms:.2f} | {c.latency_ms:.1f} | "
            f"{'yes' if c.feasible else 'no: ' + ', '.join(c.violates)} |"
        )
    b = plan.baselines
    return rows + [
        "",
        "(* bottleneck code measured by the trainer; other payloads are the raw tensor at the cut)",
        "",
        f"* recommended: `{plan.recommended}`"
        + ("" if plan.recommended_is_candidate else " (not an I-SPLIT candidate)"),
        f"* unconstrained I-SPLIT best: `{plan.unconstrained}`; size-only choice under the same constraints: "
        f"`{plan.size_only}`",
        f"* binding: {plan.binding_detail}",
        f"* Pareto front (accuracy signal, latency, payload): {', '.join(f'`{n}`' for n in plan.pareto)}",
        f"* all on device: {b['all_on_device'].latency_ms:.1f} ms; all on server: {b['all_on_server'].latency_ms:.1f} ms "
        f"({b['all_on_server'].payload_bytes} B image)",
    ]
