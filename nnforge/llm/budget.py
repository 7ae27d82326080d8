"""The budget for decoders: the fastest decoding setting whose quality loss fits ``nnforge.Budget``.

    lm = nnforge.compile_lm(model, budget=nnforge.Budget(metric="perplexity", max_drop=0.03),
                            heldout=ids, prompt=prompt_ids)

Metrics that fit decoding (``Budget.metric``):

    perplexity  relative perplexity increase on held-out text over the float model (0.03: within 3%)
    greedy      fraction of greedy tokens (``GREEDY_TOKENS`` after ``prompt``) that differ from the float
                model's, counted up to the first difference (a changed token changes everything after it)

Candidates (``Budget.quantize`` narrows them): int4 (float zero points), int4 with integer zero points and
an int4 embedding ("int4-intzero"), int8, and float, each alone and with an H2O cache of half the float run's slots.
Each is compiled, its decode speed measured on ``prompt`` and its quality computed; the fastest within
the budget wins. The report lists every candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import NnforgeError
from ..passes.budget import Budget
from ..passes.lowbit.settings import Quantize
from .kv import KVCompress

GREEDY_TOKENS = 64
QUANTIZE = {
    "float": None,
    "int8": "int8",
    "int4": "int4",
    "int4-intzero": Quantize(weights="int4", group_size=32, embeddings="int4"),
}


@dataclass
class Candidate:
    quantize: str
    kv: KVCompress | None
    tokens_per_second: float = 0.0
    loss: float = 0.0
    fits: bool = False
    lm: object = None  # the compiled model, kept for the fastest fitting candidate only

    def __str__(self) -> str:
        kv = f" + {self.kv.policy} {self.kv.budget} slots" if self.kv else ""
        return f"{self.quantize}{kv}"


@dataclass
class LMBudgetResult:
    chosen: Candidate
    candidates: list[Candidate]
    metric: str
    max_drop: float

    def report(self) -> str:
        lines = [f"decoder budget: {self.metric} loss <= {self.max_drop:g}"]
        for c in sorted(self.candidates, key=lambda c: -c.tokens_per_second):
            mark = "*" if c is self.chosen else " "
            ok = "fits" if c.fits else "over"
            lines.append(f" {mark} {str(c):32s} {c.tokens_per_second:7.1f} tok/s  loss {c.loss:.4f}  {ok}")
        return "\n".join(lines)


def _greedy_loss(tokens: Sequence[int], reference: Sequence[int]) -> float:
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
    return 1.0 - same / len(reference)


def search(model, budget: Budget, heldout: Sequence[int], prompt: Sequence[int], **compile_kwargs) -> LMBudgetResult:
    """Compile every candidate, measure it, pick the fastest within the budget (float always fits)."""
    from .compiled import compile_lm

    if budget.metric not in ("perplexity", "greedy"):
        raise NnforgeError(f"decoder budget: metric must be 'perplexity' or 'greedy', got {budget.metric!r}")
    names = list(budget.quantize) if budget.quantize else list(QUANTIZE)
    bad = [n for n in names if n not in QUANTIZE]
    if bad:
        raise NnforgeError(f"decoder budget: unknown quantize choices {bad}; choose from {list(QUANTIZE)}")
    if "float" not in names:
        names.append("float")
    slots = len(prompt) + GREEDY_TOKENS
    candidates = [Candidate(n, kv) for n in names for kv in (None, KVCompress("h2o", budget=max(slots // 2, 24)))]
    reference_tokens = reference_ppl = None
    for cand in sorted(candidates, key=lambda c: (c.quantize != "float", c.kv is not None)):  # float first
        lm = compile_lm(model, quantize=QUANTIZE[cand.quantize], kv=cand.kv, **compile_kwargs)
        gen = lm.generate(list(prompt), max_new_tokens=GREEDY_TOKENS, stop_tokens=())
        cand.tokens_per_second = gen.decode_tokens_per_second
        if budget.metric == "perplexity":
            ppl = lm.perplexity(heldout)
            reference_ppl = reference_ppl or ppl
            cand.loss = ppl / reference_ppl - 1.0
        else:
            reference_tokens = reference_tokens or gen.tokens[0]
            cand.loss = _greedy_loss(gen.tokens[0], reference_tokens)
        cand.fits = cand.loss <= budget.max_drop
        best = max(
            (c for c in candidates if c.fits and c.lm is not None), key=lambda c: c.tokens_per_second, default=None
        )
        if cand.fits and (best is None or cand.tokens_per_second > best.tokens_per_second):
            if best is not None:
                best.lm = None
            cand.lm = lm
    chosen = next(c for c in candidates if c.lm is not None)
    return LMBudgetResult(chosen, candidates, budget.metric, budget.max_drop)
