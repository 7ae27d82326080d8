"""The quantization passes: one setting for every layer (``quantize_int8`` etc.), and ``quantize``,
which carries out a whole ``nnforge.Quantize`` (SmoothQuant, mixed precision or one setting)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from ...ir import Graph
from ..calib import constant_bytes, find_layers
from ..manager import Pass, PassContext, PassResult, register_pass
from .layers import Calibration, apply_plans, layer_plans
from .mixed import QuantizeMixed
from .settings import Quantize
from .smoothquant import SmoothQuant


def quantize(graph: Graph, ctx: PassContext, cfg: Quantize) -> PassResult:
    before = constant_bytes(graph)
    kinds = ("linear", "conv") + (("embedding",) if cfg.embeddings else ())
    layers = find_layers(graph, kinds, cfg.exclude)
    needs = cfg.method == "gptq" or cfg.activations == "static"
    calib = Calibration(graph, ctx, layers, needs, f"quantize ({cfg.method}, activations={cfg.activations})")
    plans = layer_plans(layers, cfg, calib)
    stats = apply_plans(graph, layers, plans, cfg, calib)
    after = constant_bytes(graph)
    return PassResult(
        bool(stats),
        {
            "layers": stats,
            "quantized": sum("skipped" not in s for s in stats),
            "bytes_before": before,
            "bytes_after": after,
            "size_ratio": after / max(before, 1),
        },
    )


class _QuantizePass(Pass):
    lossy = True
    Options = Quantize
    adjust: Callable[[Quantize], Quantize] | None = None  # fixes what the pass is about over its settings

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        adjust = type(self).adjust
        return quantize(graph, ctx, adjust(self.options) if adjust else self.options)


def _with(**fields):
    return staticmethod(lambda cfg: dataclasses.replace(cfg, **fields))


@register_pass
class QuantizeFromSettings(_QuantizePass):
    """Everything its nnforge.Quantize asks for: SmoothQuant first when ``smooth`` is set with quantized
    activations, then per-layer mixed precision or one setting for all layers."""

    name = "quantize"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg = self.options
        smoothed = {}
        if cfg.smooth and cfg.activations:
            smoothed = SmoothQuant(cfg).run(graph, ctx).stats
        res = QuantizeMixed(cfg).run(graph, ctx) if cfg.mixed else quantize(graph, ctx, cfg)
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
    adjust = staticmethod(
        lambda cfg: dataclasses.replace(cfg, weights="int8", activations=cfg.activations or "dynamic")
    )


@register_pass
class QuantizeW8A8Static(_QuantizePass):
    """int8 weights and uint8 activations with per-tensor ranges observed on calibration data."""

    name = "quantize_w8a8_static"
    adjust = _with(weights="int8", activations="static")
