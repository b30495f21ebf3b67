"""Re-measure I-SPLIT's claim: does the CUI curve predict the accuracy of a split?

One sweep, for a model and a dataset:

1. train the reference model (or load ``--weights``) and save its checkpoint;
2. one pass of the importance engine gives the all-class curve and, from the same per-class
   sums, the curve of any class subset; subsets whose best cut differs from the all-class
   best are found automatically (or given);
3. a bottleneck is trained at every measured cut with the same budget (epochs, images,
   learning rate, compression ratio) and the split model's test accuracy measured; for each
   subset, bottlenecks are also trained on that subset's images at a few cuts;
4. measured accuracy is compared with (a) log10 CUI and (b) the size baseline (smaller
   output bytes = better cut): Spearman and Kendall correlations with one-sided permutation
   p-values, the partial rank correlation of accuracy with CUI given size (and depth), and
   the accuracy of the cut each method would pick, overall and inside head-FLOPs budgets
   (10 %, 25 %, 50 % of the network: the headline), on the curves of both targets; every
   bottleneck is trained with several seeds (mean and spread).

Everything lands in one JSON (:class:`SweepResult`); the Markdown report and the plot are
generated from that JSON alone (``isplit experiment report`` regenerates them).

This package imports no optional dependency at import time (matplotlib is imported only to
plot, scikit-learn only by the digits loader), so it runs where only torch, torchvision,
numpy, pillow, pydantic and tqdm are installed: ``python -m isplit.experiment sweep ...``.

Modules: ``schema`` (the result schema), ``claims`` (which cuts, correlations, picks; the
statistics themselves are ``isplit.stats``), ``sweep`` (running one), ``report`` (verdict,
Markdown, output files; the plot is ``isplit.plots.plot_sweep``), ``cli`` (the commands).
"""

from isplit.experiment.claims import (
    budget_picks,
    choose_cuts,
    correlate,
    evaluate_claim,
    partial_correlations,
    size_control,
    size_pick,
    spanning_order,
    subset_search,
)
from isplit.experiment.cli import main, register_cli
from isplit.experiment.report import (
    budget_comparison,
    read_result,
    render_report,
    verdict,
    write_outputs,
    write_report,
)
from isplit.experiment.schema import (
    SCHEMA,
    BudgetPicks,
    Correlation,
    CutMeasurement,
    Machine,
    PartialCorrelation,
    Pick,
    Picks,
    SizeControl,
    SubsetCutMeasurement,
    SubsetResult,
    SweepConfig,
    SweepResult,
)
from isplit.experiment.sweep import run_sweep
from isplit.stats import permutation_p

__all__ = [
    "SCHEMA",
    "BudgetPicks",
    "Correlation",
    "CutMeasurement",
    "Machine",
    "PartialCorrelation",
    "Pick",
    "Picks",
    "SizeControl",
    "SubsetCutMeasurement",
    "SubsetResult",
    "SweepConfig",
    "SweepResult",
    "budget_comparison",
    "budget_picks",
    "choose_cuts",
    "correlate",
    "evaluate_claim",
    "main",
    "partial_correlations",
    "permutation_p",
    "read_result",
    "register_cli",
    "render_report",
    "run_sweep",
    "size_control",
    "size_pick",
    "spanning_order",
    "subset_search",
    "verdict",
    "write_outputs",
    "write_report",
]
