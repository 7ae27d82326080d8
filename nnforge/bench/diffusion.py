"""``nnforge bench --diffusion``: step caching measured on sampling runs.

Per model and setting: the time of a whole DDIM run (``--steps``, default 50) at batch 1 and 8, the speed-up over
the uncached nnforge denoiser (eager diffusers alongside), and on the trained digits model the quality of the
samples against uncached ones from the same noise (PSNR, SSIM, 100 samples, 10 of each digit) with the
classifier's agreement with the requested digit, plus the budget's choice for a 1-point agreement budget. The
random-weight ``UNet2DConditionModel`` (Stable-Diffusion-shaped, 32x32 latents, 77 text tokens) and DiT
(DiT-S/2 on 32x32 latents) are timed only: random weights draw nothing to judge.

Timing: the best of ``rounds`` runs after a warm-up, interleaved (each round runs every setting once, so
the machine's changing load falls on all alike), on ``threads`` threads (ONNX Runtime's intra-op pool
and torch's, default 1: on a machine shared with other work a larger pool mostly measures the others). Beside
the measured speed-up, each row gives the speed-up in multiply-adds of the run (``flop_seconds``): what the
cut saves regardless of the machine's load.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEFAULT_JSON = "bench/results/diffusion.json"
QUALITY_SAMPLES = 100


def _label(setting) -> str:
    return "uncached" if setting is None else setting.name


def _interleaved_times(runners, scheduler, noise, steps: int, conditioning: dict, rounds: int) -> list[float]:
    """Seconds of each runner's whole sampling run, the best of ``rounds``: each round runs every runner once
    (after one untimed warm-up round), so a change in the machine's load falls on all of them alike."""
    import torch

    from ..diffusion import sample

    best = [float("inf")] * len(runners)
    with torch.no_grad():
        for r in range(rounds + 1):
            for k, runner in enumerate(runners):
                start = time.perf_counter()
                sample(runner, scheduler, noise, steps, **conditioning)
                if r:
                    best[k] = min(best[k], time.perf_counter() - start)
    return best


def _digits_settings():
    from ..diffusion import Combined, DeepCache, DiffusionToMe

    return [
        DeepCache(interval=2),
        DeepCache(interval=3),
        DeepCache(interval=3, branch=2),
        DeepCache(interval=4),
        DeepCache(interval=5),
        DeepCache(interval=4, schedule="nonuniform"),
        DiffusionToMe(ratio=0.5),
        DiffusionToMe(ratio=0.7),
        Combined((DeepCache(interval=3), DiffusionToMe(ratio=0.5))),
    ]


def _dit(seed: int = 0):
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=6,
        attention_head_dim=64,
        in_channels=4,
        out_channels=8,
        num_layers=12,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()


def _models(names):
    """(name, model, sample shape [c, h, w], conditioning(batch) -> kwargs, settings, judged) per model."""
    import torch

    from ..diffusion import BlockCache, Combined, DeepCache, DiffusionToMe, TGate
    from ..models import real

    for name in names:
        if name == "digits":
            yield (
                "digits",
                None,
                (1, 16, 16),
                lambda b: {"class_labels": torch.arange(b) % 10},
                _digits_settings(),
                True,
            )
        elif name == "unet2d_condition":
            step, (x, _, text) = real.build("unet2d_condition", "bench")
            cond = lambda b, text=text: {"encoder_hidden_states": text.expand(b, -1, -1).contiguous()}
            settings = [
                DeepCache(interval=3),
                DeepCache(interval=5),
                TGate(gate=10),
                DiffusionToMe(ratio=0.5),
                Combined((DeepCache(interval=3), DiffusionToMe(ratio=0.5))),
            ]
            yield name, step.unet, tuple(x.shape[1:]), cond, settings, False
        elif name == "dit":
            settings = [BlockCache(interval=2), BlockCache(interval=3), DiffusionToMe(ratio=0.5)]
            yield "dit", _dit(), (4, 32, 32), lambda b: {"class_labels": torch.arange(b) % 1000}, settings, False


def run_diffusion(
    models=("digits", "unet2d_condition", "dit"),
    *,
    batches=(1, 8),
    steps: int = 50,
    rounds: int = 3,
    threads: int = 1,
    json_path: str | None = DEFAULT_JSON,
    cache_dir: str | None = None,
    select: str | None = None,
    say=print,
) -> list[dict]:
    """Run the bench; returns its rows (also written to ``json_path``) and prints the table. ``select``: only the
    settings whose name contains it (and uncached), e.g. "ToMe"."""
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from ..cache import cache_dir as nnforge_cache_dir
    from ..diffusion import compile_denoiser, sample
    from ..diffusion.budget import flop_seconds
    from ..diffusion.metrics import psnr, ssim
    from ..models.digits_diffusion import trained_once
    from ..models.real import ensure_torchvision

    ensure_torchvision()
    from diffusers import DDIMScheduler

    torch.set_num_threads(threads)
    build = {"threads": threads}
    rows: list[dict] = []
    digits = None
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("diffusion bench", total=None)
        for name, model, shape, cond, settings, judged in _models(models):
            settings = [x for x in settings if select is None or select in x.name]
            if name == "digits":
                progress.update(task, description="digits: training or loading the model")
                digits = trained_once(Path(cache_dir or nnforge_cache_dir()) / "digits-diffusion")
                model, scheduler = digits.unet, digits.scheduler("ddim")
            else:
                scheduler = DDIMScheduler(num_train_timesteps=1000)
            all_settings = [None, *settings]
            model_rows = [{"model": name, "setting": _label(x), "steps": steps} for x in all_settings]
            for b in batches:
                progress.update(task, description=f"{name}: compiling for batch {b}")
                noise = torch.randn((b, *shape), generator=torch.Generator().manual_seed(b))
                c = cond(b)
                denoisers = [compile_denoiser(model, noise, 999, cache=x, options=build, **c) for x in all_settings]
                runners = [*denoisers, model]  # eager diffusers last
                progress.update(task, description=f"{name}: timing batch {b} ({rounds} rounds)")
                times = _interleaved_times(runners, scheduler, noise, steps, c, rounds)
                for row, denoiser, seconds in zip(model_rows, denoisers, times):
                    row[f"s_b{b}"] = seconds
                    row[f"flop_s_b{b}"] = flop_seconds(denoiser, noise, steps, c)
                model_rows[0][f"eager_s_b{b}"] = times[-1]
            if judged:
                noise = torch.randn((QUALITY_SAMPLES, *shape), generator=torch.Generator().manual_seed(1))
                c = cond(QUALITY_SAMPLES)
                quality_ref = None
                for setting, row in zip(all_settings, model_rows):
                    progress.update(task, description=f"{name}: {row['setting']}, quality on {QUALITY_SAMPLES} samples")
                    denoiser = compile_denoiser(model, noise, 999, cache=setting, options=build, **c)
                    out = sample(denoiser, scheduler, noise, steps, **c)
                    quality_ref = out if setting is None else quality_ref
                    row["psnr"] = psnr(out, quality_ref)
                    row["ssim"] = ssim(out, quality_ref)
                    row["agreement"] = digits.agreement(out, c["class_labels"])
            rows += model_rows
            _write(rows, json_path)  # as it goes: a long run interrupted keeps its rows
            base = next(r for r in rows if r["model"] == name and r["setting"] == "uncached")
            for r in rows:
                if r["model"] == name:
                    for b in batches:
                        r[f"speedup_b{b}"] = base[f"s_b{b}"] / r[f"s_b{b}"]
                        r[f"flop_speedup_b{b}"] = base[f"flop_s_b{b}"] / r[f"flop_s_b{b}"]
            if judged:
                rows.append(_budget_row(digits, steps, build, progress, task, rows, settings))
                _write(rows, json_path)
    _write(rows, json_path)
    say(format_table(rows, batches))
    return rows


def _write(rows: list[dict], json_path: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=1))


def _budget_row(digits, steps: int, build: dict, progress, task, rows: list[dict], settings: list) -> dict:
    """The budget's choice for a 1-point agreement budget (and PSNR >= 25 dB), searched on its own calibration
    noise, its quality measured on held-out noise; its timings are those of the same setting's row."""
    import torch

    from ..diffusion.budget import search_cache
    from ..passes.budget import Budget

    progress.update(task, description="digits: budget search (1 point of agreement)")
    labels = torch.arange(QUALITY_SAMPLES) % 10
    noise = torch.randn((QUALITY_SAMPLES, 1, 16, 16), generator=torch.Generator().manual_seed(2))
    choice = search_cache(
        digits.unet,
        noise,
        digits.scheduler("ddim"),
        Budget(metric="agreement", max_drop=0.01),
        steps=steps,
        candidates=settings,
        classify=digits.classify,
        min_psnr=25.0,
        timing="flops",  # the search's own timings are what the rows above measure; count MACs to choose
        compile_options={"options": build},
        class_labels=labels,
    )
    held = choice.heldout
    chosen = choice.setting.name if choice.setting else "uncached"
    timed = next(r for r in rows if r["model"] == "digits" and r["setting"] == chosen)
    return {
        **{k: timed[k] for k in timed if k.startswith(("s_b", "speedup_b", "flop_"))},
        "model": "digits",
        "setting": f"budget 1 pt -> {chosen}",
        "steps": steps,
        "psnr": held.psnr if held else float("inf"),
        "ssim": held.ssim if held else 1.0,
        "agreement": held.agreement if held else choice.heldout_reference.agreement,
        "budget_speedup_b100": choice.speedup,
        "report": choice.report(),
    }


def format_table(rows: list[dict], batches=(1, 8)) -> str:
    """The rows as a markdown table (what docs/diffusion.md shows)."""
    head = ["model", "setting"]
    for b in batches:
        head += [f"b{b} s", f"b{b} x"]
    head += ["MACs x"]
    head += ["PSNR dB", "SSIM", "agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        cells = [r["model"], r["setting"]]
        for b in batches:
            eager = r.get(f"eager_s_b{b}")
            secs = f(r.get(f"s_b{b}"), ".3f") + (f" (eager {eager:.3f})" if eager else "")
            cells += [secs, f(r.get(f"speedup_b{b}"), ".2f")]
        cells += [f(r.get(f"flop_speedup_b{batches[-1]}"), ".2f")]
        agree = r.get("agreement")
        cells += [f(r.get("psnr"), ".1f"), f(r.get("ssim"), ".3f"), "-" if agree is None else f"{agree:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
