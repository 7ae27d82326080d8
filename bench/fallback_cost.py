"""What falling back costs: a model with one op only the torch executor runs, against the same model
without it, on each backend (median ms, interleaved). The fallback op is a custom torch op that
multiplies by one, so the difference is the partitioning itself: copies between partitions and
runtimes taking turns on the cores.

    python bench/fallback_cost.py [--repeat 50]
"""

from __future__ import annotations

import argparse

import torch

import nnforge
from nnforge.bench.harness import time_interleaved

_lib = torch.library.Library("nnfbench", "DEF")
_lib.define("same(Tensor x) -> Tensor")
_lib.impl("same", lambda x: x * 1.0, "CPU")
_lib.impl("same", lambda x: torch.empty_like(x), "Meta")


class Net(torch.nn.Module):
    """A small CNN; ``fallback`` puts the custom op between its two halves (and one more near the end)."""

    def __init__(self, fallback: bool):
        super().__init__()
        self.fallback = fallback
        conv = lambda: torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU())  # noqa: E731
        self.stem = torch.nn.Conv2d(3, 64, 3, padding=1)
        self.a = torch.nn.Sequential(*[conv() for _ in range(4)])
        self.b = torch.nn.Sequential(*[conv() for _ in range(4)])
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        y = self.a(self.stem(x))
        if self.fallback:
            y = torch.ops.nnfbench.same(y)
        y = self.b(y).mean((2, 3))
        if self.fallback:
            y = torch.ops.nnfbench.same(y)
        return self.head(y)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    plain, with_fallback = Net(False).eval(), Net(True).eval()
    with_fallback.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 56, 56)
    fns = {}
    for backend in ("onnxrt", "tvm"):
        for name, m in (("plain", plain), ("fallback", with_fallback)):
            c = nnforge.compile(m, (x,), backend=backend, cache=False, progress=False)
            fns[f"{backend} {name} ({c.artifact.backend})"] = lambda c=c: c(x)
    ms = time_interleaved(fns, args.repeat)
    for backend in ("onnxrt", "tvm"):
        keys = [k for k in ms if k.startswith(backend)]
        p, f = (ms[k] for k in keys)
        print(f"{keys[0]}: {p:.2f} ms   {keys[1]}: {f:.2f} ms   ratio {f / p:.2f}x")


if __name__ == "__main__":
    main()
