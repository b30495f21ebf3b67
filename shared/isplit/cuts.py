"""Single-tensor cut points of a CNN, found from its torch.fx dataflow graph.

A cut point is a module whose output is, at that moment of the forward pass, the only tensor
later layers still need: the head can send that one tensor. The graph is traced one level at
a time (each direct child is a leaf) and we descend into a child only when it is entered with
nothing else alive around it, so a point inside a residual block, where the skip connection
keeps a second tensor alive, is never a cut; the block as a whole is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from pydantic import BaseModel
from torch import fx, nn

from isplit import IsplitError

# Outputs the authors leave out of their curves: they only re-shape the previous layer's signal.
SKIPPED_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.Flatten,
)


class CutPoint(BaseModel):
    """One place the network can be split.

    ``module`` is the qualified name (as in ``named_modules()``) whose output is cut;
    ``output_shape`` is per image (``(C, H, W)`` or ``(F,)``); ``output_bytes`` is that
    tensor's size per image in fp32 bytes.
    """

    module: str
    kind: str
    skipped: bool
    output_shape: list[int]
    output_bytes: int


class _ChildLeafTracer(fx.Tracer):
    """Treats every direct child of the traced module as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return "." not in module_qualified_name


def _trace(module: nn.Module) -> fx.Graph:
    try:
        return _ChildLeafTracer().trace(module)
    except Exception as exc:  # fx raises many error types for untraceable code
        raise IsplitError(f"cannot trace {type(module).__name__} with torch.fx: {exc}") from exc


def _single_tensor_cuts(module: nn.Module, prefix: str) -> list[tuple[str, bool]]:
    """Cut points inside ``module``: ``(qualified name, is the module's own output)``."""
    nodes = list(_trace(module).nodes)
    last_use: dict[fx.Node, int] = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    output_node = next(n for n in nodes if n.op == "output").all_input_nodes
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    found: list[tuple[str, bool]] = []
    for i, node in enumerate(nodes):
        if node.op != "call_module" or calls[node.target] > 1:
            continue  # a module called twice has no unambiguous output to name
        child = module.get_submodule(str(node.target))
        name = prefix + str(node.target)
        live_before = [m for m in nodes[:i] if last_use.get(m, -1) >= i]
        live_after = [m for m in nodes[: i + 1] if last_use.get(m, -1) > i]
        is_output = node in output_node
        single_after = live_after == [node]
        # Descend only when the child's one input is alive nowhere else (no skip around it).
        enters_alone = len(live_before) == 1 and live_before == node.all_input_nodes and last_use[live_before[0]] == i
        inner: list[tuple[str, bool]] = []
        if enters_alone and len(list(child.children())) > 0:
            inner = _single_tensor_cuts(child, name + ".")
        if _is_sequential(child):
            # A container's output is its last child's: name the innermost layer.
            found += [(n, inner_out and is_output) for n, inner_out in inner if not inner_out or single_after]
        else:
            found += [(n, False) for n, inner_out in inner if not inner_out]
            if single_after:
                found.append((name, is_output))
    return found


def _is_sequential(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Sequential)
        or getattr(module, "original_type", "") == "torch.nn.modules.container.Sequential"
    )


def _kind_and_skipped(module: nn.Module) -> tuple[str, bool]:
    """The layer's class name and whether its output is skipped in curves; a layer of a
    torch.export program (``isplit.exported``) answers by its original class."""
    original = getattr(module, "original_type", "")
    if original:
        from isplit.exported import is_skipped_type

        return original.rsplit(".", 1)[-1], is_skipped_type(original, SKIPPED_TYPES)
    return type(module).__name__, isinstance(module, SKIPPED_TYPES)


def find_cut_points(model: nn.Module, input_shape: tuple[int, int, int]) -> list[CutPoint]:
    """All single-tensor cut points of ``model`` in network order (the final output excluded).

    Args:
        model: a classifier traceable by torch.fx.
        input_shape: ``(C, H, W)`` of one input image.
    """
    names = [name for name, is_output in _single_tensor_cuts(model, "") if not is_output]
    shapes = _output_shapes(model, names, input_shape)
    points = []
    for name in names:
        kind, skipped = _kind_and_skipped(model.get_submodule(name))
        shape = shapes[name]
        points.append(
            CutPoint(
                module=name,
                kind=kind,
                skipped=skipped,
                output_shape=shape,
                output_bytes=4 * _numel(shape),
            )
        )
    return points


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _output_shapes(model: nn.Module, names: list[str], input_shape: tuple[int, int, int]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            shapes[name] = list(out.shape[1:])

        return record

    probe_forward(model, input_shape, [(model.get_submodule(n), hook(n)) for n in names])
    return shapes


def probe_forward(
    model: nn.Module, input_shape: Sequence[int], hooks: Sequence[tuple[nn.Module, Callable[..., None]]]
) -> None:
    """Run one zero image of ``input_shape`` ``(C, H, W)`` through ``model`` in eval mode without
    gradients, with each ``(module, forward hook)`` of ``hooks`` registered (in that order)
    for the pass only; the model's mode is restored."""
    handles = [m.register_forward_hook(h) for m, h in hooks]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


class _CutLeafTracer(fx.Tracer):
    """The default tracer, with the cut module kept whole (a block stays one node)."""

    def __init__(self, cut: str) -> None:
        super().__init__()
        self.cut = cut

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.cut or super().is_leaf_module(m, module_qualified_name)


def split_at(model: nn.Module, cut: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split ``model`` after the module ``cut`` into ``(head, tail)`` with ``tail(head(x)) == model(x)``.

    Both share the original parameters (no copy). Raises ``IsplitError`` when ``cut`` is not a
    module of the model or not a single-tensor cut point.
    """
    names = {n for n, _ in model.named_modules()}
    if cut not in names:
        raise IsplitError(f"cut {cut!r} is not a module of this model")
    graph = _CutLeafTracer(cut).trace(model)
    nodes = list(graph.nodes)
    cut_nodes = [n for n in nodes if n.op == "call_module" and n.target == cut]
    if len(cut_nodes) != 1:
        raise IsplitError(f"cut {cut!r} is called {len(cut_nodes)} times in the forward pass; not a cut point")
    cut_node = cut_nodes[0]
    position = nodes.index(cut_node)
    before = set(nodes[: position + 1])
    for node in nodes[position + 1 :]:
        if any(arg in before and arg is not cut_node for arg in node.all_input_nodes):
            raise IsplitError(f"cut {cut!r} is not a single-tensor cut point (a skip connection crosses it)")

    head_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes[: position + 1]:
        env[node] = head_graph.node_copy(node, lambda n: env[n])
    head_graph.output(env[cut_node])

    tail_graph = fx.Graph()
    env = {cut_node: tail_graph.placeholder("code")}
    for node in nodes[position + 1 :]:
        env[node] = tail_graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(model, head_graph, "Head"), fx.GraphModule(model, tail_graph, "Tail")
