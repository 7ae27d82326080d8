"""Token merging (ToMe) on a ViT-S/16-shaped model: blocks found, tokens per block, speed-up on a backend.

    python examples/vit_token_merge.py            # ViT-S/16 at 224 (random weights), r=8 per block
    python examples/vit_token_merge.py --tiny     # the test-sized ViT, in seconds
    python examples/vit_token_merge.py --backend tvm   # TVM instead of ONNX Runtime
    python examples/vit_token_merge.py --threads 1     # one backend thread (ORT intra-op, TVM_NUM_THREADS)

Both graphs are built by the same backend from the same fused IR; only token_merge differs. They are
timed interleaved (three rounds, each keeps its best), so load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from nnforge.backends.base import get_backend
from nnforge.bench.harness import time_interleaved
from nnforge.frontend.torch import import_torch
from nnforge.ir import interpret
from nnforge.models import zoo
from nnforge.passes.blocks import find_blocks, format_blocks, prepare
from nnforge.passes.manager import PassContext
from nnforge.passes.tokens import TokenMerge, TokenMergePass
from nnforge.targets import get_target


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="the small test model instead of ViT-S/16")
    ap.add_argument("--r", type=int, default=None, help="tokens merged per block (default 8, tiny: 3)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=15, help="runs of each, over the three rounds")
    ap.add_argument("--backend", default="onnxrt", choices=["onnxrt", "tvm"])
    ap.add_argument("--threads", type=int, default=None, help="backend threads (default: the backend's own)")
    args = ap.parse_args()
    if args.threads:
        os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # read once, when TVM's pool starts
    r = args.r if args.r is not None else (3 if args.tiny else 8)

    zm = zoo.build("vit", "tiny" if args.tiny else "bench", batch=args.batch)
    graph = prepare(import_torch(zm.model, zm.inputs, dynamic_shapes=zm.dynamic_shapes))
    print(format_blocks(find_blocks(graph)))

    merged = graph.copy()
    res = TokenMergePass(TokenMerge(r=r)).run(merged, PassContext())
    print(f"\nToMe r={r}: tokens after each block: {res.stats['tokens']}")

    x = [t.numpy() for t in zm.inputs]
    backend, cpu = get_backend(args.backend), get_target("cpu")
    options = {"threads": args.threads} if args.threads and args.backend == "onnxrt" else {}
    base_art, tome_art = backend.build(graph, cpu, options), backend.build(merged, cpu, options)
    base, tome = base_art.run(x)[0], tome_art.run(x)[0]
    cos = (base * tome).sum(-1) / np.linalg.norm(base, axis=-1) / np.linalg.norm(tome, axis=-1)
    if args.tiny:  # the interpreter is the oracle; it is too slow for the full-size model
        np.testing.assert_allclose(tome, interpret(merged, x)[0], rtol=1e-4, atol=1e-5)
    best = time_interleaved({"base": lambda: base_art.run(x), "tome": lambda: tome_art.run(x)}, repeat=args.repeat)
    print(
        f"{args.backend} cpu, batch {args.batch}: lossless {best['base']:.1f} ms, ToMe {best['tome']:.1f} ms "
        f"-> {best['base'] / best['tome']:.2f}x faster; output cosine vs lossless: mean {cos.mean():.4f}, "
        f"min {cos.min():.4f}"
    )


if __name__ == "__main__":
    main()
