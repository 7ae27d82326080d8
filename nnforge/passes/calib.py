"""What the lossy passes share: finding weight layers, collecting calibration activations, sizes.

A *layer* is a node with a constant weight that a low-bit or sparsity pass may rewrite:
``linear``/``linear_act`` (weight [N, K]), ``matmul`` by a constant 2-D matrix (weight = its
transpose), ``conv2d`` (weight flattened to [O, C/groups*kh*kw]) and ``gather`` from a constant
table (an embedding, [V, D]). Layers are named after their weight constant, which keeps the
model's parameter names (``encoder_layer_0_attention_self_query_weight``) in reports.

Calibration activations come from the reference interpreter run with ``keep_all=True`` over
``ctx.calibration`` (a list of input lists), or ``ctx.sample_inputs`` when no calibration was given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..errors import NnforgeError
from ..ir import Graph, Node, Value, interpret
from ..ops.conv import conv2d
from .manager import PassContext

FLOATS = ("float32", "float64", "float16")
_DERIVED = re.compile(r"(_(pruned|sparse|smooth)(_\d+)?)+$")  # suffixes the lossy passes add to rewritten weights


def base_name(name: str) -> str:
    """The model's parameter name behind a rewritten weight (``fc1_weight_pruned_12`` -> ``fc1_weight``)."""
    return _DERIVED.sub("", name) or name


@dataclass
class Layer:
    node: Node
    kind: str  # linear | conv | embedding
    name: str
    weight: np.ndarray  # [N, K] float (a view for linear and gather; a flattened copy for conv)
    conv_shape: tuple | None = None  # conv only: the 4-D weight shape
    key: Value | None = None  # the activation input when the layer was found: calibration arrays are keyed by it

    def __post_init__(self):
        if self.key is None:
            self.key = self.x

    @property
    def x(self) -> Value | None:
        """The activation the weight multiplies now (None for embeddings); rewriting an earlier layer
        re-routes it, so calibration data is looked up by ``key`` instead."""
        return None if self.kind == "embedding" else self.node.inputs[0]

    @property
    def bias(self) -> Value | None:
        if self.node.op in ("linear", "linear_act", "conv2d") and len(self.node.inputs) > 2:
            return self.node.inputs[2]
        return None

    @property
    def act(self) -> str:
        return self.node.attrs.get("act", "none")

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    def apply(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The layer's product of ``x`` (calibration input) with a candidate weight [N, K], no bias/act."""
        return _APPLY[self.kind](self, x, w)


def _apply_linear(layer, x, w):
    return np.matmul(x.reshape(-1, w.shape[1]), w.T)


def _apply_conv(layer, x, w):
    a = layer.node.attrs
    w4 = w.reshape(layer.conv_shape)
    return conv2d.ref(x, w4.astype(x.dtype), None, a["stride"], a["padding"], a["dilation"], a["groups"])


def _apply_embedding(layer, idx, w):
    return w[np.asarray(idx).reshape(-1)]


_APPLY = {"linear": _apply_linear, "conv": _apply_conv, "embedding": _apply_embedding}


def _const_float(g: Graph, v: Value | None, rank: int) -> bool:
    return v is not None and g.is_constant(v) and v.type.rank == rank and v.dtype in FLOATS


def _linear_layer(g: Graph, n: Node):
    if (
        _const_float(g, n.inputs[1], 2)
        and not g.is_constant(n.inputs[0])
        and (len(n.inputs) < 3 or n.inputs[2] is None or g.is_constant(n.inputs[2]))
    ):
        return Layer(n, "linear", base_name(n.inputs[1].name), g.constant(n.inputs[1]))
    return None


def _matmul_layer(g: Graph, n: Node):
    if _const_float(g, n.inputs[1], 2) and not g.is_constant(n.inputs[0]):
        return Layer(n, "linear", base_name(n.inputs[1].name), np.ascontiguousarray(g.constant(n.inputs[1]).T))
    return None


def _conv_layer(g: Graph, n: Node):
    if not (
        _const_float(g, n.inputs[1], 4) and (len(n.inputs) < 3 or n.inputs[2] is None or g.is_constant(n.inputs[2]))
    ):
        return None
    w = g.constant(n.inputs[1])
    return Layer(n, "conv", base_name(n.inputs[1].name), w.reshape(w.shape[0], -1), tuple(w.shape))


def _embedding_layer(g: Graph, n: Node):
    if _const_float(g, n.inputs[0], 2) and n.attrs.get("axis", 0) == 0 and not g.is_constant(n.inputs[1]):
        return Layer(n, "embedding", base_name(n.inputs[0].name), g.constant(n.inputs[0]))
    return None


# op -> how to see its weight; ops not here are never touched by the lossy weight passes
LAYER_OPS = {
    "linear": _linear_layer,
    "linear_act": _linear_layer,
    "matmul": _matmul_layer,
    "conv2d": _conv_layer,
    "gather": _embedding_layer,
}


def find_layers(graph: Graph, kinds: Iterable[str] = ("linear",), exclude: Sequence[str] = ()) -> list[Layer]:
    """Weight layers of the given kinds, in graph order; names containing an ``exclude`` entry are skipped."""
    kinds = set(kinds)
    out = []
    for n in graph.nodes:
        find = LAYER_OPS.get(n.op)
        layer = find(graph, n) if find else None
        if layer is not None and layer.kind in kinds and not any(e and e in layer.name for e in exclude):
            out.append(layer)
    return out


def calibration_batches(ctx: PassContext, what: str) -> list[list[np.ndarray]]:
    batches = ctx.calibration or ([ctx.sample_inputs] if ctx.sample_inputs is not None else [])
    if not batches:
        raise NnforgeError(
            f"{what} needs calibration data: pass calibration=[inputs, ...] "
            f"(or sample inputs) to nnforge.compile / PassContext"
        )
    return [list(b) for b in batches]


def collect(graph: Graph, ctx: PassContext, values: Sequence[Value], what: str) -> dict[Value, list[np.ndarray]]:
    """Run the interpreter over the calibration batches; the arrays each of ``values`` took, per batch."""
    wanted = [v for v in dict.fromkeys(values) if v is not None]
    out: dict[Value, list[np.ndarray]] = {v: [] for v in wanted}
    for batch in calibration_batches(ctx, what):
        _, vals = interpret(graph, batch, keep_all=True)
        for v in wanted:
            out[v].append(vals[v])
    return out


def rows(arrays: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Calibration activations of a linear layer as one [tokens, K] float64 matrix."""
    return np.concatenate([np.asarray(a, np.float64).reshape(-1, k) for a in arrays], axis=0)


def channel_rows(layer: Layer, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """[tokens, K] activation rows matching the layer's weight columns (conv: per input channel, each
    repeated over the kernel window, which is exact for 1x1 kernels and a proxy otherwise)."""
    if layer.kind == "linear":
        return rows(arrays, layer.shape[1])
    c = layer.conv_shape[1] * layer.node.attrs["groups"]
    per_ch = np.concatenate([np.moveaxis(np.asarray(a, np.float64), 1, -1).reshape(-1, c) for a in arrays])
    g = layer.node.attrs["groups"]
    cg = layer.conv_shape[1]
    kk = layer.conv_shape[2] * layer.conv_shape[3]
    # a group's weight columns see only that group's channels; use the first group's (groups=1 is the usual case)
    return np.repeat(per_ch[:, :cg] if g > 1 else per_ch, kk, axis=1)


def relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    """||got - ref|| / ||ref|| (Frobenius), 0 when ref is all zeros and got equals it."""
    ref = np.asarray(ref, np.float64)
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(np.asarray(got, np.float64) - ref))
    return num / den if den > 0 else num


def layer_error(layer: Layer, inputs: Sequence[np.ndarray] | None, w_new: np.ndarray) -> float:
    """Relative error of the layer's output on its calibration inputs (weight-space error without them)."""
    if not inputs:
        return relative_error(layer.weight, w_new)
    ref = [layer.apply(np.asarray(x), layer.weight) for x in inputs]
    got = [layer.apply(np.asarray(x), w_new) for x in inputs]
    return relative_error(np.concatenate([r.reshape(-1) for r in ref]), np.concatenate([g.reshape(-1) for g in got]))


def plain_linear(graph: Graph, node: Node | None) -> bool:
    """linear/linear_act with constant weight and bias (rows can be dropped independently)."""
    return (
        node is not None
        and node.op in ("linear", "linear_act")
        and graph.is_constant(node.inputs[1])
        and all(v is None or graph.is_constant(v) for v in node.inputs[2:])
    )


def row_source(graph: Graph, users: dict, v: Value):
    """When ``v`` is exactly output channels [start, end) of a constant-weight linear (directly, or by a
    last-axis slice of it, as merge_qkv and packed qkv produce, maybe after row slices) and only its one
    user reads it:
    (linear node, start, end). Else None."""
    p = v.producer
    if p is None or len(users.get(v, [])) != 1 or v in graph.outputs:
        return None
    if plain_linear(graph, p):
        return p, 0, v.shape[-1]
    if p.op != "slice" or p.attrs["step"] != 1:
        return None
    src = p.inputs[0]
    if p.attrs["axis"] not in (-1, src.type.rank - 1) or not isinstance(p.attrs["end"], int):
        return None
    while True:  # through row slices (sink_slices keeps only the rows a block reads) to the linear
        if src in graph.outputs or any(u.op != "slice" for u in users.get(src, [])):
            return None
        lin = src.producer
        if plain_linear(graph, lin):
            break
        if lin is None or lin.op != "slice" or lin.attrs["axis"] in (-1, src.type.rank - 1):
            return None
        src = lin.inputs[0]
    n = src.shape[-1]
    start, end = p.attrs["start"], min(p.attrs["end"], n)
    return (lin, start, end) if 0 <= start < end else None


def constant_bytes(graph: Graph) -> int:
    return int(sum(a.nbytes for a in graph.constants.values()))


def replace_node(graph: Graph, old: Node, op: str, inputs: Sequence[Value | None], attrs: dict) -> Node:
    """Put a new node where ``old`` was (same name hint and source line) and route its users to it."""
    new = graph.add_node(op, list(inputs), attrs, name=old.output.name, source=old.source, before=old)
    graph.replace_all_uses(old.output, new.output)
    graph.remove_node(old)
    return new


# ---------------------------------------------------------------------------------------
# per-layer report lines (for CompiledModel.report)
# ---------------------------------------------------------------------------------------


def _did(rec: dict) -> str:
    """What a lossy pass did to one layer, from its stats record, in a few words."""
    if "skipped" in rec:
        return f"kept: {rec['skipped']}"
    if "bits" in rec:
        if rec["bits"] == 32:
            return "kept float"
        act = {
            "dynamic": " + int8 act/token",
            "dynamic_tensor": " + uint8 act/tensor",
            "static": " + uint8 act (static)",
        }.get(rec.get("activations", "none"), "")
        group = f" g{rec['group_size']}" if rec["bits"] == 4 else ""
        return f"int{rec['bits']}{group} {rec.get('method', 'rtn')}{act}"
    if "sparsity" in rec:
        return f"{rec['pattern']} {rec['method']} {rec['sparsity']:.0%} zeros"
    if "heads_removed" in rec:
        return f"{rec['heads_removed']} of {rec.get('heads', '?')} heads removed"
    if "neurons_removed" in rec:
        return f"{rec['neurons_removed']} of {rec['neurons']} neurons removed"
    if "density" in rec:
        return f"CSR ({rec['density']:.0%} dense)"
    return ""


def layer_rows(records) -> list[dict]:
    """One row per layer a pass reported on: pass, layer, what was done, relative error on calibration data
    (None where not measured). ``records`` are the PassManager's PassRecords."""
    rows_out = []
    for r in records:
        for rec in (r.stats or {}).get("layers", []):
            rows_out.append(
                {"pass": r.name, "layer": rec.get("name", ""), "done": _did(rec), "rel_error": rec.get("rel_error")}
            )
    return rows_out
