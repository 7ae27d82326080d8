"""Self-speculative decoding with the KV cache (Draft & Verify): a layer-skipped draft of the model shares
the full model's cache, drafts ``k`` tokens greedily, and the full model verifies them in one step.

The draft runs only its layers and writes only their cache slots; verification runs every layer over
the last committed token and the k drafts, overwriting those slots, so the cache after a round holds the
full model's keys and values for every committed token. Tokens are kept up to the first disagreement,
then the full model's own token: the output is greedy decoding with the full model, token for token
(up to float rounding between a 1-row and a k-row step, which the tests check on the real model).

``influence`` ranks layers for skipping by how much each changes the residual stream on a prompt
(1 - cosine(block input, block output), as ShortGPT's block influence).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import NnforgeError
from ..ir import interpret
from .compiled import CompiledLM, prefill_batches
from .generate import prefill


def influence(lm: CompiledLM, ids: Sequence[int]) -> dict[int, float]:
    """Per layer, 1 - mean cosine similarity of its residual input and output over the prompt's tokens."""
    graph, blocks = lm.graph, lm.graph.meta["decoder"]["blocks"]
    _, values = interpret(graph, prefill_batches([ids], graph)[0], keep_all=True)
    by_name = {v.name: a for v, a in values.items()}
    out = {}
    for layer, (src, dst) in blocks.items():
        a, b = by_name[src].reshape(-1, by_name[src].shape[-1]), by_name[dst].reshape(-1, by_name[dst].shape[-1])
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
        out[int(layer)] = float(1.0 - cos.mean())
    return out


def least_influential(lm: CompiledLM, ids: Sequence[int], n: int) -> list[int]:
    """The ``n`` layers to skip in a draft (never the first or the last)."""
    ranks = influence(lm, ids)
    inner = [i for i in sorted(ranks, key=ranks.get) if i not in (0, max(ranks))]
    return sorted(inner[:n])


@dataclass
class Speculation:
    tokens: list[int]
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    seconds: float = 0.0  # prefill included
    prefill_seconds: float = 0.0
    history: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens after the first (which the prefill gives) per second after the prefill."""
        decode = self.seconds - self.prefill_seconds
        return (len(self.tokens) - 1) / decode if decode > 0 else 0.0


def speculative_generate(
    lm: CompiledLM,
    prompt: Sequence[int],
    max_new_tokens: int,
    skip: Sequence[int] = (),
    k: int = 4,
    quantize=None,
) -> Speculation:
    """Greedy decoding of one sequence with the full model, accelerated by drafts of a cheaper version of the
    same model: its layers ``skip`` left out (Draft & Verify) and/or its weights quantized (``quantize``)."""
    if k < 1:
        raise NnforgeError(f"speculative: k must be >= 1, got {k}")
    if not skip and quantize is None:
        raise NnforgeError("speculative: the draft must be cheaper: give layers to skip and/or quantize=")
    full, draft, first = lm.runner("all"), lm.runner("last", skip, quantize), lm.runner("last")
    cache, prompt = lm.new_cache(1), [int(t) for t in prompt]
    if len(prompt) + max_new_tokens + k > cache.capacity:
        raise NnforgeError(
            f"speculative: {len(prompt)} + {max_new_tokens} + {k} tokens exceed max_length={cache.capacity}"
        )
    t0 = time.perf_counter()
    out = Speculation([int(prefill(first, cache, [prompt]).argmax(-1)[0])])
    out.prefill_seconds = time.perf_counter() - t0
    while len(out.tokens) < max_new_tokens:
        base = int(cache.lengths[0])  # slots filled with committed tokens (all but the newest)
        proposal, token = [], out.tokens[-1]
        for _ in range(min(k, max_new_tokens - len(out.tokens) - 1)):  # verification adds one of its own
            logits = draft.run(cache, cache.step_inputs(np.array([[token]])))
            cache.lengths += 1
            token = int(logits[0, -1].argmax())
            proposal.append(token)
        cache.lengths[:] = base
        chunk = np.array([[out.tokens[-1]] + proposal])
        choice = full.run(cache, cache.step_inputs(chunk))[0].argmax(-1)
        n = 0
        while n < len(proposal) and proposal[n] == int(choice[n]):
            n += 1
        out.tokens += proposal[:n] + [int(choice[n])]
        cache.lengths[:] = base + 1 + n  # the last committed token and the accepted drafts
        out.drafted += len(proposal)
        out.accepted += n
        out.rounds += 1
        out.history.append(n)
    out.tokens = out.tokens[:max_new_tokens]
    out.seconds = time.perf_counter() - t0
    return out
