"""SmoothQuant: move activation outliers into the weights (a lossless refactoring run before W8A8)."""

from __future__ import annotations

import numpy as np

from ...ir import Graph, Value
from ..calib import Layer, base_name, collect, find_layers, row_source, rows
from ..manager import Pass, PassContext, PassResult, register_pass
from .settings import Quantize


def _fold_into_layer_norm(graph: Graph, node, s: np.ndarray) -> bool:
    """y = LN(x) * w + b; dividing w and b by s divides y's channels by s."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if node.attrs["naxes"] != 1 or any(v is not None and not graph.is_constant(v) for v in (w, b)):
        return False
    dt = node.inputs[0].dtype
    wa = graph.constant(w) if w is not None else np.ones(len(s), dt)
    # new constants, edited into the node in place: constants may be shared (CSE merges equal ones)
    name = base_name(w.name) if w is not None else "ln_weight"
    node.inputs = (
        node.inputs[:1]
        + [graph.add_constant((wa / s).astype(dt), f"{name}_smooth")]
        + (
            [graph.add_constant((graph.constant(b) / s).astype(dt), f"{base_name(b.name)}_smooth")]
            if b is not None
            else []
        )
    )
    return True


def _fold_into_linear(graph: Graph, node, s: np.ndarray) -> bool:
    """A linear layer without activation: dividing its output rows by s divides its output by s."""
    if node.op not in ("linear", "linear_act") or node.attrs.get("act", "none") != "none":
        return False
    if not all(v is None or graph.is_constant(v) for v in node.inputs[1:]):
        return False
    w = graph.constant(node.inputs[1])
    node.set_input(1, graph.add_constant((w / s[:, None]).astype(w.dtype), f"{base_name(node.inputs[1].name)}_smooth"))
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        node.set_input(
            2,
            graph.add_constant(
                (graph.constant(node.inputs[2]) / s).astype(w.dtype), f"{base_name(node.inputs[2].name)}_smooth"
            ),
        )
    return True


def _fold_into_attention(graph: Graph, node, s: np.ndarray) -> bool:
    """Attention output channel j is a mix of value channel j only, so dividing the rows of the linear
    that makes v (or v's slice of a merged q/k/v linear) by s divides the output by s."""
    v = node.inputs[2]
    src = row_source(graph, graph.users(), v)
    if src is None or src[0].attrs.get("act", "none") != "none" or v is node.inputs[0] or v is node.inputs[1]:
        return False
    lin, start, end = src
    w = graph.constant(lin.inputs[1]).copy()
    w[start:end] /= s[:, None]
    lin.set_input(1, graph.add_constant(w, f"{base_name(lin.inputs[1].name)}_smooth"))
    if len(lin.inputs) > 2 and lin.inputs[2] is not None:
        b = graph.constant(lin.inputs[2]).copy()
        b[start:end] /= s
        lin.set_input(2, graph.add_constant(b, f"{base_name(lin.inputs[2].name)}_smooth"))
    return True


FOLD_INTO = {
    "layer_norm": _fold_into_layer_norm,
    "linear": _fold_into_linear,
    "linear_act": _fold_into_linear,
    "attention": _fold_into_attention,
}


def _scale_consumer(graph: Graph, node, s: np.ndarray) -> None:
    """Multiply the weight columns that meet input channel j by s[j] (reads the current weight: a
    layer may already have had its rows divided as the producer of another smoothed input)."""
    w = graph.constant(node.inputs[1])
    scaled = w * (s[None, :] if node.op != "matmul" else s[:, None])  # matmul weights are [K, N]
    node.set_input(1, graph.add_constant(scaled.astype(w.dtype), f"{base_name(node.inputs[1].name)}_smooth"))


def _current_weight(graph: Graph, layer: Layer) -> np.ndarray:
    w = graph.constant(layer.node.inputs[1])
    return w.T if layer.node.op == "matmul" else w


@register_pass
class SmoothQuant(Pass):
    """x W^T = (x / s)(W s)^T: per input channel s = max|x|^a / max|W|^(1-a) is folded into the op making
    x (LayerNorm affine or a linear layer without activation) and into every linear reading x, so no op
    is added. Only where every user of x is such a linear. Exact up to float rounding, so lossless."""

    name = "smoothquant"
    lossy = False
    Options = Quantize
    # smoothing works on float linears: after quantization there are none left to smooth
    runs_before = (
        "quantize",
        "quantize_int8",
        "quantize_int4_rtn",
        "quantize_int4_gptq",
        "quantize_w8a8",
        "quantize_w8a8_static",
        "quantize_mixed",
    )

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg = self.options
        alpha = cfg.smooth or 0.5
        layers = find_layers(graph, ("linear",), cfg.exclude)
        users = graph.users()
        groups: dict[Value, list[Layer]] = {}
        for layer in layers:
            groups.setdefault(layer.x, []).append(layer)
        foldable = {
            x: ls
            for x, ls in groups.items()
            if x.producer is not None
            and x.producer.op in FOLD_INTO
            and x not in graph.outputs
            and {id(u) for u in users.get(x, [])} == {id(l.node) for l in ls}
        }
        if not foldable:
            return PassResult(False, {"smoothed": 0})
        amax = {
            x: np.max(np.abs(rows(arrs, x.shape[-1])), axis=0)
            for x, arrs in collect(graph, ctx, list(foldable), "smoothquant").items()
        }
        done = []
        for x, ls in foldable.items():
            wmax = np.max([np.max(np.abs(_current_weight(graph, l)), axis=0) for l in ls], axis=0)
            s = np.where((amax[x] > 0) & (wmax > 0), amax[x] ** alpha / np.maximum(wmax, 1e-12) ** (1 - alpha), 1.0)
            s = np.clip(s, 1e-4, 1e4)
            if not FOLD_INTO[x.producer.op](graph, x.producer, s):
                continue
            for layer in ls:
                _scale_consumer(graph, layer.node, s)
            done.append(
                {
                    "input": x.name,
                    "layers": [l.name for l in ls],
                    "alpha": alpha,
                    "act_range_before": float(amax[x].max()),
                    "act_range_after": float((amax[x] / s).max()),
                }
            )
        graph.remove_unused_constants()
        return PassResult(bool(done), {"smoothed": len(done), "groups": done})
