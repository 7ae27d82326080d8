"""A small sampling loop over diffusers' schedulers (DDIM, DDPM, ...), for denoising without a pipeline.

``sample(denoiser, scheduler, noise, steps=50, **conditioning)`` runs the scheduler's timesteps, calling the
denoiser as a diffusers pipeline does (``denoiser(x, t, **conditioning)``), so it drives an eager diffusers
model and a compiled ``StepCachedDenoiser`` alike. A step-cached denoiser is told that a new run begins.
"""

from __future__ import annotations


def noise_prediction(out):
    """The tensor a denoiser returned: diffusers output objects carry it as ``.sample``, tuples first."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def sample(denoiser, scheduler, noise, steps: int = 50, *, generator=None, eta: float = 0.0, **conditioning):
    """Denoise ``noise`` in ``steps`` scheduler steps; returns the final sample (torch tensor).

    ``conditioning`` goes to every denoiser call (``class_labels=``, ``encoder_hidden_states=``);
    ``eta`` and ``generator`` to a DDIM scheduler's step (eta 0: deterministic)."""
    import torch

    scheduler.set_timesteps(steps)
    if hasattr(denoiser, "reset"):
        denoiser.reset(len(scheduler.timesteps))
    x = noise * scheduler.init_noise_sigma
    step_options = {"eta": eta} if "eta" in scheduler.step.__code__.co_varnames else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            timesteps = t.reshape(1).expand(x.shape[0])  # one per sample, as pipelines pass them (DiT needs it)
            pred = noise_prediction(denoiser(model_input, timesteps, **conditioning))
            if pred.shape[1] == 2 * x.shape[1]:  # a learned variance (DiT) rides along: the noise is the first half
                pred = pred[:, : x.shape[1]]
            x = scheduler.step(pred, t, x, generator=generator, **step_options).prev_sample
    return x
