"""The budget for step caching: the fastest setting whose samples stay within a quality budget.

``search_cache(model, noise, scheduler, budget, ...)`` samples from the same noise with the uncached compiled
denoiser and with each candidate setting (DeepCache intervals, branches and schedules for a U-Net; FORA
intervals for a DiT; T-Gate steps where there is cross-attention; ToMe merge ratios where the self-attention is
big enough), times each run on this machine and measures
its samples against the uncached ones. ``nnforge.Budget(metric, max_drop)`` says what may be lost:

- ``metric="agreement"``: the share of samples a classifier (``classify(images) -> labels``) reads as the class
  they were generated for; the drop is uncached agreement minus the candidate's (0.01 = one point);
- ``metric="psnr"`` / ``"ssim"``: against the uncached samples; the drop is ``40 dB - PSNR`` (resp. ``1 - SSIM``);
- a callable ``metric(samples, reference) -> quality`` (higher is better), as for ``nnforge.Budget``.

``min_psnr`` adds a floor on PSNR whatever the metric. As ``nnforge.passes.budget.search`` does, the choice is
made on the calibration noise and confirmed on held-out noise it was not chosen on; a setting that misses the
budget there gives way to the next fastest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import NnforgeError
from ..passes.budget import Budget
from .blockcache import BlockCache, TGate, cross_attentions, residual_branches
from .deepcache import DeepCache, find_skips
from .metrics import psnr, ssim
from .sample import sample
from .tome import MIN_TOKENS, DiffusionToMe, mergeable_tokens

PSNR_CEILING = 40.0  # dB: "psnr" as a drop is how far below this a candidate's samples are


@dataclass
class Trial:
    setting: Any  # a DeepCache / BlockCache / TGate / DiffusionToMe / Combined, or None (uncached)
    seconds: float
    psnr: float
    ssim: float
    agreement: float | None
    drop: float
    within: bool

    @property
    def name(self) -> str:
        return "uncached" if self.setting is None else self.setting.name


@dataclass
class CacheChoice:
    setting: Any  # the chosen step-cache setting, None if none fits the budget
    reference: Trial  # uncached, on the calibration noise
    trials: list[Trial]  # every candidate on the calibration noise, fastest first
    heldout: Trial | None  # the choice on the held-out noise
    heldout_reference: Trial | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        chosen = self.heldout or self.reference
        base = self.heldout_reference or self.reference
        return base.seconds / chosen.seconds

    def report(self) -> str:
        lines = [f"{'setting':36} {'s':>7} {'x':>5} {'PSNR':>6} {'SSIM':>6} {'agree':>6} {'drop':>7}"]
        for t in [self.reference, *self.trials]:
            agree = "-" if t.agreement is None else f"{t.agreement:.0%}"
            lines.append(
                f"{t.name:36} {t.seconds:7.3f} {self.reference.seconds / t.seconds:5.2f} {t.psnr:6.1f} "
                f"{t.ssim:6.3f} {agree:>6} {t.drop:7.3f}{'' if t.within else '  over budget'}"
            )
        if self.setting is None:
            lines.append("chosen: uncached (no candidate stays within the budget)")
        else:
            lines.append(f"chosen: {self.setting.name}, {self.speedup:.2f}x on held-out noise")
        return "\n".join(lines + self.notes)


TOME_RATIOS = (0.3, 0.5, 0.7)


def default_candidates(graph, notes: list[str] | None = None) -> list:
    """The settings worth trying on this denoiser: DeepCache where there are U-Net skips, FORA where there are
    transformer blocks, T-Gate where there is cross-attention, ToMe merge ratios (alone, and at 0.5 with DeepCache
    interval 3) where the largest self-attention has at least ``MIN_TOKENS`` tokens (``notes`` says when not)."""
    from .compile import Combined

    out: list = []
    skips = find_skips(graph)
    if skips:
        for branch in sorted({0, min(2, len(skips) - 1)}):
            out += [DeepCache(interval=n, branch=branch) for n in (2, 3, 4, 5)]
        out += [DeepCache(interval=n, schedule="nonuniform") for n in (3, 4, 5)]
    elif residual_branches(graph):
        out += [BlockCache(interval=n) for n in (2, 3)]
    if cross_attentions(graph):
        out += [TGate(gate=g) for g in (10, 20)]
    tokens = max(mergeable_tokens(graph), default=0)
    if tokens >= MIN_TOKENS:
        out += [DiffusionToMe(ratio=r) for r in TOME_RATIOS]
        if skips:
            out.append(Combined((DeepCache(interval=3), DiffusionToMe(ratio=0.5))))
    elif notes is not None:
        notes.append(
            f"ToMe not tried: the largest self-attention has {tokens} tokens (fewer than {MIN_TOKENS}: "
            "merging saves next to nothing)"
            if tokens
            else "ToMe not tried: no self-attention"
        )
    return out


def _quality(budget: Budget, classify, labels) -> Callable[[np.ndarray, np.ndarray], float]:
    if callable(budget.metric):
        return budget.metric
    if budget.metric == "agreement":
        if classify is None or labels is None:
            raise NnforgeError("budget metric 'agreement' needs classify= (images -> labels) and class_labels=")
        want = np.asarray(labels)
        return lambda out, ref: float(np.mean(np.asarray(classify(out)) == want))
    if budget.metric == "psnr":
        return lambda out, ref: min(psnr(out, ref), PSNR_CEILING)
    if budget.metric == "ssim":
        return ssim
    raise NnforgeError(f"diffusion budget metric is 'agreement', 'psnr', 'ssim' or a callable, not {budget.metric!r}")


def search_cache(
    model,
    noise,
    scheduler,
    budget: Budget,
    *,
    steps: int = 50,
    candidates: Sequence | None = None,
    heldout_noise=None,
    classify: Callable | None = None,
    min_psnr: float | None = None,
    repeat: int = 2,
    timing: str = "wall",
    compile_options: dict | None = None,
    progress: Callable[[str], None] = lambda msg: None,
    **conditioning,
) -> CacheChoice:
    """The fastest step-cache setting within ``budget`` (see the module doc). ``noise``: the calibration batch;
    ``heldout_noise``: another batch (default: fresh noise of the same shape, seeded). ``timing``: "wall" (the
    best of ``repeat`` sampling runs after a warm-up) or "flops" (``flop_seconds``: deterministic, for a busy
    machine or a target that is not here)."""
    from .compile import as_setting, compile_denoiser

    options = dict(compile_options or {})
    quality = _quality(budget, classify, conditioning.get("class_labels"))
    t0 = next(iter(scheduler.timesteps)) if getattr(scheduler, "timesteps", None) is not None else 999

    if timing not in ("wall", "flops"):
        raise NnforgeError(f"search_cache: timing is 'wall' or 'flops', not {timing!r}")

    def run(setting, x) -> tuple[np.ndarray, float]:
        denoiser = compile_denoiser(model, x, t0, cache=setting, **options, **conditioning)
        out = sample(denoiser, scheduler, x, steps, **conditioning)  # warm-up: first runs allocate
        if timing == "flops":
            return out.numpy(), flop_seconds(denoiser, x, steps, conditioning)
        best = float("inf")
        for _ in range(max(1, repeat)):
            start = time.perf_counter()
            out = sample(denoiser, scheduler, x, steps, **conditioning)
            best = min(best, time.perf_counter() - start)
        return out.numpy(), best

    def trial(setting, x, ref: np.ndarray | None, ref_quality: float | None) -> tuple[Trial, np.ndarray]:
        progress(f"sampling with {'uncached' if setting is None else setting.name}")
        out, seconds = run(setting, x)
        ref = out if ref is None else ref
        q = quality(out, ref)
        drop = 0.0 if ref_quality is None else ref_quality - q
        agree = q if budget.metric == "agreement" else None
        p = psnr(out, ref)
        ok = drop <= budget.max_drop and (min_psnr is None or p >= min_psnr)
        return Trial(setting, seconds, p, ssim(out, ref), agree, drop, ok), out

    notes: list[str] = []
    reference, ref_out = trial(None, noise, None, None)
    base = quality(ref_out, ref_out)
    reference.drop = 0.0
    if candidates is None:
        from ..api import import_model
        from .compile import denoiser_step

        names = [k for k, v in conditioning.items() if v is not None]
        example = [noise, _timesteps(t0, noise)] + [conditioning[k] for k in names]
        candidates = default_candidates(import_model(denoiser_step(model, names), tuple(example)), notes)
    candidates = [as_setting(c) for c in candidates]
    trials = []
    for setting in candidates:
        calibration = trial(setting, noise, ref_out, base)[0]
        calibration.within = calibration.within and calibration.drop <= budget.margin * budget.max_drop
        trials.append(calibration)
    trials.sort(key=lambda t: t.seconds)
    choice = CacheChoice(None, reference, trials, None, notes=notes)
    if heldout_noise is None:
        import torch

        heldout_noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(12345))
    held_ref, held_out = trial(None, heldout_noise, None, None)
    held_base = quality(held_out, held_out)
    choice.heldout_reference = held_ref
    for t in trials:
        if not t.within or t.seconds >= reference.seconds:
            continue
        checked = trial(t.setting, heldout_noise, held_out, held_base)[0]
        if checked.within:
            choice.setting, choice.heldout = t.setting, checked
            break
        choice.notes.append(f"{t.name}: within budget on calibration, not on held-out noise (drop {checked.drop:.3f})")
    return choice


def flop_seconds(denoiser, noise, steps: int, conditioning: dict, flops_per_second: float = 1e10) -> float:
    """A run's multiply-adds (``nnforge.passes.budget.flops`` of the compiled full and cached graphs, per step as
    the schedule picks them) at a fixed rate."""
    from ..passes.budget import flops

    arrays = [noise.numpy(), np.full(noise.shape[0], 999)] + [np.asarray(v) for v in conditioning.values()]
    full, cached = denoiser.models(tuple(a.shape for a in arrays))
    per_full = flops(full.graph, arrays)
    per_cached = 0 if cached is None else flops(cached.graph, arrays + _features_like(cached, len(arrays)))
    return sum(per_full if f else per_cached for f in denoiser.full_steps(steps)) / flops_per_second


def _features_like(compiled, skip: int) -> list[np.ndarray]:
    """Zero arrays standing in for the cached graph's feature inputs (only their shapes matter to ``flops``)."""
    return [np.zeros([int(d) for d in v.shape], v.dtype) for v in compiled.graph.inputs[skip:]]


def _timesteps(t, like):
    import torch

    return torch.full((like.shape[0],), int(t))
