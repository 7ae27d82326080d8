"""Running a compiled decoder step with its KV cache: one backend call per step, no per-layer Python.

``KVCache`` owns the cache buffers of a batch ([batch, kv_heads, capacity, head_dim] per layer and
k/v) and the length of each sequence. ``StepRunner`` runs one compiled step graph against it:

- ONNX Runtime: the buffers are OrtValues over numpy memory bound with IOBinding as both the past input
  and the present output of GroupQueryAttention, which then writes the new slots in place: no copy of
  the cache per token.
- TVM: the step writes the new slots into the cache in place too (``backends/tvm_cache.py``): the buffers
  are 64-byte aligned, so TVM takes the numpy memory without a copy, and its cache outputs are the same
  memory. A second build of the step for one token per sequence runs the decode steps (``CompiledLM._build``).
- other backends (the torch executor, the interpreter): the step returns new cache tensors, which become
  the cache.

A layer-skipped draft's step graph has cache inputs only for its layers; it binds to the same buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NnforgeError
from .build import cache_names


@dataclass
class StepInputs:
    ids: np.ndarray  # int64 [B, S]
    seqlens_k: np.ndarray  # int32 [B]
    total_len: int
    positions: np.ndarray  # int64 [B, S]
    last_index: np.ndarray  # int64 [B]


CODES = {"int8": np.int8}  # the element type of an int8 cache's k/v buffers (their scales are float32)


def aligned_zeros(shape, dtype=np.float32, alignment: int = 64) -> np.ndarray:
    """Zeros whose data starts on an ``alignment``-byte boundary: TVM takes such numpy memory without a copy
    (its kernels assume 64-byte alignment), so its in-place cache writes land in these buffers."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(size + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + size].view(dtype).reshape(shape)


class KVCache:
    """The cache buffers of one batch and each sequence's length (filled slots)."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        rope_theta: float | None = None,
        cache: str = "float",
    ):
        shape = (batch, kv_heads, capacity, head_dim)
        self.capacity, self.cache = capacity, cache
        self.rope_theta, self.head_dim = rope_theta, head_dim
        self.buffers = {
            name: aligned_zeros((*shape[:3], 1))
            if "scale" in name
            else aligned_zeros(shape, CODES.get(cache, np.float32))
            for name in cache_names(range(num_layers), cache)
        }
        self.lengths = np.zeros(batch, np.int64)
        self._ort: dict | None = None

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def ort_values(self) -> dict:
        """OrtValues over the buffers (made once, so ONNX Runtime keeps writing into the same memory)."""
        if self._ort is None:
            import onnxruntime as ort

            self._ort = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.buffers.items()}
        return self._ort

    def replace(self, name: str, value: np.ndarray) -> None:
        self.buffers[name] = value
        self._ort = None

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def take(self, other: "KVCache") -> None:
        """Copy the filled slots of a larger cache into this one."""
        n = int(other.lengths.max())
        if n > self.capacity:
            raise NnforgeError(f"KVCache.take: {n} filled slots do not fit {self.capacity}")
        for name, buf in self.buffers.items():
            buf[:, :, :n] = other.buffers[name][:, :, :n]
        self.lengths[:] = other.lengths

    def compact(self, keep: dict[int, np.ndarray]) -> None:
        """Keep, per layer, the slots ``keep[layer]`` ([B, kv_heads, n], ascending) at slots 0..n-1 of the same
        buffers (in place: ONNX Runtime keeps its bindings). RoPE keys are rotated by their move, so each
        key is as if computed at its new slot: positions become positions within the cache (StreamingLLM)."""
        if self.cache != "float":
            raise NnforgeError("compact: KV-cache compression keeps a float cache (not an int8 one)")
        n = {idx.shape[-1] for idx in keep.values()}
        if len(n) != 1:
            raise NnforgeError("compact: every layer must keep the same number of slots")
        n = n.pop()
        for layer, idx in keep.items():
            for kv in ("k", "v"):
                buf = self.buffers[f"past_{kv}_{layer}"]
                kept = np.take_along_axis(buf, idx[..., None].astype(np.int64), axis=2)
                if kv == "k" and self.rope_theta is not None:
                    kept = self._rotate(kept, np.arange(n)[None, None, :] - idx)
                buf[:, :, :n] = kept
                buf[:, :, n:] = 0
        self.lengths[:] = n

    def _rotate(self, keys: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Rotate-half RoPE by ``delta`` positions per key ([B, H, n] of [B, H, n, D])."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        angles = delta[..., None].astype(np.float64) * inv
        cos, sin = np.cos(angles), np.sin(angles)
        a, b = keys[..., : d // 2].astype(np.float64), keys[..., d // 2 :].astype(np.float64)
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1).astype(keys.dtype)

    def step_inputs(self, ids: np.ndarray, new_lengths: np.ndarray | None = None) -> StepInputs:
        """Inputs of a step that appends ``ids`` [B, S] after each sequence's filled slots. ``new_lengths``: the
        real number of new tokens per sequence (a right-padded first prompt), default S for all."""
        b, s = ids.shape
        n = np.full(b, s, np.int64) if new_lengths is None else np.asarray(new_lengths, np.int64)
        first = not self.lengths.any()
        if not first and (n != s).any():
            raise NnforgeError("decoder: only the first prompt of a batch may be padded")
        end = self.lengths + n  # filled slots after the step
        if end.max() > self.capacity:
            raise NnforgeError(f"decoder: {int(end.max())} tokens do not fit the cache capacity {self.capacity}")
        positions = self.lengths[:, None] + np.arange(s)[None, :]
        total = s if first else int(end.max())
        return StepInputs(
            ids.astype(np.int64),
            (end - 1).astype(np.int32),
            total,
            positions.astype(np.int64),
            (n - 1).astype(np.int64),
        )


def _same_memory(a, b: np.ndarray) -> bool:
    """Whether a step's cache output is the cache buffer itself (written in place)."""
    a = np.asarray(a)
    return a.shape == b.shape and a.ctypes.data == b.ctypes.data


class StepRunner:
    """One compiled step graph (an Artifact) bound to a KVCache. ``decode``: the same graph built for one sequence
    of one token (TVM: static one-row kernels such as the GEMVs), run for the steps it fits."""

    def __init__(self, artifact, graph, decode=None):
        self.artifact, self.graph, self.decode = artifact, graph, decode
        meta = graph.meta["decoder"]
        self.layers, self.logits_mode = meta["layers"], meta["logits"]
        self.input_names = [v.name for v in graph.inputs]
        self.cache_outputs = cache_names(self.layers, meta.get("cache", "float"))  # outputs after the logits
        self.mass_window = meta.get("mass_window")  # None: no attention-mass outputs (after the caches)
        self.masses: dict[int, np.ndarray] = {}  # layer -> [B, kv_heads, cache_len] of the last run
        self.session = getattr(artifact, "session", None) if artifact.backend == "onnxrt" else None
        self._bound = None  # (cache OrtValues, IOBinding) of the last run
        if self.session is not None:
            self.ort_inputs = [i.name for i in self.session.get_inputs()]
            self.ort_outputs = [o.name for o in self.session.get_outputs()]

    def _feed(self, x: StepInputs) -> dict:
        return {
            "input_ids": x.ids,
            "seqlens_k": x.seqlens_k,
            "total_len": np.asarray(x.total_len, np.int32),
            "position_ids": x.positions,
            "last_index": x.last_index,
        }

    def run(self, cache: KVCache, x: StepInputs) -> np.ndarray:
        """Logits of the step; the cache is updated (its lengths by the caller)."""
        feed = self._feed(x)
        if self.session is not None:
            return self._run_ort(cache, feed)
        inputs = [feed[n] if n in feed else cache.buffers[n] for n in self.input_names]
        artifact = self.decode if self.decode is not None and self._decode_fits(x.ids.shape) else self.artifact
        if artifact.backend != "tvm":
            outs = artifact.run(inputs)
        else:  # TVM writes the cache in place: convert only what is new, e.g. the logits
            outs = [np.from_dlpack(o) for o in artifact.run(inputs, raw=True)]
        n = len(self.cache_outputs)
        for name, value in zip(self.cache_outputs, outs[1 : 1 + n]):
            if not _same_memory(value, cache.buffers[name]):  # a new tensor: into the (aligned) buffer
                np.copyto(cache.buffers[name], value)
        self.masses = dict(zip(self.layers, (np.array(m) for m in outs[1 + n :])))
        return np.array(outs[0])

    def _decode_fits(self, ids_shape) -> bool:
        """Whether the one-token build takes these ids (its batch may be fixed too)."""
        want = self.decode.graph.inputs[0].shape
        return all(not isinstance(w, int) or w == n for w, n in zip(want, ids_shape))

    def _binding(self, cache: KVCache):
        """An IOBinding with the cache bound (kept while the cache's OrtValues are the same: per step only the
        small inputs are bound again)."""
        values = cache.ort_values()
        if self._bound is not None and self._bound[0] is values:
            return self._bound[1]
        io = self.session.io_binding()
        for name in self.ort_inputs:
            if name in values:
                io.bind_ortvalue_input(name, values[name])
        n = len(self.cache_outputs)
        io.bind_output(self.ort_outputs[0], "cpu")  # logits: allocated by ORT at each run
        for out_name, cache_name in zip(self.ort_outputs[1 : 1 + n], self.cache_outputs):
            io.bind_ortvalue_output(out_name, values[cache_name])  # same buffer as the past input: in place
        for out_name in self.ort_outputs[1 + n :]:  # attention mass
            io.bind_output(out_name, "cpu")
        self._bound = (values, io)
        return io

    def _run_ort(self, cache: KVCache, feed: dict) -> np.ndarray:
        io = self._binding(cache)
        for name in self.ort_inputs:
            if name in feed:
                io.bind_cpu_input(name, np.ascontiguousarray(feed[name]))
        n = len(self.cache_outputs)
        for out_name in [self.ort_outputs[0]] + self.ort_outputs[1 + n :]:  # shapes change with S: a fresh
            io.bind_output(out_name, "cpu")  # output each run (rebinding a name keeps its place in the outputs)
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        self.masses = dict(zip(self.layers, (v.numpy() for v in outs[1 + n :])))
        return outs[0].numpy()
