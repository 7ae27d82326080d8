"""A class-conditional diffusion model trained on scikit-learn's digits, and a digit classifier to judge its samples.

The real model the step-caching passes (``nnforge.diffusion``) are measured on: ``digits_diffusion()`` loads the
digits upsampled to 16x16 (``nnforge.models.digits.load_data``, scaled to [-1, 1]), trains a diffusers
``UNet2DModel`` with class embeddings (three resolutions 16/8/4, 32/64/64 channels, self-attention at 4x4)
by DDPM's noise-prediction loss on a cosine noise schedule, and a small CNN classifier on the same images.
A sample "agrees" when the classifier reads the class it was generated for: the measure of how much a lossy
setting changes what the model draws.

Training is sized for a test session on a shared 2-core machine: one thread, bf16 autocast where the CPU
has native bf16 (as the digits ViT), fixed seeds, AdamW with warm-up and cosine decay and an EMA of the
weights (what is sampled from). ``trained_once(dir)`` trains it once and keeps the weights in ``dir``: the
tests (fixture ``digits_diffusion``) and ``nnforge bench --diffusion`` use it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .digits import _bf16, load_data

IMG = 16
TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"

UNET_CONFIG = dict(
    sample_size=IMG,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    num_class_embeds=10,
    norm_num_groups=8,
    attention_head_dim=16,
)


@dataclass
class DigitsDiffusion:
    unet: torch.nn.Module  # diffusers UNet2DModel (EMA weights), eval mode
    classifier: torch.nn.Module  # [n, 1, 16, 16] in [-1, 1] -> [n, 10] logits, eval mode
    classifier_accuracy: float  # on the digits never trained on

    def scheduler(self, kind: str = "ddim"):
        """A diffusers scheduler with the training noise schedule: "ddim" (deterministic) or "ddpm"."""
        from diffusers import DDIMScheduler, DDPMScheduler

        cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[kind]
        return cls(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE, clip_sample=True)

    def classify(self, images) -> np.ndarray:
        """Predicted digit per image ([n, 1, 16, 16] in [-1, 1], torch or numpy)."""
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        with torch.no_grad():
            return self.classifier(x).argmax(-1).numpy()

    def agreement(self, images, labels) -> float:
        """Fraction of images the classifier reads as the class they were generated for."""
        return float((self.classify(images) == np.asarray(labels)).mean())


def images(img: int = IMG) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) in [-1, 1], the split of ``nnforge.models.digits``."""
    x_train, y_train, x_test, y_test = load_data(img)
    return x_train * 2, y_train, x_test * 2, y_test


class DigitClassifier(torch.nn.Sequential):
    def __init__(self):
        super().__init__(
            torch.nn.Conv2d(1, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Dropout(0.3),
            torch.nn.Linear(64 * 16, 10),
        )


def _cosine_lr(opt, steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))),
    )


def train_classifier(x: np.ndarray, y: np.ndarray, *, steps: int = 600, batch: int = 64, seed: int = 0):
    """The digit classifier, trained with light noise added (it reads generated images, not only clean ones)."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    if steps == 0:
        return model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = _cosine_lr(opt, steps, max(1, steps // 10))
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (batch,), generator=gen)
        xb = xt[idx] + 0.1 * torch.randn(xt[idx].shape, generator=gen)
        loss = F.cross_entropy(model(xb), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def train_unet(
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int = 600,
    batch: int = 64,
    lr: float = 2e-3,
    ema: float = 0.995,
    seed: int = 0,
    progress=None,
):
    """DDPM training (noise prediction, cosine schedule) of the class-conditional UNet2DModel; returns the EMA
    weights in eval mode. ``progress(step)`` is called once per step."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(**UNET_CONFIG)
    if steps == 0:
        return model.eval()
    averaged = copy.deepcopy(model).requires_grad_(False)
    noise_schedule = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = _cosine_lr(opt, steps, max(1, steps // 20))
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    bf16 = _bf16()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(xt), (batch,), generator=gen)
        clean, labels = xt[idx], yt[idx]
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, TRAIN_TIMESTEPS, (batch,), generator=gen)
        noisy = noise_schedule.add_noise(clean, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = model(noisy, t, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema, (1 + step) / (10 + step))  # short warm-up of the average
        with torch.no_grad():
            for a, p in zip(averaged.parameters(), model.parameters()):
                a.lerp_(p, 1 - decay)
        if progress is not None:
            progress(step)
    return averaged.eval()


def digits_diffusion(*, unet_steps: int = 600, classifier_steps: int = 600, progress=None) -> DigitsDiffusion:
    """Load the digits, train the U-Net and the classifier (one thread) and return both."""
    x_train, y_train, x_test, y_test = images()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        classifier = train_classifier(x_train, y_train, steps=classifier_steps)
        unet = train_unet(x_train, y_train, steps=unet_steps, progress=progress)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = float((classifier(torch.from_numpy(x_test)).argmax(-1).numpy() == y_test).mean())
    return DigitsDiffusion(unet, classifier, accuracy)


def trained_once(cache_dir) -> DigitsDiffusion:
    """``digits_diffusion()``, trained at most once per ``cache_dir``: the first process to need it trains and saves
    the weights there (safetensors, under a file lock); the others (test workers, the bench's next run) load them."""
    import os
    from pathlib import Path

    from filelock import FileLock  # a torch dependency
    from safetensors.torch import load_file, save_file

    weights = Path(cache_dir) / "digits-diffusion.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{weights}.lock"):
        if weights.is_file():
            model = digits_diffusion(unet_steps=0, classifier_steps=0)  # the same networks, untrained
            state = load_file(weights)
            for name, net in (("unet", model.unet), ("classifier", model.classifier)):
                prefix = f"{name}."
                net.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            model.classifier_accuracy = float(state["accuracy"])
            return model
        model = digits_diffusion()
        state = {f"unet.{k}": v.contiguous() for k, v in model.unet.state_dict().items()}
        state |= {f"classifier.{k}": v.contiguous() for k, v in model.classifier.state_dict().items()}
        state["accuracy"] = torch.tensor(model.classifier_accuracy)
        tmp = weights.with_name(f"{weights.name}.{os.getpid()}.tmp")
        save_file(state, tmp)
        os.replace(tmp, weights)
        return model
