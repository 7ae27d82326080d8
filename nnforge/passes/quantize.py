"""Low-bit passes: weight quantization (int8, int4 RTN/GPTQ), W8A8, SmoothQuant, mixed precision.

Settings come from ``nnforge.Quantize`` (below), passed as ``ctx.options["quantize"]`` (the
dataclass or a dict of its fields). Each pass name fixes what it is about and takes the rest from
the settings, so a pipeline can name them directly:

    quantize             everything from the settings
    quantize_int8        int8 weights, per output channel, symmetric, round-to-nearest (or GPTQ)
    quantize_int4_rtn    int4 weights, group-wise with zero points, round-to-nearest
    quantize_int4_gptq   int4 weights, GPTQ (Hessian from calibration activations, error compensation)
    quantize_w8a8        int8 weights + int8 activations (dynamic per token unless activations says
                         "dynamic_tensor" or "static")
    quantize_w8a8_static int8 weights + calibrated per-tensor uint8 activations (min/max or percentile)
    quantize_mixed       per-layer 8 / 4 bits / float from measured sensitivity, for a size or error target
    smoothquant          migrate activation outliers into the weights (lossless refactoring; run before W8A8)

Layers: linear/linear_act/matmul-by-constant -> ``qlinear``; conv2d -> ``qconv2d`` (weight-only,
round-to-nearest); embedding gathers -> ``qgather`` (``embeddings`` setting). See ir/ops_lowbit.py
for the storage layout. Every pass reports per layer the relative output error it caused on the
calibration data in ``PassResult.stats["layers"]`` and the constant bytes before/after.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import scipy.linalg

from ..errors import NnforgeError
from ..ir import Graph, Value, get_op, interpret
from ..ops.lowbit import dequantize, pack_int4
from .calib import (Layer, base_name, calibration_batches, collect, constant_bytes, find_layers, layer_error, relative_error,
                    replace_node, row_source, rows)
from .manager import Pass, PassContext, PassResult, register_pass

WEIGHT_BITS = {"int8": 8, "int4": 4}


@dataclass
class Quantize:
    """What to quantize and how. ``nnforge.compile(..., quantize=Quantize(...), calibration=batches)``.

    weights      "int8" (per output channel, symmetric) | "int4" (group-wise, with zero points)
    method       "rtn" (round to nearest) | "gptq" (needs calibration)
    group_size   int4 group along the input features: 32 | 64 | 128 (smaller where a layer is narrower)
    activations  None (weight-only) | "dynamic" (int8 per token at run time) | "dynamic_tensor" (uint8, one
                 range per tensor at run time: ONNX Runtime's fused DynamicQuantizeMatMul) | "static" (calibrated,
                 per tensor)
    smooth       SmoothQuant strength alpha in [0, 1]; 0 = off (only used with activations)
    observer     static activation range: "minmax" | "percentile" (``percentile`` of the values)
    embeddings   embedding tables: "int8" | "int4" | None (keep float)
    mixed        None, {"size": 0.3} (constant bytes <= 0.3x float) or {"max_error": 0.02}
                 (relative output error on calibration data): per layer 8 / 4 bits / float
    exclude      layer names (weight names) containing any of these stay float
    """

    weights: str = "int8"
    method: str = "rtn"
    group_size: int = 128
    activations: str | None = None
    smooth: float = 0.0
    observer: str = "minmax"
    percentile: float = 99.99
    embeddings: str | None = "int8"
    mixed: dict | None = None
    exclude: tuple = ()

    def __post_init__(self):
        _choice("weights", self.weights, WEIGHT_BITS)
        _choice("method", self.method, ("rtn", "gptq"))
        _choice("activations", self.activations, (None, "dynamic", "dynamic_tensor", "static"))
        _choice("observer", self.observer, ("minmax", "percentile"))
        _choice("embeddings", self.embeddings, (None, "int8", "int4"))
        if self.group_size not in (16, 32, 64, 128, 256):
            raise NnforgeError(f"Quantize.group_size must be a power of two in 16..256, got {self.group_size}")
        if not 0.0 <= self.smooth <= 1.0:
            raise NnforgeError(f"Quantize.smooth must lie in [0, 1], got {self.smooth}")
        if self.activations and self.weights != "int8":
            raise NnforgeError("Quantize: quantized activations need weights='int8'")
        if self.mixed is not None and (not isinstance(self.mixed, dict) or len(self.mixed) != 1
                                       or not set(self.mixed) <= {"size", "max_error"}):
            raise NnforgeError(f"Quantize.mixed must be {{'size': ratio}} or {{'max_error': x}}, got {self.mixed!r}")
        self.exclude = tuple(self.exclude)

    pass_name = "quantize"  # nnforge.compile runs this pass with ctx.options["quantize"] = self

    def passes(self) -> list[str]:
        """The single-purpose pass names that carry out these settings, in order (the "quantize" pass
        alone does the same)."""
        if self.mixed:
            main = "quantize_mixed"
        elif self.activations:
            main = "quantize_w8a8_static" if self.activations == "static" else "quantize_w8a8"
        else:
            main = "quantize_int8" if self.weights == "int8" else f"quantize_int4_{self.method}"
        return (["smoothquant"] if self.smooth and self.activations else []) + [main]

    def options(self) -> dict:
        return {"quantize": dataclasses.asdict(self)}


def _choice(what, value, allowed):
    if value not in allowed:
        raise NnforgeError(f"Quantize.{what} must be one of {list(allowed)}, got {value!r}")


def settings(ctx: PassContext, adjust: Callable[[Quantize], Quantize] | None = None) -> Quantize:
    raw = ctx.options.get("quantize") or {}
    cfg = raw if isinstance(raw, Quantize) else Quantize(**dict(raw))
    return adjust(cfg) if adjust else cfg


# ---------------------------------------------------------------------------------------
# quantizers: integers, scales and zero points for a weight matrix
# ---------------------------------------------------------------------------------------

@dataclass
class QWeight:
    """A quantized [N, K] weight: integer values (unpacked), scales [N, G], zeros [N, G] or None."""

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    bits: int
    group_size: int

    def dequantize(self) -> np.ndarray:
        return dequantize(self.stored(), self.scales, self.zeros, self.bits, self.group_size)

    def stored(self) -> np.ndarray:
        """The qweight constant: int8 [N, K] or packed uint8 [N, K/2]."""
        return self.q.astype(np.int8) if self.bits == 8 else pack_int4(self.q)

    @property
    def nbytes(self) -> int:
        return int(self.q.size * self.bits // 8 + self.scales.nbytes + (0 if self.zeros is None else self.zeros.nbytes))


SHRINK = np.linspace(1.0, 0.6, 17)  # int4 range search: candidate fractions of each row's min/max


def _params(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point) per row of w: symmetric max-abs for 8 bits; for 4 bits asymmetric, with the
    range shrunk per row to whichever of SHRINK minimises the squared rounding error (clipping a few
    outliers buys finer steps for all the other weights)."""
    if bits == 8:
        amax = np.max(np.abs(w), axis=1)
        return np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32).astype(np.float64), None  # the stored f32
    lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
    best = (None, None, np.full(len(w), np.inf))
    for p in SHRINK:
        scale = np.where(hi > lo, (hi - lo) * p / 15.0, 1.0).astype(np.float32).astype(np.float64)
        zero = np.clip(np.round(-lo * p / scale), 0, 15)
        err = np.sum((_deq(_round(w, scale, zero, bits), scale, zero) - w) ** 2, axis=1)
        better = err < best[2]
        best = (np.where(better, scale, best[0] if best[0] is not None else scale),
                np.where(better, zero, best[1] if best[1] is not None else zero), np.where(better, err, best[2]))
    return best[0], best[1]


def _round(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> np.ndarray:
    """Integers for columns w [N, c] given per-row scale/zero."""
    if zero is None:
        return np.clip(np.round(w / scale[:, None]), -127, 127)
    return np.clip(np.round(w / scale[:, None]) + zero[:, None], 0, 2**bits - 1)


def _deq(q, scale, zero):
    return (q - (0 if zero is None else zero[:, None])) * scale[:, None]


def _finish(q, scales, zeros, bits, gs) -> QWeight:
    # scales are stored as float32: recompute nothing, just cast (the dequantized values use the f32 scale)
    return QWeight(q.astype(np.int32), np.ascontiguousarray(scales, np.float32),
                   None if zeros is None else np.ascontiguousarray(zeros, np.uint8), bits, gs)


def rtn(w: np.ndarray, bits: int, group_size: int) -> QWeight:
    """Round-to-nearest, group by group."""
    w = np.asarray(w, np.float64)
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size).transpose(1, 0, 2)  # [G, N, gs]
    qs, ss, zs = [], [], []
    for grp in groups:
        s, z = _params(grp, bits)
        qs.append(_round(grp, s, z, bits))
        ss.append(s)
        zs.append(z)
    q = np.concatenate(qs, axis=1)
    return _finish(q, np.stack(ss, 1), None if bits == 8 else np.stack(zs, 1), bits, group_size)


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int, group_size: int, damp: float = 0.1, block: int = 128,
         act_order: bool = True) -> QWeight:
    """GPTQ (Frantar et al. 2022): quantize column by column, spreading each column's rounding error
    over the columns not yet quantized through the inverse Hessian H = X^T X of the calibration inputs.

    ``act_order`` visits columns by decreasing H diagonal (the inputs with most energy first); group
    scales are then fixed up front from the original weights ("static groups"), so the storage layout
    stays plain. Without it, a group takes its scale from its error-compensated columns when it starts.
    ``damp`` (fraction of the mean diagonal added to H) is high by default: few calibration tokens make
    H rank-deficient and a weak damping overfits them.
    """
    W = np.array(w, np.float64)
    n, k = W.shape
    H = np.array(hessian, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += np.eye(k) * damp * np.mean(np.diag(H))
    gs = min(group_size, k)
    static = act_order or gs == k
    scales, zeros = np.zeros((n, k // gs)), np.zeros((n, k // gs))
    if static:
        for g in range(k // gs):
            s, z = _params(W[:, g * gs:(g + 1) * gs], bits)
            scales[:, g], zeros[:, g] = s, 0 if z is None else z
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // gs  # the (original) group each visited column belongs to
    Hinv = _inverse_cholesky_upper(H)
    block = block if static else max(gs, (block // gs) * gs)  # dynamic groups must not straddle blocks
    Q = np.zeros_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Hinv1 = W[:, i1:i2].copy(), Hinv[i1:i2, i1:i2]
        Err1 = np.zeros_like(W1)
        for j in range(i2 - i1):
            col, g = i1 + j, group_of[i1 + j]
            if not static and col % gs == 0:
                s, z = _params(W1[:, j:j + gs], bits)
                scales[:, g], zeros[:, g] = s, 0 if z is None else z
            scale, zero = scales[:, g], (None if bits == 8 else zeros[:, g])
            q = _round(W1[:, j:j + 1], scale, zero, bits)
            Q[:, col] = q[:, 0]
            err = (W1[:, j] - _deq(q, scale, zero)[:, 0]) / Hinv1[j, j]
            W1[:, j:] -= np.outer(err, Hinv1[j, j:])
            Err1[:, j] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Q = Q[:, np.argsort(perm)]
    return _finish(Q, scales, None if bits == 8 else zeros, bits, gs)


def _inverse_cholesky_upper(H: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of H^-1; adds damping until H is numerically positive definite."""
    eye = np.eye(H.shape[0])
    extra = 0.0
    for _ in range(6):
        try:
            L = scipy.linalg.cholesky(H + extra * eye, lower=True)
            Linv = scipy.linalg.solve_triangular(L, eye, lower=True)
            return scipy.linalg.cholesky(Linv.T @ Linv, lower=False)
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(H))) or 1e-6)
    raise NnforgeError("gptq: the calibration Hessian is not positive definite even with damping")


def group_size_for(k: int, bits: int, wanted: int) -> int | None:
    """The group size a layer of K inputs gets: per channel for int8; for int4 the largest power of two
    <= ``wanted`` (and >= 16) dividing K, else the whole row when K is even; None when K cannot be packed."""
    if bits == 8:
        return k
    g = wanted
    while g >= 16:
        if k % g == 0:
            return g
        g //= 2
    return k if k % 2 == 0 else None


# ---------------------------------------------------------------------------------------
# static activation observers
# ---------------------------------------------------------------------------------------

def _range_minmax(x: np.ndarray, cfg: Quantize):
    return float(x.min()), float(x.max())


def _range_percentile(x: np.ndarray, cfg: Quantize):
    return float(np.percentile(x, 100 - cfg.percentile)), float(np.percentile(x, cfg.percentile))


OBSERVERS = {"minmax": _range_minmax, "percentile": _range_percentile}


def static_params(arrays: Sequence[np.ndarray], cfg: Quantize) -> tuple[float, int]:
    """uint8 scale and zero point covering the observed range (which always includes 0)."""
    x = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays])
    lo, hi = OBSERVERS[cfg.observer](x, cfg)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32((hi - lo) / 255.0)) if hi > lo else 1.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


# ---------------------------------------------------------------------------------------
# rewriting layers
# ---------------------------------------------------------------------------------------

@dataclass
class Plan:
    """How one layer is quantized."""

    bits: int
    method: str = "rtn"
    act_quant: str = "none"
    x_scale: float = 1.0
    x_zero_point: int = 0
    qw: QWeight | None = None  # filled by quantize_weight


def quantize_weight(layer: Layer, plan: Plan, group_size: int, hessian: np.ndarray | None) -> QWeight | None:
    gs = group_size_for(layer.shape[1], plan.bits, group_size)
    if gs is None:
        return None
    if plan.method == "gptq" and layer.kind == "linear":
        return gptq(layer.weight, hessian, plan.bits, gs)
    return rtn(layer.weight, plan.bits, gs)


def _qlinear_attrs(layer: Layer, plan: Plan) -> dict:
    attrs = {"bits": plan.bits, "group_size": plan.qw.group_size, "act": layer.act, "act_quant": plan.act_quant}
    if plan.act_quant == "static":
        attrs.update(x_scale=plan.x_scale, x_zero_point=plan.x_zero_point)
    return attrs


def _weight_inputs(graph: Graph, layer: Layer, qw: QWeight) -> list:
    base = layer.name
    return [graph.add_constant(qw.stored(), f"{base}_q{qw.bits}"), graph.add_constant(qw.scales, f"{base}_scales"),
            None if qw.zeros is None else graph.add_constant(qw.zeros, f"{base}_zeros")]


def _trim(inputs: list) -> list:
    while inputs and inputs[-1] is None:
        inputs = inputs[:-1]
    return inputs


def _rewrite_linear(graph, layer, plan):
    return replace_node(graph, layer.node, "qlinear",
                        _trim([layer.x, *_weight_inputs(graph, layer, plan.qw), layer.bias]), _qlinear_attrs(layer, plan))


def _rewrite_conv(graph, layer, plan):
    a = layer.node.attrs
    attrs = {"bits": plan.bits, "group_size": plan.qw.group_size, "kernel": list(layer.conv_shape[2:]),
             **{k: a[k] for k in ("stride", "padding", "dilation", "groups")}}
    return replace_node(graph, layer.node, "qconv2d", _trim([layer.x, *_weight_inputs(graph, layer, plan.qw), layer.bias]),
                        attrs)


def _rewrite_embedding(graph, layer, plan):
    return replace_node(graph, layer.node, "qgather", [*_weight_inputs(graph, layer, plan.qw), layer.node.inputs[1]],
                        {"bits": plan.bits, "group_size": plan.qw.group_size})


REWRITE = {"linear": _rewrite_linear, "conv": _rewrite_conv, "embedding": _rewrite_embedding}


def _quantized_output(layer: Layer, plan: Plan, x: np.ndarray) -> np.ndarray:
    """What the rewritten layer computes on x, before bias and activation (for the error stats)."""
    if layer.kind == "linear":
        qw = plan.qw
        x2 = np.asarray(x, np.float32).reshape(-1, layer.shape[1])
        return get_op("qlinear").ref(x2, qw.stored(), qw.scales, qw.zeros, None, bits=qw.bits, group_size=qw.group_size,
                                     act_quant=plan.act_quant, x_scale=plan.x_scale, x_zero_point=plan.x_zero_point)
    return layer.apply(x, plan.qw.dequantize())


def plan_error(layer: Layer, plan: Plan, inputs: list | None) -> float:
    if not inputs:
        return layer_error(layer, None, plan.qw.dequantize())
    ref = np.concatenate([layer.apply(np.asarray(x), layer.weight).reshape(-1) for x in inputs])
    got = np.concatenate([_quantized_output(layer, plan, x).reshape(-1) for x in inputs])
    return relative_error(ref, got)


def _sample_rows(arrays: list, k: int, limit: int = 2048) -> list:
    """At most ``limit`` activation rows per layer for the error stats (Hessians use all rows)."""
    x = rows(arrays, k).astype(np.float32)
    if len(x) > limit:
        x = x[np.linspace(0, len(x) - 1, limit).astype(int)]
    return [x]


class Calibration:
    """Calibration activations per layer input, collected once per pass."""

    def __init__(self, graph: Graph, ctx: PassContext, layers: list[Layer], needed: bool, what: str):
        has_data = bool(ctx.calibration) or ctx.sample_inputs is not None
        self.arrays: dict[Value, list] = {}
        if needed or has_data:
            xs = [layer.key for layer in layers if layer.kind in ("linear", "conv")]
            self.arrays = collect(graph, ctx, xs, what) if xs else {}

    def inputs(self, layer: Layer) -> list | None:
        arrays = self.arrays.get(layer.key) if layer.key is not None else None
        if not arrays:
            return None
        return _sample_rows(arrays, layer.shape[1]) if layer.kind == "linear" else arrays[:1]

    def hessian(self, layer: Layer) -> np.ndarray:
        x = rows(self.arrays[layer.key], layer.shape[1])
        return x.T @ x / max(len(x), 1)


def layer_plans(layers: list[Layer], cfg: Quantize, calib: Calibration) -> dict[int, Plan]:
    """The default plan per layer (index into ``layers``) from the settings; skipped layers have none."""
    plans = {}
    for i, layer in enumerate(layers):
        if layer.kind == "embedding":
            if cfg.embeddings:
                plans[i] = Plan(WEIGHT_BITS[cfg.embeddings])
            continue
        bits = WEIGHT_BITS[cfg.weights]
        act = cfg.activations if (layer.kind == "linear" and cfg.activations) else "none"
        plan = Plan(bits, cfg.method if layer.kind == "linear" else "rtn", act)
        if act == "static":
            plan.x_scale, plan.x_zero_point = static_params(calib.arrays[layer.key], cfg)
        plans[i] = plan
    return plans


def apply_plans(graph: Graph, layers: list[Layer], plans: dict[int, Plan], cfg: Quantize, calib: Calibration) -> list[dict]:
    """Quantize and rewrite each planned layer; returns the per-layer stats."""
    stats = []
    for i, layer in enumerate(layers):
        plan = plans.get(i)
        if plan is None:
            continue
        if plan.qw is None:
            hess = calib.hessian(layer) if plan.method == "gptq" and layer.kind == "linear" else None
            plan.qw = quantize_weight(layer, plan, cfg.group_size, hess)
        if plan.qw is None:
            stats.append({"name": layer.name, "op": layer.node.op, "bits": 32, "skipped": "input features not packable"})
            continue
        rec = {"name": layer.name, "op": layer.node.op, "bits": plan.bits, "group_size": plan.qw.group_size,
               "method": plan.method, "activations": plan.act_quant, "bytes_before": int(layer.weight.nbytes),
               "bytes_after": plan.qw.nbytes, "rel_error": plan_error(layer, plan, calib.inputs(layer))}
        REWRITE[layer.kind](graph, layer, plan)
        stats.append(rec)
    graph.remove_unused_constants()
    return stats


def quantize(graph: Graph, ctx: PassContext, cfg: Quantize) -> PassResult:
    before = constant_bytes(graph)
    kinds = ("linear", "conv") + (("embedding",) if cfg.embeddings else ())
    layers = find_layers(graph, kinds, cfg.exclude)
    needs = cfg.method == "gptq" or cfg.activations == "static"
    calib = Calibration(graph, ctx, layers, needs, f"quantize ({cfg.method}, activations={cfg.activations})")
    plans = layer_plans(layers, cfg, calib)
    stats = apply_plans(graph, layers, plans, cfg, calib)
    after = constant_bytes(graph)
    return PassResult(bool(stats), {"layers": stats, "quantized": sum("skipped" not in s for s in stats),
                                    "bytes_before": before, "bytes_after": after, "size_ratio": after / max(before, 1)})


class _QuantizePass(Pass):
    lossy = True
    adjust: Callable[[Quantize], Quantize] | None = None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        adjust = type(self).adjust
        return quantize(graph, ctx, settings(ctx, adjust))


def _with(**fields):
    return staticmethod(lambda cfg: dataclasses.replace(cfg, **fields))


@register_pass
class QuantizeFromSettings(_QuantizePass):
    """Everything ctx.options["quantize"] (a nnforge.Quantize) asks for: SmoothQuant first when ``smooth``
    is set with quantized activations, then per-layer mixed precision or one setting for all layers."""

    name = "quantize"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg = settings(ctx)
        smoothed = {}
        if cfg.smooth and cfg.activations:
            smoothed = SmoothQuant().run(graph, ctx).stats
        res = QuantizeMixed().run(graph, ctx) if cfg.mixed else quantize(graph, ctx, cfg)
        if smoothed:
            res.stats["smoothquant"] = smoothed
        return res


@register_pass
class QuantizeInt8(_QuantizePass):
    """int8 weights, one scale per output channel (symmetric), weight-only."""

    name = "quantize_int8"
    adjust = _with(weights="int8", activations=None)


@register_pass
class QuantizeInt4RTN(_QuantizePass):
    """int4 weights in groups with zero points, round to nearest."""

    name = "quantize_int4_rtn"
    adjust = _with(weights="int4", method="rtn", activations=None)


@register_pass
class QuantizeInt4GPTQ(_QuantizePass):
    """int4 weights in groups with zero points, GPTQ on calibration activations."""

    name = "quantize_int4_gptq"
    adjust = _with(weights="int4", method="gptq", activations=None)


@register_pass
class QuantizeW8A8(_QuantizePass):
    """int8 weights and int8 activations: dynamic per-token scales (or static when the settings say so)."""

    name = "quantize_w8a8"
    adjust = staticmethod(lambda cfg: dataclasses.replace(cfg, weights="int8", activations=cfg.activations or "dynamic"))


@register_pass
class QuantizeW8A8Static(_QuantizePass):
    """int8 weights and uint8 activations with per-tensor ranges observed on calibration data."""

    name = "quantize_w8a8_static"
    adjust = _with(weights="int8", activations="static")


# ---------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------

CHOICES = (32, 8, 4)  # float, int8, int4: each step down is one "move"


def _layer_bytes(layer: Layer, bits: int, group_size: int) -> int:
    n, k = layer.shape
    if bits == 32:
        return int(layer.weight.nbytes)
    gs = group_size_for(k, bits, group_size) or k
    return n * k * bits // 8 + (n * (k // gs)) * (4 + (1 if bits == 4 else 0))


def _output_error(graph: Graph, batch, reference) -> float:
    got = interpret(graph, batch)
    return relative_error(np.concatenate([r.reshape(-1) for r in reference]), np.concatenate([g.reshape(-1) for g in got]))


def sensitivity(graph: Graph, layers: list[Layer], plans: dict[int, dict[int, Plan]], batch) -> dict[tuple[int, int], float]:
    """Model output error with one layer quantized at a time, per (layer, bits)."""
    reference = interpret(graph, batch)
    out = {}
    for li, per_bits in plans.items():
        for bits, plan in per_bits.items():
            g, twins = _copy_with_layers(graph, layers)
            REWRITE[layers[li].kind](g, twins[li], plan)
            out[(li, bits)] = _output_error(g, batch, reference)
    return out


def choose_bits(layers: list[Layer], sens: dict, sizes: dict, total: int, target: dict) -> dict[int, int]:
    """Greedy: from all-float, repeatedly take the step down (float->8, 8->4) with the least error per
    byte saved, until the size target is met, or while the estimated error stays within the budget.
    Layers' errors are taken as independent noise, so they add in quadrature (the pass then measures
    the real error and backs off where the estimate was too kind)."""
    bits = {li: 32 for li in {li for li, _ in sens}}
    err = {li: 0.0 for li in bits}
    size = total

    def moves():
        for li, b in bits.items():
            nxt = CHOICES[CHOICES.index(b) + 1] if b != CHOICES[-1] else None
            if nxt is not None and (li, nxt) in sens:
                saved = sizes[(li, b)] - sizes[(li, nxt)]
                cost = max(sens[(li, nxt)] - err[li], 0.0)
                yield cost / max(saved, 1), li, nxt, saved, sens[(li, nxt)]

    if "size" in target:
        while size > target["size"] * total:
            best = min(moves(), default=None)
            if best is None:
                break
            _, li, nxt, saved, e = best
            bits[li], err[li], size = nxt, e, size - saved
        return bits
    budget = target["max_error"]
    while True:
        fitting = [m for m in moves() if np.sqrt(sum(e * e for e in err.values()) - err[m[1]] ** 2 + m[4] ** 2) <= budget]
        if not fitting:
            return bits
        _, li, nxt, saved, e = min(fitting)
        bits[li], err[li] = nxt, e


@register_pass
class QuantizeMixed(Pass):
    """Per layer 8 bits, 4 bits or float, chosen from each layer's measured effect on the model output."""

    name = "quantize_mixed"
    lossy = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg = settings(ctx)
        target = cfg.mixed or {"size": 0.3}
        before = constant_bytes(graph)
        layers = find_layers(graph, ("linear", "conv", "embedding"), cfg.exclude)
        calib = Calibration(graph, ctx, layers, True, "quantize_mixed")
        candidates: dict[int, dict[int, Plan]] = {}
        for li, layer in enumerate(layers):
            base = Plan(8, cfg.method if layer.kind == "linear" else "rtn")
            hess = calib.hessian(layer) if base.method == "gptq" else None
            per_bits = {}
            for bits in (8, 4):
                plan = dataclasses.replace(base, bits=bits)
                plan.qw = quantize_weight(layer, plan, cfg.group_size, hess)
                if plan.qw is not None:
                    per_bits[bits] = plan
            candidates[li] = per_bits
        batch = calibration_batches(ctx, "quantize_mixed")[0]
        sens = sensitivity(graph, layers, candidates, batch)
        sizes = {(li, b): _layer_bytes(layers[li], b, cfg.group_size) for li in candidates for b in CHOICES}
        chosen = choose_bits(layers, sens, sizes, before, target)
        reference = interpret(graph, batch)
        while True:  # apply to a copy; with an error budget, step back the worst layer until it holds
            out, twins = _copy_with_layers(graph, layers)
            plans = {li: candidates[li][b] for li, b in chosen.items() if b != 32}
            stats = apply_plans(out, twins, plans, cfg, calib)
            error = _output_error(out, batch, reference)
            if "max_error" not in target or error <= target["max_error"] or not plans:
                break
            worst = max(plans, key=lambda li: sens[(li, chosen[li])])
            chosen[worst] = CHOICES[CHOICES.index(chosen[worst]) - 1]
        for rec in stats:
            li = next(i for i, l in enumerate(layers) if l.name == rec["name"])
            rec["sensitivity"] = sens.get((li, rec["bits"]))
        stats += [{"name": layers[li].name, "op": layers[li].node.op, "bits": 32, "sensitivity_int8": sens.get((li, 8))}
                  for li, b in chosen.items() if b == 32]
        after = constant_bytes(out)
        return PassResult(bool(plans), {"layers": stats, "target": target, "bytes_before": before, "bytes_after": after,
                                        "size_ratio": after / max(before, 1), "output_error": error}, graph=out)


def _copy_with_layers(graph: Graph, layers: list[Layer]) -> tuple[Graph, list[Layer]]:
    """A copy of the graph and the layers pointing at its nodes (calibration keys stay the original values)."""
    out = graph.copy()
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    return out, [dataclasses.replace(layer, node=out.nodes[index[id(layer.node)]]) for layer in layers]


# ---------------------------------------------------------------------------------------
# SmoothQuant: move activation outliers into the weights
# ---------------------------------------------------------------------------------------

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
    node.inputs[1:] = [graph.add_constant((wa / s).astype(dt), f"{name}_smooth")] + (
        [graph.add_constant((graph.constant(b) / s).astype(dt), f"{base_name(b.name)}_smooth")] if b is not None else [])
    return True


def _fold_into_linear(graph: Graph, node, s: np.ndarray) -> bool:
    """A linear layer without activation: dividing its output rows by s divides its output by s."""
    if node.op not in ("linear", "linear_act") or node.attrs.get("act", "none") != "none":
        return False
    if not all(v is None or graph.is_constant(v) for v in node.inputs[1:]):
        return False
    w = graph.constant(node.inputs[1])
    node.inputs[1] = graph.add_constant((w / s[:, None]).astype(w.dtype), f"{base_name(node.inputs[1].name)}_smooth")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        node.inputs[2] = graph.add_constant((graph.constant(node.inputs[2]) / s).astype(w.dtype),
                                            f"{base_name(node.inputs[2].name)}_smooth")
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
    lin.inputs[1] = graph.add_constant(w, f"{base_name(lin.inputs[1].name)}_smooth")
    if len(lin.inputs) > 2 and lin.inputs[2] is not None:
        b = graph.constant(lin.inputs[2]).copy()
        b[start:end] /= s
        lin.inputs[2] = graph.add_constant(b, f"{base_name(lin.inputs[2].name)}_smooth")
    return True


FOLD_INTO = {"layer_norm": _fold_into_layer_norm, "linear": _fold_into_linear, "linear_act": _fold_into_linear,
             "attention": _fold_into_attention}


def _scale_consumer(graph: Graph, node, s: np.ndarray) -> None:
    """Multiply the weight columns that meet input channel j by s[j] (reads the current weight: a
    layer may already have had its rows divided as the producer of another smoothed input)."""
    w = graph.constant(node.inputs[1])
    scaled = w * (s[None, :] if node.op != "matmul" else s[:, None])  # matmul weights are [K, N]
    node.inputs[1] = graph.add_constant(scaled.astype(w.dtype), f"{base_name(node.inputs[1].name)}_smooth")


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

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg = settings(ctx)
        alpha = cfg.smooth or 0.5
        layers = find_layers(graph, ("linear",), cfg.exclude)
        users = graph.users()
        groups: dict[Value, list[Layer]] = {}
        for layer in layers:
            groups.setdefault(layer.x, []).append(layer)
        foldable = {x: ls for x, ls in groups.items()
                    if x.producer is not None and x.producer.op in FOLD_INTO and x not in graph.outputs
                    and {id(u) for u in users.get(x, [])} == {id(l.node) for l in ls}}
        if not foldable:
            return PassResult(False, {"smoothed": 0})
        amax = {x: np.max(np.abs(rows(arrs, x.shape[-1])), axis=0)
                for x, arrs in collect(graph, ctx, list(foldable), "smoothquant").items()}
        done = []
        for x, ls in foldable.items():
            wmax = np.max([np.max(np.abs(_current_weight(graph, l)), axis=0) for l in ls], axis=0)
            s = np.where((amax[x] > 0) & (wmax > 0), amax[x] ** alpha / np.maximum(wmax, 1e-12) ** (1 - alpha), 1.0)
            s = np.clip(s, 1e-4, 1e4)
            if not FOLD_INTO[x.producer.op](graph, x.producer, s):
                continue
            for layer in ls:
                _scale_consumer(graph, layer.node, s)
            done.append({"input": x.name, "layers": [l.name for l in ls], "alpha": alpha,
                         "act_range_before": float(amax[x].max()), "act_range_after": float((amax[x] / s).max())})
        graph.remove_unused_constants()
        return PassResult(bool(done), {"smoothed": len(done), "groups": done})
