"""Quantizing a graph's layers: a plan per layer (bits, method, activation quantization), the
quantized weights, the rewrite to ``qlinear`` / ``qconv2d`` / ``qgather``, and per-layer error stats."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ...ir import Graph, Value, get_op
from ..calib import Layer, collect, layer_error, relative_error, replace_node, rows
from ..manager import PassContext
from .gptq import gptq
from .rtn import QWeight, group_size_for, rtn, static_params
from .settings import WEIGHT_BITS, Quantize


@dataclass
class Plan:
    """How one layer is quantized."""

    bits: int
    method: str = "rtn"
    act_quant: str = "none"
    x_scale: float = 1.0
    x_zero_point: int = 0
    qw: QWeight | None = None  # filled by quantize_weight
    float_zero: bool = False  # int4 RTN: the zero point a float (the group's exact min), not an integer code


def quantize_weight(layer: Layer, plan: Plan, group_size: int, hessian: np.ndarray | None) -> QWeight | None:
    gs = group_size_for(layer.shape[1], plan.bits, group_size)
    if gs is None:
        return None
    if plan.method == "gptq" and layer.kind == "linear":
        return gptq(layer.weight, hessian, plan.bits, gs)
    return rtn(layer.weight, plan.bits, gs, float_zero=plan.float_zero)


def _qlinear_attrs(layer: Layer, plan: Plan) -> dict:
    attrs = {"bits": plan.bits, "group_size": plan.qw.group_size, "act": layer.act, "act_quant": plan.act_quant}
    if plan.act_quant == "static":
        attrs.update(x_scale=plan.x_scale, x_zero_point=plan.x_zero_point)
    return attrs


def _weight_inputs(graph: Graph, layer: Layer, qw: QWeight) -> list:
    base = layer.name
    return [
        graph.add_constant(qw.stored(), f"{base}_q{qw.bits}"),
        graph.add_constant(qw.scales, f"{base}_scales"),
        None if qw.zeros is None else graph.add_constant(qw.zeros, f"{base}_zeros"),
    ]


def _trim(inputs: list) -> list:
    while inputs and inputs[-1] is None:
        inputs = inputs[:-1]
    return inputs


def _rewrite_linear(graph, layer, plan):
    return replace_node(
        graph,
        layer.node,
        "qlinear",
        _trim([layer.x, *_weight_inputs(graph, layer, plan.qw), layer.bias]),
        _qlinear_attrs(layer, plan),
    )


def _rewrite_conv(graph, layer, plan):
    a = layer.node.attrs
    attrs = {
        "bits": plan.bits,
        "group_size": plan.qw.group_size,
        "kernel": list(layer.conv_shape[2:]),
        **{k: a[k] for k in ("stride", "padding", "dilation", "groups")},
    }
    return replace_node(
        graph, layer.node, "qconv2d", _trim([layer.x, *_weight_inputs(graph, layer, plan.qw), layer.bias]), attrs
    )


def _rewrite_embedding(graph, layer, plan):
    return replace_node(
        graph,
        layer.node,
        "qgather",
        [*_weight_inputs(graph, layer, plan.qw), layer.node.inputs[1]],
        {"bits": plan.bits, "group_size": plan.qw.group_size},
    )


REWRITE = {"linear": _rewrite_linear, "conv": _rewrite_conv, "embedding": _rewrite_embedding}


def _quantized_output(layer: Layer, plan: Plan, x: np.ndarray) -> np.ndarray:
    """What the rewritten layer computes on x, before bias and activation (for the error stats)."""
    if layer.kind == "linear":
        qw = plan.qw
        x2 = np.asarray(x, np.float32).reshape(-1, layer.shape[1])
        return get_op("qlinear").ref(
            x2,
            qw.stored(),
            qw.scales,
            qw.zeros,
            None,
            bits=qw.bits,
            group_size=qw.group_size,
            act_quant=plan.act_quant,
            x_scale=plan.x_scale,
            x_zero_point=plan.x_zero_point,
        )
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
        plan.float_zero = cfg.zero_point == "float" and bits == 4 and plan.method == "rtn" and layer.kind == "linear"
        if act == "static":
            plan.x_scale, plan.x_zero_point = static_params(calib.arrays[layer.key], cfg)
        plans[i] = plan
    return plans


def apply_plans(
    graph: Graph, layers: list[Layer], plans: dict[int, Plan], cfg: Quantize, calib: Calibration
) -> list[dict]:
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
            stats.append(
                {"name": layer.name, "op": layer.node.op, "bits": 32, "skipped": "input features not packable"}
            )
            continue
        rec = {
            "name": layer.name,
            "op": layer.node.op,
            "bits": plan.bits,
            "group_size": plan.qw.group_size,
            "method": plan.method,
            "activations": plan.act_quant,
            "bytes_before": int(layer.weight.nbytes),
            "bytes_after": plan.qw.nbytes,
            "rel_error": plan_error(layer, plan, calib.inputs(layer)),
        }
        REWRITE[layer.kind](graph, layer, plan)
        stats.append(rec)
    graph.remove_unused_constants()
    return stats


def copy_with_layers(graph: Graph, layers: list[Layer]) -> tuple[Graph, list[Layer]]:
    """A copy of the graph and the layers pointing at its nodes (calibration keys stay the original values)."""
    out = graph.copy()
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    return out, [dataclasses.replace(layer, node=out.nodes[index[id(layer.node)]]) for layer in layers]
