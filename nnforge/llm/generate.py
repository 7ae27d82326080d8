"""The generate loop: prefill, then one backend call per new token, sampling in numpy.

``Sampling`` says how a token is picked from the logits (greedy, or temperature / top-k / top-p with a
seed); ``generate`` runs a batch of prompts (right-padded in the first step; each sequence then grows
at its own length in the cache) until ``max_new_tokens``, or until every sequence has produced an EOS
or stop token. ``on_token`` streams: it is called after each step with the new token of every
sequence still running.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import NnforgeError
from .runtime import KVCache, StepRunner


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 (the default) is greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise NnforgeError(f"Sampling.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise NnforgeError(f"Sampling.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise NnforgeError(f"Sampling.top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def pick(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Token ids [B] from logits [B, V]."""
        if self.greedy:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / self.temperature
        if self.top_k and self.top_k < z.shape[-1]:
            kth = np.partition(z, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if self.top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, -1)
            keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < self.top_p
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            p = np.where(keep, p, 0.0)
            p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(len(row), p=row) for row in p])


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per sequence (prompt excluded; up to and including a stop token)
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0  # decode steps after the prefill
    stopped: list[bool] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.steps / self.decode_seconds if self.decode_seconds else 0.0


def as_batch(prompts) -> list[list[int]]:
    """Token ids as a list of sequences (one sequence, a list of them, or a 2-D array)."""
    arr = prompts
    if hasattr(arr, "detach"):
        arr = arr.detach().cpu().numpy()
    if isinstance(arr, np.ndarray):
        arr = arr.tolist() if arr.ndim == 2 else [arr.tolist()]
    elif arr and isinstance(arr[0], (int, np.integer)):
        arr = [list(arr)]
    batch = [[int(t) for t in seq] for seq in arr]
    if not batch or any(not seq for seq in batch):
        raise NnforgeError("generate: every prompt needs at least one token")
    return batch


def prefill(runner: StepRunner, cache: KVCache, batch: Sequence[Sequence[int]], pad_id: int = 0) -> np.ndarray:
    """Fill an empty cache with right-padded prompts; the logits after each prompt's last token [B, V]."""
    lengths = np.array([len(s) for s in batch])
    ids = np.full((len(batch), lengths.max()), pad_id, np.int64)
    for b, seq in enumerate(batch):
        ids[b, : len(seq)] = seq
    logits = runner.run(cache, cache.step_inputs(ids, lengths))
    cache.lengths += lengths
    return logits[:, -1]


def decode_step(runner: StepRunner, cache: KVCache, tokens: np.ndarray) -> np.ndarray:
    """Append one token per sequence; the next logits [B, V]."""
    logits = runner.run(cache, cache.step_inputs(np.asarray(tokens, np.int64)[:, None]))
    cache.lengths += 1
    return logits[:, -1]


class PlainDecoder:
    """Prefill and decode steps on one cache of the model's full capacity."""

    def __init__(self, runner: StepRunner, make_cache: Callable[[int], KVCache], pad_id: int = 0):
        self.runner, self.make_cache, self.pad_id = runner, make_cache, pad_id

    def start(self, batch: list[list[int]], max_new_tokens: int) -> np.ndarray:
        self.cache = self.make_cache(len(batch))
        longest = max(len(s) for s in batch)
        if longest + max_new_tokens - 1 > self.cache.capacity:
            raise NnforgeError(
                f"generate: a {longest}-token prompt and {max_new_tokens} new tokens need "
                f"{longest + max_new_tokens - 1} cache slots; this model was compiled with "
                f"max_length={self.cache.capacity}"
            )
        return prefill(self.runner, self.cache, batch, self.pad_id)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return decode_step(self.runner, self.cache, tokens)


def generate(
    decoder,
    prompts,
    max_new_tokens: int = 32,
    sampling: Sampling = Sampling(),
    stop_tokens: Sequence[int] = (),
    on_token: Callable[[list[int]], None] | None = None,
    pad_id: int = 0,
) -> Generation:
    """Generate with ``decoder`` (``start(batch, max_new_tokens) -> logits``, ``step(tokens) -> logits``: a
    PlainDecoder, or a compressed-cache decoder of nnforge.llm.kv)."""
    batch = as_batch(prompts)
    if max_new_tokens < 1:
        raise NnforgeError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    rng = np.random.default_rng(sampling.seed)
    stops = set(int(t) for t in stop_tokens)
    out = Generation([[] for _ in batch], prompt_tokens=sum(len(s) for s in batch), stopped=[False] * len(batch))
    t0 = time.perf_counter()
    logits = decoder.start(batch, max_new_tokens)
    out.prefill_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    while True:
        picked = sampling.pick(logits, rng)
        running = [b for b in range(len(batch)) if not out.stopped[b]]
        for b in running:
            tok = int(picked[b])
            out.tokens[b].append(tok)
            out.stopped[b] = tok in stops or len(out.tokens[b]) >= max_new_tokens
        if on_token is not None:
            on_token([out.tokens[b][-1] for b in running])
        if all(out.stopped):
            break
        picked = np.where(out.stopped, pad_id, picked)  # finished sequences idle on the pad token
        logits = decoder.step(picked)
        out.steps += 1
    out.decode_seconds = time.perf_counter() - t1
    return out
