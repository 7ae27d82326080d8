"""Token pruning by received attention: EViT-style on a ViT, PyramidDrop-style on a GPT prompt (prefill).

python examples/token_prune.py
"""

from __future__ import annotations

from nnforge.frontend.torch import import_torch
from nnforge.ir import interpret
from nnforge.models import zoo
from nnforge.passes.blocks import prepare
from nnforge.passes.manager import PassContext
from nnforge.passes.tokens import TokenPrune, TokenPrunePass


def fused(family: str, size: str = "tiny"):
    zm = zoo.build(family, size)
    return prepare(import_torch(zm.model, zm.inputs, dynamic_shapes=zm.dynamic_shapes)), [t.numpy() for t in zm.inputs]


def main():
    vit, x = fused("vit")
    ref = interpret(vit, x)[0]
    for cfg in (TokenPrune(keep=0.7), TokenPrune(keep=0.5, fuse_dropped=True)):
        g = vit.copy()
        res = TokenPrunePass(cfg).run(g, PassContext())
        out = interpret(g, x)[0]
        agree = (out.argmax(-1) == ref.argmax(-1)).mean()
        print(f"ViT  {cfg}: tokens {res.stats['tokens']} (score {res.stats['score']}); top-1 agreement {agree:.0%}")

    gpt, (ids,) = fused("gpt")
    ref = interpret(gpt, [ids])[0]
    g = gpt.copy()
    res = TokenPrunePass(TokenPrune(keep=0.5, layers=[1])).run(g, PassContext())
    out = interpret(g, [ids])[0]
    same = (out[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).all()
    print(
        f"GPT prefill, keep 50% from block 1: logits {ref.shape} -> {out.shape}; the last token is always kept: "
        f"next-token prediction {'unchanged' if same else 'changed'}"
    )


if __name__ == "__main__":
    main()
