"""KV-cache compression: a cache of ``budget`` slots that a policy keeps full of the slots that matter.

    lm = nnforge.compile_lm(model, max_length=2048, kv=nnforge.KVCompress("h2o", budget=256))

The cache buffers hold ``budget`` slots (the memory saved is real); when a step would overflow them, the
policy evicts the lowest-scored slots of each layer and kv head (a chunk at a time, so eviction is rare)
and compacts the rest in place, RoPE keys rotated to their new slots: the model sees positions within
the cache, as StreamingLLM does, and generation may run past the budget.

Policies (scores per layer, kv head and slot; higher is kept):

    streaming   StreamingLLM: the first ``sinks`` slots (attention sinks) and the most recent ones
    h2o         H2O: heavy hitters, the slots with the most attention accumulated over every step so far
                (the step graph gains attention_mass outputs), plus the ``recent`` newest slots
    snapkv      SnapKV: after the prefill, the prompt slots the last ``window`` prompt tokens attend to most
                (max-pooled over ``pool`` neighbours), plus the window; generated slots are evicted oldest
                first once the prompt's are spent

The scored variants are graph rewrites (``surgery.with_attention_mass``): the attention mass is computed
by the compiled step itself, not by Python per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NnforgeError
from .generate import decode_step, prefill
from .runtime import KVCache, StepRunner

POLICIES = ("streaming", "h2o", "snapkv")
GENERATED = 1e9  # SnapKV: generated slots rank above every prompt slot


@dataclass(frozen=True)
class KVCompress:
    """A KV-cache policy and its budget (slots kept per sequence)."""

    policy: str = "streaming"
    budget: int = 256
    sinks: int = 4  # streaming: kept first slots
    recent: int = 16  # always kept newest slots (h2o, snapkv, streaming's window is the rest)
    window: int = 16  # snapkv: observation window at the end of the prompt
    pool: int = 7  # snapkv: max-pool width over slot scores
    chunk: float = 0.125  # fraction of the budget evicted at once

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise NnforgeError(f"KVCompress.policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if self.budget < self.sinks + self.recent + 2:
            raise NnforgeError(f"KVCompress.budget={self.budget} is below sinks + recent + 2")
        if not 0 < self.chunk < 1:
            raise NnforgeError(f"KVCompress.chunk must lie in (0, 1), got {self.chunk}")

    @property
    def mass_window(self) -> int | None:
        """Which attention-mass outputs the step needs: None (none), 0 (every row, h2o), W (snapkv's window)."""
        return {"streaming": None, "h2o": 0, "snapkv": self.window}[self.policy]

    def state(self, cache: KVCache, layers) -> "KVState":
        return KVState(self, cache, list(layers))


class KVState:
    """The running scores of one generation's cache."""

    def __init__(self, cfg: KVCompress, cache: KVCache, layers: list[int]):
        self.cfg, self.cache, self.layers = cfg, cache, layers
        shape = (cache.batch, cache.buffers[f"past_k_{layers[0]}"].shape[1], cache.capacity)
        self.scores = {layer: np.zeros(shape) for layer in layers}
        self.evictions = 0

    def rebind(self, cache: KVCache) -> None:
        """Continue on ``cache`` (the filled slots of the old one moved there); scores keep their slots."""
        old, self.cache = self.cache, cache
        self.scores = {layer: sc[:, :, : cache.capacity].copy() for layer, sc in self.scores.items()}
        del old

    def observe(self, masses: dict[int, np.ndarray], prefill: bool) -> None:
        """Fold a step's attention mass into the scores (h2o: every step; snapkv: the prefill's window)."""
        cfg = self.cfg
        if cfg.policy == "h2o":
            for layer, m in masses.items():
                self.scores[layer][:, :, : m.shape[-1]] += m
        elif cfg.policy == "snapkv" and prefill:
            for layer, m in masses.items():
                pad = cfg.pool // 2
                padded = np.pad(m, ((0, 0), (0, 0), (pad, pad)), constant_values=-np.inf)
                pooled = np.max(np.lib.stride_tricks.sliding_window_view(padded, cfg.pool, axis=-1), axis=-1)
                self.scores[layer][:, :, : m.shape[-1]] = pooled

    def make_room(self, n_new: int) -> None:
        """Evict before a step of ``n_new`` tokens that would not fit."""
        cache, cfg = self.cache, self.cfg
        length = int(cache.lengths.max())
        if length + n_new <= cache.capacity:
            return
        if (cache.lengths != length).any():
            raise NnforgeError("KV compression runs sequences of equal length (batch of one, or equal prompts)")
        keep_n = cache.capacity - n_new - int(cfg.chunk * cache.capacity)
        if keep_n < cfg.sinks + cfg.recent:
            raise NnforgeError(f"KV compression: a {n_new}-token step does not fit a {cache.capacity}-slot budget")
        self.evict_to(keep_n)

    def evict_to(self, keep_n: int) -> None:
        """Keep the ``keep_n`` best slots of every layer and kv head."""
        cache, length = self.cache, int(self.cache.lengths.max())
        if length <= keep_n:
            return
        keep = {layer: self._keep(layer, length, keep_n) for layer in self.layers}
        cache.compact(keep)
        for layer, idx in keep.items():
            kept = np.take_along_axis(self.scores[layer][:, :, :length], idx, axis=-1)
            self.scores[layer][:] = 0
            self.scores[layer][:, :, :keep_n] = kept
        self.evictions += 1

    def _keep(self, layer: int, length: int, keep_n: int) -> np.ndarray:
        """[B, kv_heads, keep_n] slots to keep, ascending."""
        cfg = self.cfg
        slot = np.arange(length, dtype=np.float64)
        if cfg.policy == "streaming":
            rank = np.broadcast_to(slot, self.scores[layer][:, :, :length].shape).copy()
        else:
            rank = self.scores[layer][:, :, :length].copy()
            if (
                cfg.policy == "snapkv"
            ):  # generated slots (scored 0 by the prefill) outrank the prompt's, oldest out first
                generated = rank == 0
                rank = np.where(generated, GENERATED + slot, rank)
        rank[..., : cfg.sinks] = np.inf
        rank[..., max(length - cfg.recent, 0) :] = np.inf
        top = np.argpartition(-rank, keep_n - 1, axis=-1)[..., :keep_n]
        return np.sort(top, axis=-1)


class CompressedDecoder:
    """Prefill and decode under a KVCompress policy. ``runner(mass_window)`` gives the step runner with that
    many attention-mass rows as outputs (None: none); ``make_cache(batch, capacity)`` a cache."""

    def __init__(self, cfg: KVCompress, runner, make_cache, pad_id: int = 0):
        self.cfg, self.runner, self.make_cache, self.pad_id = cfg, runner, make_cache, pad_id

    def start(self, batch: list[list[int]], max_new_tokens: int) -> np.ndarray:
        lengths = {len(s) for s in batch}
        if len(lengths) != 1:
            raise NnforgeError("KV compression: prompts of a batch must have equal lengths")
        n, cfg = lengths.pop(), self.cfg
        if cfg.policy == "snapkv":  # the whole prompt first, then its observation window picks what stays
            runner = self.runner(cfg.window)
            big = self.make_cache(len(batch), max(n, cfg.budget))
            logits = prefill(runner, big, batch, self.pad_id)
            self.state = cfg.state(big, runner.layers)
            self.state.observe(runner.masses, prefill=True)
            self.state.evict_to(cfg.budget - max(int(cfg.chunk * cfg.budget), 1))
            self.cache = self.make_cache(len(batch), cfg.budget)
            self.cache.take(big)
            self.state.rebind(self.cache)
            self.decode_runner = self.runner(None)
            return logits
        runner = self.runner(cfg.mass_window)
        self.cache = self.make_cache(len(batch), cfg.budget)
        self.state, self.decode_runner = cfg.state(self.cache, runner.layers), runner
        step = max(cfg.budget // 2, 1)  # a prompt longer than the budget is prefilled in chunks
        for start in range(0, n, step):
            chunk = [s[start : start + step] for s in batch]
            self.state.make_room(len(chunk[0]))
            logits = prefill(runner, self.cache, chunk, self.pad_id) if start == 0 else self._append(runner, chunk)
            self.state.observe(runner.masses, prefill=True)
        return logits

    def _append(self, runner: StepRunner, chunk) -> np.ndarray:
        ids = np.asarray(chunk, np.int64)
        logits = runner.run(self.cache, self.cache.step_inputs(ids))
        self.cache.lengths += ids.shape[1]
        return logits[:, -1]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.state.make_room(1)
        logits = decode_step(self.decode_runner, self.cache, tokens)
        self.state.observe(self.decode_runner.masses, prefill=False)
        return logits


@dataclass(frozen=True)
class PromptPrune:
    """Prefill token pruning: the first ``layer`` layers read the whole prompt, and the attention its last
    ``window`` tokens pay in layer ``layer - 1`` picks the ``keep`` fraction of prompt tokens (the window
    always kept) that the whole model then prefills, at positions renumbered within the cache. This is the
    GemFilter form of LazyLLM / PyramidDrop's idea (a cache of one length for all layers, as
    GroupQueryAttention keeps it): time to first token falls to about layer/num_layers + keep of a full
    prefill."""

    keep: float = 0.5
    layer: int = 6
    window: int = 8
    min_tokens: int = 64  # shorter prompts are not pruned

    def __post_init__(self):
        if not 0 < self.keep <= 1:
            raise NnforgeError(f"PromptPrune.keep must lie in (0, 1], got {self.keep}")
        if self.layer < 1 or self.window < 1:
            raise NnforgeError("PromptPrune.layer and window must be >= 1")


class PrunedDecoder:
    """A decoder whose prefill first prunes long prompts (PromptPrune); ``scout`` is the step runner of the
    first layers with attention-mass outputs."""

    def __init__(self, cfg: PromptPrune, inner, scout: StepRunner, make_cache):
        self.cfg, self.inner, self.scout, self.make_cache = cfg, inner, scout, make_cache
        self.kept: list[list[int]] = []

    def start(self, batch: list[list[int]], max_new_tokens: int) -> np.ndarray:
        self.kept = [self.select(seq) for seq in batch]
        return self.inner.start([[seq[i] for i in keep] for seq, keep in zip(batch, self.kept)], max_new_tokens)

    def select(self, seq: list[int]) -> list[int]:
        """Indices of the prompt tokens kept (ascending)."""
        cfg, n = self.cfg, len(seq)
        k = max(int(round(cfg.keep * n)), cfg.window)
        if n < cfg.min_tokens or k >= n:
            return list(range(n))
        cache = self.make_cache(1, n)
        prefill(self.scout, cache, [seq])
        mass = self.scout.masses[max(self.scout.layers)][0].sum(0)[:n]  # [n]: attention the window paid
        mass[n - cfg.window :] = np.inf
        return sorted(np.argpartition(-mass, k - 1)[:k].tolist())

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self.inner.step(tokens)
