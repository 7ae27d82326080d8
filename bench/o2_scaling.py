"""How the O2 pipeline's time grows with graph size: a ViT of N small blocks at ~400 and ~1500 IR nodes.

    python bench/o2_scaling.py                 # depths 16 and 64 (about 400 and 1550 nodes after import)
    python bench/o2_scaling.py --depth 6 24 96 --top 8

Prints, per depth, the node count, the slowest passes (seconds, summed over their runs) and the total,
then the ratio of the largest to the smallest graph in nodes and in time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # time this checkout's nnforge, not an installed one

import nnforge
from nnforge.models.zoo import ViT
from nnforge.passes.manager import PassManager


def build_graph(depth: int):
    torch.manual_seed(0)
    model = ViT(img=32, patch=8, dim=32, depth=depth, heads=4, classes=10).eval()
    return nnforge.import_model(model, (torch.randn(2, 3, 32, 32),))


def time_o2(depth: int, top: int) -> tuple[int, float]:
    graph = build_graph(depth)
    nodes = len(graph.nodes)
    pm = PassManager("O2")
    t0 = time.perf_counter()
    out = pm.run(graph)
    total = time.perf_counter() - t0
    per_pass: dict[str, float] = defaultdict(float)
    for rec in pm.records:
        per_pass[rec.name] += rec.seconds
    slowest = sorted(per_pass.items(), key=lambda kv: -kv[1])[:top]
    print(f"depth {depth}: {nodes} nodes -> {len(out.nodes)} after O2, total {total:.3f} s")
    for name, secs in slowest:
        print(f"    {name:22s} {secs:8.3f} s")
    return nodes, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, nargs="+", default=[16, 64], help="transformer blocks per graph")
    ap.add_argument("--top", type=int, default=6, help="how many of the slowest passes to show")
    args = ap.parse_args()
    results = [time_o2(d, args.top) for d in args.depth]
    (n0, t0), (n1, t1) = results[0], results[-1]
    if len(results) > 1:
        print(f"{n1 / n0:.1f}x the nodes took {t1 / t0:.1f}x the time")


if __name__ == "__main__":
    main()
