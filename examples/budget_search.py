"""Accuracy-budgeted compression of a ViT trained on scikit-learn's digits, timed on ONNX Runtime.

    python examples/budget_search.py [--max-drop 0.01] [--plot pareto.png] [--backend onnxrt|tvm]

Trains a small ViT for a few seconds, then searches token merging, token pruning and layer skipping
jointly for the fastest setting whose top-1 agreement with the lossless model drops by at most
``--max-drop`` on calibration data, checks it on held-out digits it was not chosen on, and saves a
speed-vs-quality plot.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from nnforge.backends.base import get_backend
from nnforge.frontend.torch import import_torch
from nnforge.ir import interpret
from nnforge.passes.blocks import prepare
from nnforge.passes.budget import Budget, plot_pareto, search, wall_time
from nnforge.targets import get_target
from nnforge.zoo import ViT


def train_digits_vit(steps: int = 400):
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    torch.manual_seed(0)
    d = load_digits()
    x = (d.images / 16.0 - 0.5).astype(np.float32)[:, None]
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], d.target[order].astype(np.int64)
    model = ViT(img=8, patch=2, dim=32, depth=4, heads=4, classes=10, in_ch=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    xt, yt = torch.from_numpy(x[:1300]), torch.from_numpy(y[:1300])
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (128,))
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-drop", type=float, default=0.01)
    ap.add_argument("--plot", default="pareto.png")
    ap.add_argument("--backend", default="onnxrt", choices=["onnxrt", "tvm"])
    args = ap.parse_args()

    model, x, y = train_digits_vit()
    batch = torch.export.Dim("batch", min=1, max=1024)
    graph = prepare(import_torch(model, (torch.from_numpy(x[:4]),), dynamic_shapes=({0: batch},)))
    # both unseen in training (the model is over-confident on its training images); kept apart from each other
    calibration = [[x[i:i + 100]] for i in range(1300, 1600, 100)]
    heldout = [[x[i:i + 100]] for i in range(1600, len(x), 100)]

    backend, cpu = get_backend(args.backend), get_target("cpu")
    timing = [x[:1000]]  # a large batch: compute, not per-op overhead, decides the time of so small a model
    options = {"threads": 1} if args.backend == "onnxrt" else {}
    time_fn = wall_time(lambda g: backend.build(g, cpu, options).run, timing, repeat=10)
    result = search(graph, Budget(metric="top1", max_drop=args.max_drop), calibration, heldout, time_fn=time_fn,
                    progress=True, backend=args.backend)
    print(result.report())
    acc = [float((np.concatenate([interpret(g, b)[0] for b in heldout]).argmax(-1) == y[1600:]).mean())
           for g in (graph, result.graph)]
    print(f"held-out digits accuracy: lossless {acc[0]:.1%}, chosen {acc[1]:.1%}")
    plot_pareto(result, args.plot)
    print(f"speed vs quality plot: {args.plot}")


if __name__ == "__main__":
    main()
