"""Self-speculative decoding (Draft & Verify): a layer-skipped draft of a decoder proposes tokens, the
full model checks them in one pass.

Both graphs come from one IR (``self_speculative``): the draft is the full graph with its least
influential blocks skipped. ``generate`` drafts ``k`` tokens greedily with the draft, runs the full
model once over the prompt plus the drafts, keeps the drafts up to the first disagreement and then
the full model's own token there. Every kept token is the full model's greedy choice for its
prefix, so the output is token-for-token greedy decoding with the full model; what changes is how
many full passes it takes (the acceptance rate sets the speed-up).

A model is anything that maps ``[ids]`` to ``[logits]``: an IR Graph (run by the interpreter), an
object with ``run(list_of_arrays)`` (a backend Artifact, a CompiledModel) or a plain callable.
Logits are ``[batch, seq, vocab]``; decoding runs one sequence (batch 1) without a KV cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import NnforgeError
from .ir import Graph, interpret

Runner = Callable[[list], list]


def as_runner(model: Any) -> Runner:
    if isinstance(model, Graph):
        return lambda inputs: interpret(model, inputs)
    if hasattr(model, "run"):
        return model.run
    if callable(model):
        return model
    raise NnforgeError(f"speculative: cannot run a {type(model).__name__}; give a Graph, an artifact or a callable")


def _next_logits(run: Runner, ids: Sequence[int], dtype) -> np.ndarray:
    """Logits [seq, vocab] of one sequence."""
    out = run([np.asarray([ids], dtype=dtype)])[0]
    return np.asarray(out)[0]


@dataclass
class Generation:
    tokens: list[int]  # the new tokens (prompt excluded)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, kept
    full_calls: int = 0  # full-model passes
    draft_calls: int = 0  # draft-model passes
    seconds: float = 0.0
    history: list[int] = field(default_factory=list)  # accepted drafts per verification

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def greedy(model, prompt: Sequence[int], max_new_tokens: int, dtype="int64") -> Generation:
    """Plain greedy decoding with one model: the reference speculative decoding must equal."""
    run, ids = as_runner(model), list(int(t) for t in prompt)
    t0 = time.perf_counter()
    new: list[int] = []
    for _ in range(max_new_tokens):
        new.append(int(np.argmax(_next_logits(run, ids + new, dtype)[-1])))
    return Generation(new, full_calls=max_new_tokens, seconds=time.perf_counter() - t0)


def generate(full, draft, prompt: Sequence[int], max_new_tokens: int, k: int = 4, dtype="int64") -> Generation:
    """Greedy decoding with the full model, accelerated by drafts from ``draft`` (k per verification)."""
    if k < 1:
        raise NnforgeError(f"speculative: k must be >= 1, got {k}")
    run_full, run_draft = as_runner(full), as_runner(draft)
    ids = list(int(t) for t in np.asarray(prompt).reshape(-1))
    gen = Generation([])
    t0 = time.perf_counter()
    while len(gen.tokens) < max_new_tokens:
        left = max_new_tokens - len(gen.tokens)
        proposal: list[int] = []
        for _ in range(min(k, left - 1)):  # the verification pass always adds one token of its own
            proposal.append(int(np.argmax(_next_logits(run_draft, ids + gen.tokens + proposal, dtype)[-1])))
            gen.draft_calls += 1
        logits = _next_logits(run_full, ids + gen.tokens + proposal, dtype)
        gen.full_calls += 1
        start = len(ids) + len(gen.tokens) - 1  # logits row predicting the first proposed token
        choice = np.argmax(logits[start : start + len(proposal) + 1], axis=-1)
        n = 0
        while n < len(proposal) and proposal[n] == int(choice[n]):
            n += 1
        gen.tokens += proposal[:n] + [int(choice[n])]
        gen.drafted += len(proposal)
        gen.accepted += n
        gen.history.append(n)
    gen.tokens = gen.tokens[:max_new_tokens]
    gen.seconds = time.perf_counter() - t0
    return gen


def self_speculative(graph: Graph, skip: int = 1, calibration=None, blocks: Sequence[int] | None = None):
    """(full, draft) graphs from one IR: the draft skips the ``skip`` least influential blocks."""
    from .passes.layers import SkipLayers, SkipLayersPass
    from .passes.manager import PassContext

    draft = graph.copy()
    ctx = PassContext(calibration=calibration)
    SkipLayersPass(SkipLayers(n=skip, blocks=list(blocks) if blocks is not None else None)).run(draft, ctx)
    return graph, draft


@dataclass
class SpeculativeReport:
    equal: bool
    acceptance_rate: float
    speedup: float
    speculative: Generation
    reference: Generation

    def __str__(self) -> str:
        return (
            f"self-speculative decoding: {len(self.speculative.tokens)} tokens, "
            f"{'equal to' if self.equal else 'DIFFERENT from'} greedy; acceptance {self.acceptance_rate:.0%}, "
            f"{self.speculative.full_calls} full + {self.speculative.draft_calls} draft passes vs "
            f"{self.reference.full_calls} full; speed-up {self.speedup:.2f}x"
        )


def compare(full, draft, prompt: Sequence[int], max_new_tokens: int, k: int = 4) -> SpeculativeReport:
    """Run greedy and speculative decoding; report equality, acceptance rate and wall-clock speed-up."""
    ref = greedy(full, prompt, max_new_tokens)
    spec = generate(full, draft, prompt, max_new_tokens, k)
    return SpeculativeReport(
        ref.tokens == spec.tokens, spec.acceptance_rate, ref.seconds / max(spec.seconds, 1e-12), spec, ref
    )
