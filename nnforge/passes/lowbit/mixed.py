"""Mixed precision: per layer 8 bits, 4 bits or float, chosen from each layer's measured effect on the
model output, for a size target or an output-error budget."""

from __future__ import annotations

import dataclasses

import numpy as np

from ...ir import Graph, interpret
from ..calib import Layer, calibration_batches, constant_bytes, find_layers, relative_error
from ..manager import Pass, PassContext, PassResult, register_pass
from .layers import REWRITE, Calibration, Plan, apply_plans, copy_with_layers, quantize_weight
from .rtn import group_size_for
from .settings import Quantize

CHOICES = (32, 8, 4)  # float, int8, int4: each step down is one "move"


def _layer_bytes(layer: Layer, bits: int, group_size: int) -> int:
    n, k = layer.shape
    if bits == 32:
        return int(layer.weight.nbytes)
    gs = group_size_for(k, bits, group_size) or k
    return n * k * bits // 8 + (n * (k // gs)) * (4 + (1 if bits == 4 else 0))


def _output_error(graph: Graph, batch, reference) -> float:
    got = interpret(graph, batch)
    return relative_error(
        np.concatenate([r.reshape(-1) for r in reference]), np.concatenate([g.reshape(-1) for g in got])
    )


def sensitivity(
    graph: Graph, layers: list[Layer], plans: dict[int, dict[int, Plan]], batch
) -> dict[tuple[int, int], float]:
    """Model output error with one layer quantized at a time, per (layer, bits)."""
    reference = interpret(graph, batch)
    out = {}
    for li, per_bits in plans.items():
        for bits, plan in per_bits.items():
            g, twins = copy_with_layers(graph, layers)
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
        fitting = [
            m for m in moves() if np.sqrt(sum(e * e for e in err.values()) - err[m[1]] ** 2 + m[4] ** 2) <= budget
        ]
        if not fitting:
            return bits
        _, li, nxt, saved, e = min(fitting)
        bits[li], err[li] = nxt, e


@register_pass
class QuantizeMixed(Pass):
    """Per layer 8 bits, 4 bits or float, chosen from each layer's measured effect on the model output."""

    name = "quantize_mixed"
    lossy = True
    Options = Quantize

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg = self.options
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
            out, twins = copy_with_layers(graph, layers)
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
        stats += [
            {"name": layers[li].name, "op": layers[li].node.op, "bits": 32, "sensitivity_int8": sens.get((li, 8))}
            for li, b in chosen.items()
            if b == 32
        ]
        after = constant_bytes(out)
        return PassResult(
            bool(plans),
            {
                "layers": stats,
                "target": target,
                "bytes_before": before,
                "bytes_after": after,
                "size_ratio": after / max(before, 1),
                "output_error": error,
            },
            graph=out,
        )
