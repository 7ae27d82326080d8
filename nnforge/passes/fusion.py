"""Lossless fusion passes, written as rewrite rules (see pattern.py).

Each rule is a pattern, an optional check and a replacement; each pass is a list of rules.
"""

from __future__ import annotations

import math

import numpy as np

from ..ir import Graph, Node, get_op
from .cleanup import CANONICAL_RULES
from .manager import Pass, PassContext, PassResult, register_pass
from .pattern import ANY, Bind, OneOf, Opt, P, RewritePass, Rule


def _consts(g: Graph, m, *names) -> bool:
    return all(g.is_constant(m[n]) for n in names)


def _value(g: Graph, v) -> np.ndarray:
    return g.constant(v)


def _is_scalar(g: Graph, v, target: float, tol: float = 1e-6) -> bool:
    if not g.is_constant(v):
        return False
    a = g.constant(v)
    return a.size == 1 and abs(float(a.reshape(-1)[0]) - target) <= tol * max(1.0, abs(target))


# ---------------------------------------------------------------------------------------
# BatchNorm folding and constant scale/shift chains
# ---------------------------------------------------------------------------------------


def _bn_check(m, g):
    bn, conv = m.node("bn"), m.node("conv")
    return all(g.is_constant(v) for v in bn.inputs[1:] if v is not None) and all(
        g.is_constant(v) for v in conv.inputs[1:] if v is not None
    )


def _bn_build(m, b):
    bn, conv = m.node("bn"), m.node("conv")
    g = b.graph
    mean, var = g.constant(bn.inputs[1]), g.constant(bn.inputs[2])
    gamma = g.constant(bn.inputs[3]) if len(bn.inputs) > 3 and bn.inputs[3] is not None else np.ones_like(mean)
    beta = g.constant(bn.inputs[4]) if len(bn.inputs) > 4 and bn.inputs[4] is not None else np.zeros_like(mean)
    w = g.constant(conv.inputs[1])
    bias = g.constant(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else np.zeros_like(mean)
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + bn.attrs["eps"])
    new_w = (w * scale.reshape(-1, 1, 1, 1)).astype(w.dtype)
    new_b = ((bias - mean) * scale + beta).astype(w.dtype)
    return b.op("conv2d", conv.inputs[0], b.const(new_w, "w_bn"), b.const(new_b, "b_bn"), **conv.attrs)


FOLD_BN = Rule("fold_batchnorm", P("batch_norm", P("conv2d", bind="conv"), ..., bind="bn"), _bn_build, _bn_check)


def _chain_check(m, g):
    if not _consts(g, m, "c1", "c2") or g.is_constant(m["x"]):
        return False
    both = np.broadcast_shapes(g.constant(m["c1"]).shape, g.constant(m["c2"]).shape)
    return len(both) <= len(m["x"].shape)  # merging must not widen the result


def _chain(op, combine):
    return Rule(
        f"fold_{op}_chain",
        P(op, P(op, "x", "c1", commutative=True), "c2", commutative=True),
        lambda m, b: b.op(op, m["x"], b.const(combine(b.constant_of(m["c1"]), b.constant_of(m["c2"])), f"{op}_c")),
        _chain_check,
    )


def _float_const(m, g, name="c"):
    return g.is_constant(m[name]) and g.constant(m[name]).dtype.kind == "f" and not g.is_constant(m["x"])


DIV_TO_MUL = Rule(
    "div_to_mul",
    P("div", "x", "c"),
    lambda m, b: b.op("mul", m["x"], b.const((1.0 / b.constant_of(m["c"])).astype(b.constant_of(m["c"]).dtype), "inv")),
    _float_const,
)
SUB_TO_ADD = Rule(
    "sub_to_add",
    P("sub", "x", "c"),
    lambda m, b: b.op("add", m["x"], b.const(-b.constant_of(m["c"]), "neg")),
    _float_const,
)


def _scale_into_linear_check(m, g):
    if not _consts(g, m, "w", "c") or (m.get("b") is not None and not g.is_constant(m["b"])):
        return False
    c = g.constant(m["c"])
    out = g.constant(m["w"]).shape[0]
    return c.size == 1 or (c.ndim >= 1 and c.shape[-1] == out and c.size == out)


def _scale_into_linear(m, b):
    w, c = b.constant_of(m["w"]), b.constant_of(m["c"]).reshape(-1)
    args = [m["x"], b.const((w * c[:, None]).astype(w.dtype), "w_scaled")]
    if m.get("b") is not None:
        args.append(b.const((b.constant_of(m["b"]) * c).astype(w.dtype), "b_scaled"))
    return b.op("linear", *args)


SCALE_INTO_LINEAR = Rule(
    "fold_scale_into_linear",
    P("mul", P("linear", "x", "w", Opt("b")), "c", commutative=True),
    _scale_into_linear,
    _scale_into_linear_check,
)


def _shift_check(m, g):
    return (
        _consts(g, m, "w", "b", "c")
        and g.constant(m["c"]).size == g.constant(m["b"]).size == g.constant(m["c"]).shape[-1]
    )


SHIFT_INTO_LINEAR = Rule(
    "fold_shift_into_linear",
    P("add", P("linear", "x", "w", "b"), "c", commutative=True),
    lambda m, b: b.op(
        "linear", m["x"], m["w"], b.const(b.constant_of(m["b"]) + b.constant_of(m["c"]).reshape(-1), "bias")
    ),
    _shift_check,
)


@register_pass
class FoldConstantChains(RewritePass):
    """Fold BatchNorm into the preceding conv; merge constant mul/add chains; fold scales into linear weights."""

    name = "fold_constant_chains"
    rules = [
        FOLD_BN,
        DIV_TO_MUL,
        SUB_TO_ADD,
        _chain("mul", np.multiply),
        _chain("add", np.add),
        SCALE_INTO_LINEAR,
        SHIFT_INTO_LINEAR,
    ]


# ---------------------------------------------------------------------------------------
# linear + bias + activation
# ---------------------------------------------------------------------------------------


def _matmul_to_linear_check(m, g):
    return g.is_constant(m["w"]) and g.constant(m["w"]).ndim == 2


def _bias_check(m, g):
    if not g.is_constant(m["b"]) or not g.is_constant(m["w"]):
        return False
    bias = g.constant(m["b"])
    return bias.ndim >= 1 and bias.size == g.constant(m["w"]).shape[0] and bias.shape[-1] == bias.size


MATMUL_TO_LINEAR = Rule(
    "matmul_to_linear",
    P("matmul", "x", "w"),
    lambda m, b: b.op("linear", m["x"], b.const(np.ascontiguousarray(b.constant_of(m["w"]).T), "w_t")),
    _matmul_to_linear_check,
)
BIAS_INTO_LINEAR = Rule(
    "bias_into_linear",
    P("add", P("linear", "x", "w"), "b", commutative=True),
    lambda m, b: b.op("linear", m["x"], m["w"], b.const(b.constant_of(m["b"]).reshape(-1), "bias")),
    _bias_check,
)


_ACTIVATION_OPS = {
    "relu": ("relu", {}),
    "gelu": ("gelu", {"approximate": "none"}),
    "gelu_tanh": ("gelu", {"approximate": "tanh"}),
    "silu": ("silu", {}),
}


def _act_rules():
    return [
        Rule(
            f"linear_{act}",
            P(op, P("linear", "x", "w", Opt("b")), **attrs),
            lambda m, b, act=act: b.op("linear_act", *[m[k] for k in ("x", "w", "b") if k in m], act=act),
        )
        for act, (op, attrs) in _ACTIVATION_OPS.items()
    ]


@register_pass
class FuseLinearActivation(RewritePass):
    """matmul by a constant -> linear; linear + bias add + relu/gelu/gelu_tanh/silu -> one linear_act."""

    name = "fuse_linear_act"
    rules = [MATMUL_TO_LINEAR, BIAS_INTO_LINEAR, *_act_rules()]


# ---------------------------------------------------------------------------------------
# normalisations and GELU written out elementwise
# ---------------------------------------------------------------------------------------


def _last_axis_mean(**extra):
    return dict(axes=Bind("axes"), keepdims=True, **extra)


def _ln_check(m, g):
    return m["axes"] in ([-1], [len(m["x"].shape) - 1]) and _consts(g, m, "eps") and g.constant(m["eps"]).size == 1


def _ln_build(m, b):
    return b.op("layer_norm", m["x"], naxes=1, eps=float(b.constant_of(m["eps"]).reshape(-1)[0]))


_MEAN = P("reduce_mean", "x", **_last_axis_mean())
_CENTERED = P("sub", "x", _MEAN, bind="centered")
_VAR = P("reduce_mean", P(("mul", "pow"), "centered", ANY), axes=Bind("axes2"), keepdims=True)
LAYER_NORM = Rule(
    "layer_norm",
    P("div", _CENTERED, P("sqrt", P("add", _VAR, "eps", commutative=True))),
    _ln_build,
    lambda m, g: _ln_check(m, g) and m["axes2"] == m["axes"],
    allow_shared=("centered",),
)
LAYER_NORM_RSQRT = Rule(
    "layer_norm",
    P("mul", _CENTERED, P("rsqrt", P("add", _VAR, "eps", commutative=True)), commutative=True),
    _ln_build,
    lambda m, g: _ln_check(m, g) and m["axes2"] == m["axes"],
    allow_shared=("centered",),
)
RMS_NORM = Rule(
    "rms_norm",
    P(
        "mul",
        "x",
        P(
            "rsqrt",
            P("add", P("reduce_mean", P(("mul", "pow"), "x", ANY), **_last_axis_mean()), "eps", commutative=True),
        ),
        commutative=True,
    ),
    lambda m, b: b.op("rms_norm", m["x"], naxes=1, eps=float(b.constant_of(m["eps"]).reshape(-1)[0])),
    _ln_check,
)


def _norm_affine_check(m, g):
    return (
        _consts(g, m, "w")
        and g.constant(m["w"]).shape[-1:] == tuple(m["x"].shape[-1:])
        and g.constant(m["w"]).ndim == 1
    )


def _norm_affine(op):
    inner = P(op, "x", bind="norm")

    def build(m, b):
        n = m.node("norm")
        args = [n.inputs[0], m["w"]] + ([m["b"]] if "b" in m and op == "layer_norm" else [])
        return b.op(op, *args, **n.attrs)

    rules = [
        Rule(
            f"{op}_affine",
            P("mul", inner, "w", commutative=True),
            build,
            lambda m, g: len(m.node("norm").inputs) == 1 and _norm_affine_check(m, g),
        )
    ]
    if op == "layer_norm":
        rules.append(
            Rule(
                "layer_norm_shift",
                P("add", P(op, "x", "w", bind="norm"), "b", commutative=True),
                build,
                lambda m, g: _consts(g, m, "b") and g.constant(m["b"]).ndim == 1 and _norm_affine_check(m, g),
            )
        )
    return rules


def _gelu_check(m, g):
    return (
        _is_scalar(g, m["half"], 0.5)
        and _is_scalar(g, m["inv_sqrt2"], 1 / math.sqrt(2), 1e-4)
        and _is_scalar(g, m["one"], 1.0)
    )


_ERF = P("add", P("erf", P("mul", "x", "inv_sqrt2", commutative=True)), "one", commutative=True)
# x * 0.5 * (1 + erf(x / sqrt(2))), the half applied first or last
GELU = Rule(
    "gelu",
    OneOf(
        P("mul", P("mul", "x", "half", commutative=True), _ERF, commutative=True),
        P("mul", P("mul", "x", _ERF, commutative=True), "half", commutative=True),
    ),
    lambda m, b: b.op("gelu", m["x"], approximate="none"),
    _gelu_check,
)
SILU = Rule("silu", P("mul", "x", P("sigmoid", "x"), commutative=True), lambda m, b: b.op("silu", m["x"]))


@register_pass
class RecognizeElementwise(RewritePass):
    """LayerNorm, RMSNorm, GELU and SiLU written out elementwise -> single ops (after div->mul canonical forms)."""

    name = "recognize_norms"
    rules = [
        DIV_TO_MUL,
        LAYER_NORM,
        LAYER_NORM_RSQRT,
        RMS_NORM,
        *_norm_affine("layer_norm"),
        *_norm_affine("rms_norm"),
        GELU,
        SILU,
    ]


# ---------------------------------------------------------------------------------------
# q/k/v projections that share an input -> one matmul
# ---------------------------------------------------------------------------------------


@register_pass
class MergeSiblingLinears(Pass):
    """Linear layers reading the same input with constant weights become one wider linear + slices."""

    name = "merge_qkv"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        groups: dict = {}
        for n in graph.nodes:
            if n.op == "linear" and all(graph.is_constant(v) for v in n.inputs[1:] if v is not None):
                key = (n.inputs[0], len(n.inputs) > 2 and n.inputs[2] is not None)
                groups.setdefault(key, []).append(n)
        merged = 0
        for (x, has_bias), nodes in groups.items():
            if len(nodes) < 2:
                continue
            first = nodes[0]
            ws = [graph.constant(n.inputs[1]) for n in nodes]
            w = graph.add_constant(np.concatenate(ws, axis=0), "w_merged")
            args = [x, w]
            if has_bias:
                args.append(
                    graph.add_constant(np.concatenate([graph.constant(n.inputs[2]) for n in nodes]), "b_merged")
                )
            wide = graph.add_node("linear", args, name="linear_merged", source=first.source, before=first).output
            start = 0
            for n, wi in zip(nodes, ws):
                part = graph.add_node(
                    "slice",
                    [wide],
                    {"axis": -1, "start": start, "end": start + wi.shape[0]},
                    name=n.output.name,
                    source=n.source,
                    before=first,
                ).output
                graph.replace_all_uses(n.output, part)
                start += wi.shape[0]
            for n in nodes:
                graph.remove_node(n)
            merged += len(nodes)
        graph.remove_unused_constants()
        return PassResult(bool(merged), {"linears_merged": merged})


# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------


def _scalar_of(g: Graph, v) -> float | None:
    if v is None or not g.is_constant(v) or g.constant(v).size != 1:
        return None
    return float(g.constant(v).reshape(-1)[0])


def _sdpa_check(m, g):
    q, kt, v = m["q"], m["kt"], m["v"]
    if not (q.type.rank == kt.type.rank == v.type.rank >= 3) or m["axis"] not in (-1, q.type.rank - 1):
        return False
    if "s" in m and _scalar_of(g, m["s"]) is None:
        return False
    return "mask" not in m or m["mask"].dtype == q.dtype


def _sdpa_build(m, b):
    rank = m["kt"].type.rank
    swap = list(range(rank - 2)) + [rank - 1, rank - 2]
    k = b.op("permute", m["kt"], perm=swap)
    scale = _scalar_of(b.graph, m["s"]) if "s" in m else 1.0
    args = [m["q"], k, m["v"]] + ([m["mask"]] if "mask" in m else [])
    return b.op("sdpa", *args, scale=scale)


# q k^T scaled after or before the matmul (or not at all), then maybe masked
_SCORES = OneOf(
    P("mul", P("matmul", "q", "kt"), "s", commutative=True),
    P("matmul", P("mul", "q", "s", commutative=True), "kt"),
    P("matmul", "q", "kt"),
)
_MASKED = OneOf(_SCORES, P("add", _SCORES, "mask", commutative=True))
SDPA = Rule("sdpa", P("matmul", P("softmax", _MASKED, axis=Bind("axis")), "v"), _sdpa_build, _sdpa_check)


def _heads(name):
    """[B, S, H*D] -> [B, H, S, D]: how models split heads."""
    return P("permute", P("reshape", name, shape=Bind(f"{name}_split")), perm=[0, 2, 1, 3])


def _attention_check(m, g):
    splits = [m[f"{n}_split"] for n in ("q", "k", "v")]
    if any(len(s) != 4 or not isinstance(s[2], int) or not isinstance(s[3], int) for s in splits):
        return False
    heads = {s[2] for s in splits}
    if len(heads) != 1 or any(m[n].type.rank != 3 for n in ("q", "k", "v")):
        return False
    out = m["out_shape"]
    return len(out) == 3 and out[-1] == splits[2][2] * splits[2][3] and m["q"].shape[-1] == splits[0][2] * splits[0][3]


def _attention_build(m, b):
    sdpa = m.node("sdpa")
    mask = sdpa.inputs[3:4]
    return b.op(
        "attention",
        m["q"],
        m["k"],
        m["v"],
        *[x for x in mask if x is not None],
        num_heads=m["q_split"][2],
        scale=sdpa.attrs["scale"],
        is_causal=sdpa.attrs["is_causal"],
    )


ATTENTION = Rule(
    "attention",
    P(
        "reshape",
        P("permute", P("sdpa", _heads("q"), _heads("k"), _heads("v"), ..., bind="sdpa"), perm=[0, 2, 1, 3]),
        shape=Bind("out_shape"),
    ),
    _attention_build,
    _attention_check,
)


def _unpack_check(m, g):
    shp, x = m["packed"], m["x"]
    return (
        len(shp) == 5
        and x.type.rank == 3
        and all(isinstance(d, int) for d in shp[2:])
        and m["j"] == m["i"] + 1
        and isinstance(x.shape[-1], int)
        and x.shape[-1] == shp[2] * shp[3] * shp[4]
    )


def _unpack_build(m, b):
    shp, i = m["packed"], m["i"]
    width = shp[3] * shp[4]
    part = b.op("slice", m["x"], axis=-1, start=i * width, end=(i + 1) * width)
    return b.op("permute", b.op("reshape", part, shape=[shp[0], shp[1], shp[3], shp[4]]), perm=[0, 2, 1, 3])


# timm-style packed q/k/v: reshape(x, [B, S, 3, H, D]).permute(2, 0, 3, 1, 4)[i]
UNPACK_QKV = Rule(
    "unpack_qkv",
    P(
        "squeeze",
        P(
            "slice",
            P("permute", P("reshape", "x", shape=Bind("packed"), bind="split"), perm=[2, 0, 3, 1, 4], bind="perm"),
            axis=0,
            start=Bind("i"),
            end=Bind("j"),
            step=1,
        ),
        axes=[0],
    ),
    _unpack_build,
    _unpack_check,
    allow_shared=("perm", "split"),
)


@register_pass
class FuseAttention(RewritePass):
    """softmax(q k^T * scale + mask) v -> sdpa; head split/merge around it -> one attention op on [B, S, H*D]."""

    name = "fuse_attention"
    rules = [UNPACK_QKV, SDPA, *CANONICAL_RULES, ATTENTION]


# ---------------------------------------------------------------------------------------
# slices sink toward the inputs: rows nobody reads are never computed
# ---------------------------------------------------------------------------------------


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _slice_key(n: Node) -> tuple:
    a = n.attrs
    return _axis(a["axis"], n.output.type.rank), a["start"], a["end"], a["step"]


def _row_wise(p: Node, axis: int) -> bool:
    """Whether row `axis` of p's output depends only on the same rows of p's inputs sliced along it."""
    rank = p.output.type.rank
    if p.op in ("linear", "linear_act"):
        return axis < rank - 1
    if p.op in ("layer_norm", "rms_norm"):
        return axis < rank - p.attrs["naxes"]
    if p.op == "attention":  # rows of the queries; keys and values stay whole
        return axis == 1 and len(p.inputs) == 3 and not p.attrs["is_causal"]
    if p.op == "slice":  # a slice on the last axis moves after one on another axis (one order, no ping-pong)
        return _axis(p.attrs["axis"], rank) == rank - 1 and axis != rank - 1
    return get_op(p.op).kind == "elementwise"


@register_pass
class SinkSlices(Pass):
    """slice(f(x)) -> f(slice(x)) for row-wise f (linear, norms, elementwise, attention queries), when every user
    of f reads the same slice: e.g. a ViT's last block runs its MLP and attention queries on the class token only."""

    name = "sink_slices"
    invalidates = ("blocks",)  # it trims the last block to the rows read after it: block analysis misses it

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        moved = 0
        pending = [n for n in graph.nodes if n.op == "slice"]
        while pending:  # rounds in node order; a move puts the slices around it on the next round
            batch = sorted({s for s in pending if graph.contains(s)}, key=graph.order_key)
            pending = []
            for s in batch:
                p = s.inputs[0].producer if graph.contains(s) else None
                if p is None or len(p.outputs) != 1 or not graph.contains(p) or s.inputs[0] in graph.outputs:
                    continue
                key = _slice_key(s)
                group = graph.users_of(s.inputs[0])
                if not _row_wise(p, key[0]) or any(u.op != "slice" or _slice_key(u) != key for u in group):
                    continue
                new = self._push(graph, p, group, key)
                moved += 1
                # slices whose input lost p as a reader, and slices of the moved op, may move now
                near = [v for v in p.inputs if v is not None] + [new]
                pending += [u for v in near for u in graph.users_of(v) if u.op == "slice"]
        return PassResult(bool(moved), {"slices_sunk": moved})

    @staticmethod
    def _cut(graph: Graph, v, key, out_rank: int, before: Node):
        """v sliced like the output along key's axis (v broadcasts to the output from the right)."""
        axis, start, end, step = key
        ax = axis - (out_rank - v.type.rank)
        if ax < 0 or v.shape[ax] == 1:  # broadcast along the axis: every row reads all of v
            return v
        if graph.is_constant(v) and isinstance(end, int):
            idx = [slice(None)] * v.type.rank
            idx[ax] = slice(start, end, step)
            return graph.add_constant(np.ascontiguousarray(graph.constant(v)[tuple(idx)]), v.name + "_rows")
        return graph.add_node(
            "slice", [v], {"axis": ax, "start": start, "end": end, "step": step}, name=v.name + "_rows", before=before
        ).output

    def _push(self, graph: Graph, p: Node, group: list[Node], key):
        rank = p.output.type.rank
        if p.op in ("linear", "linear_act", "layer_norm", "rms_norm", "attention", "slice"):
            ins = [self._cut(graph, p.inputs[0], key, rank, p)] + list(p.inputs[1:])
        else:
            ins = [i if i is None else self._cut(graph, i, key, rank, p) for i in p.inputs]
        new = graph.add_node(p.op, ins, dict(p.attrs), name=p.output.name, source=p.source, before=p).output
        for s in group:
            graph.replace_all_uses(s.output, new)
            graph.remove_node(s)
        graph.remove_node(p)
        return new


# ---------------------------------------------------------------------------------------
# chains of elementwise ops -> one elementwise_region
# ---------------------------------------------------------------------------------------


def _chainable(n: Node) -> bool:
    return len(n.outputs) == 1 and n.op != "elementwise_region" and get_op(n.op).kind == "elementwise"


@register_pass
class FuseElementwise(Pass):
    """Maximal chains of elementwise ops, each value read only by the next op, become one elementwise_region
    (not in the default pipelines: backends fuse such chains themselves; this makes the grouping explicit)."""

    name = "fuse_elementwise"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        from ..ir.analysis import fusion_cycle_local

        users, outs = graph.users(), set(graph.outputs)
        region: dict[Node, list[Node]] = {}
        for n in graph.nodes:
            if not _chainable(n):
                continue
            joins = [
                v.producer
                for v in n.inputs
                if v is not None and v.producer in region and v not in outs and len(users[v]) == 1
            ]
            region[n] = region[joins[0]] if joins else []
            region[n].append(n)
        groups = [g for g in {id(r): r for r in region.values()}.values() if len(g) >= 2]
        made = 0
        for group in groups:
            if fusion_cycle_local(graph, group) is not None:  # cannot happen for single-use chains; checked anyway
                continue
            self._replace(graph, group)
            made += 1
        return PassResult(bool(made), {"regions": made, "ops_in_regions": sum(map(len, groups))})

    @staticmethod
    def _replace(graph: Graph, group: list[Node]) -> None:
        inside = {n.output for n in group}
        ext: list = []
        for n in group:
            for v in n.inputs:
                if v not in inside and v not in ext:
                    ext.append(v)
        index = {v: i for i, v in enumerate(ext)}
        body = []
        for k, n in enumerate(group):
            body.append([n.op, [index[v] for v in n.inputs], dict(n.attrs)])
            index[n.output] = len(ext) + k
        last = group[-1]
        new = graph.add_node(
            "elementwise_region", ext, {"body": body}, name=last.output.name, source=last.source, before=last
        ).output
        graph.replace_all_uses(last.output, new)
        for n in group:
            graph.remove_node(n)
