"""A small ViT trained on scikit-learn's digits: the real model the lossy passes are tested and demonstrated on.

``digits_vit()`` loads the 1797 digits, upsamples the 8x8 images to 16x16 (bilinear, once), splits them
with a fixed seed (1300 for training, 497 unseen), trains ``ViT(img=16, patch=2, dim=64, depth=6,
heads=4)`` (64 patch tokens + a class token, 6 blocks) and imports it through nnforge with the blocks
found (``passes.blocks.prepare``). The unseen images are split again: ``calibration()`` (the first 200,
what the lossy passes and the budget search calibrate on) and ``heldout()`` (the other 297, what a
chosen setting is checked on).

Training follows the usual ViT recipe, scaled down to ~18 s on one CPU thread (800 steps of 16 images,
about 10 epochs): AdamW (weight decay 0.01, fused), linear warm-up then cosine decay, stochastic depth
(drop path 0.2 in the last block, rising linearly from 0 at the first, as timm's ``drop_path_rate``),
2-D sin-cos position embeddings (as in MAE) as the initial value of the learned ones, residual
branches whose output projections start at zero (like SkipInit / a LayerScale started at 0), and
bf16 autocast where the CPU has native bf16 (AVX512-BF16 or AMX; elsewhere the same steps run in
fp32, about twice as slowly). Seeds are fixed, so a machine gets the same model every time: 97.4% of
the 497 unseen digits here. Needs scikit-learn (a dev dependency), imported when the data is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..ir import Graph
from .zoo import ViT

IMG, PATCH = 16, 2
TRAIN = 1300  # images trained on; the remaining 497 are never trained on
CALIBRATION = 200  # of the unseen images: calibration, then held-out


@dataclass
class DigitsViT:
    model: torch.nn.Module  # eval mode
    graph: Graph  # imported, fused, blocks found; symbolic batch
    x_train: np.ndarray  # [1300, 1, 16, 16] float32
    y_train: np.ndarray
    x_test: np.ndarray  # [497, 1, 16, 16], unseen in training
    y_test: np.ndarray

    @staticmethod
    def batches(x: np.ndarray, size: int = 100) -> list[list[np.ndarray]]:
        return [[x[i : i + size]] for i in range(0, len(x), size)]

    def calibration(self, size: int = 100) -> list[list[np.ndarray]]:
        return self.batches(self.x_test[:CALIBRATION], size)

    def heldout(self, size: int = 100) -> list[list[np.ndarray]]:
        return self.batches(self.x_test[CALIBRATION:], size)

    @property
    def y_heldout(self) -> np.ndarray:
        return self.y_test[CALIBRATION:]


def load_data(img: int = IMG) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): the digits scaled to [-0.5, 0.5], upsampled to img x img, shuffled with seed 0."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0 - 0.5).astype(np.float32)[:, None])  # [n, 1, 8, 8]
    if img != x.shape[-1]:
        x = F.interpolate(x, size=(img, img), mode="bilinear", align_corners=False)
    x, y = x.numpy(), d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = np.ascontiguousarray(x[order]), y[order]
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def sincos_2d(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[grid * grid, dim] fixed 2-D sin-cos position embeddings (MAE, "Better plain ViT baselines")."""
    yy, xx = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / max(dim // 4 - 1, 1))
    ys, xs = yy.flatten()[:, None] * omega, xx.flatten()[:, None] * omega
    return torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], 1)


def _bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def train_digits_vit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    dim: int = 64,
    depth: int = 6,
    heads: int = 4,
    drop_path: float = 0.2,
    steps: int = 800,
    batch: int = 16,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    warmup: float = 0.1,
    seed: int = 0,
) -> torch.nn.Module:
    """Train the ViT on (already upsampled) images; returns it in eval mode. One thread: the model is small and
    test workers train side by side."""
    img = x_train.shape[-1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)  # initial weights and the drop-path masks
        model = ViT(img=img, patch=PATCH, dim=dim, depth=depth, heads=heads, classes=10, in_ch=1, drop_path=drop_path)
        with torch.no_grad():
            model.pos_embed.zero_()
            model.pos_embed[0, 1:] = sincos_2d(img // PATCH, dim)
            for block in model.blocks:
                block.attn.proj.weight.zero_()
                block.fc2.weight.zero_()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99), fused=True)
        warm = max(1, int(warmup * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))),
        )
        gen = torch.Generator().manual_seed(seed)
        xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
        bf16 = _bf16()
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(xt), (batch,), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(xt[idx])
            loss = F.cross_entropy(logits.float(), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return model.eval()
    finally:
        torch.set_num_threads(threads)


def digits_vit(**train_options) -> DigitsViT:
    """Load the data, train the ViT and import it (batch dimension symbolic, up to 1024)."""
    from ..frontend.torch import import_torch
    from ..passes.blocks import prepare

    x_train, y_train, x_test, y_test = load_data()
    model = train_digits_vit(x_train, y_train, **train_options)
    batch = torch.export.Dim("batch", min=1, max=1024)
    graph = prepare(import_torch(model, (torch.from_numpy(x_test[:4]),), dynamic_shapes=({0: batch},)))
    return DigitsViT(model, graph, x_train, y_train, x_test, y_test)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(logits, -1) == labels).mean())
