"""A tiny ViT trained on scikit-learn's digits (8x8 images), shared by the token/layer/budget tests.

Trained once per test process (a few seconds) with fixed seeds; ``digits_vit()`` caches it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nnforge.ir import Graph
from nnforge.zoo import ViT


@dataclass
class DigitsViT:
    model: torch.nn.Module
    graph: Graph           # imported and fused (blocks found on it)
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def batches(self, x: np.ndarray, size: int = 100) -> list[list[np.ndarray]]:
        return [[x[i:i + size]] for i in range(0, len(x), size)]


def _data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0 - 0.5).astype(np.float32)[:, None]  # [n, 1, 8, 8]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1300], y[:1300], x[1300:], y[1300:]


@functools.lru_cache(maxsize=1)
def digits_vit(steps: int = 400) -> DigitsViT:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only spin against each other on a shared machine
    try:
        return _train(steps)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int) -> DigitsViT:
    from nnforge.frontend.torch import import_torch
    from nnforge.passes.blocks import prepare

    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = _data()
    model = ViT(img=8, patch=2, dim=32, depth=4, heads=4, classes=10, in_ch=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (128,), generator=gen)
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    example = (torch.from_numpy(x_test[:4]),)
    batch = torch.export.Dim("batch", min=1, max=1024)
    graph = prepare(import_torch(model, example, dynamic_shapes=({0: batch},)))
    return DigitsViT(model, graph, x_train, y_train, x_test, y_test)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(logits, -1) == labels).mean())
