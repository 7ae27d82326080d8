"""Self-speculative decoding (Draft & Verify) on the GPT family: a layer-skipped draft from the same IR.

    python examples/gpt_speculative.py            # the bench GPT (4 blocks, d=256), skipping 1 block
    python examples/gpt_speculative.py --tiny

The draft skips the blocks with the least influence on calibration prompts (ShortGPT's block
influence); the output is token-for-token greedy decoding with the full model.
"""

from __future__ import annotations

import argparse

import numpy as np

from nnforge.frontend.torch import import_torch
from nnforge.models import zoo
from nnforge.passes.blocks import prepare
from nnforge.speculative import compare, self_speculative


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--skip", type=int, default=1)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per verification")
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()

    zm = zoo.build("gpt", "tiny" if args.tiny else "bench")  # exported at batch 2, decoded at batch 1
    graph = prepare(import_torch(zm.model, zm.inputs, dynamic_shapes=zm.dynamic_shapes))
    rng = np.random.default_rng(0)
    vocab = 100 if args.tiny else 1000
    calibration = [[rng.integers(0, vocab, (2, 16)).astype(np.int64)] for _ in range(2)]
    full, draft = self_speculative(graph, skip=args.skip, calibration=calibration)
    print(f"full graph: {full.op_counts()['attention']} blocks; draft: {draft.op_counts()['attention']} blocks")
    prompt = [int(t) for t in rng.integers(0, vocab, 8)]
    report = compare(full, draft, prompt, args.tokens, k=args.k)
    print(report)
    assert report.equal


if __name__ == "__main__":
    main()
