"""Reusing work across denoising steps: one graph cut, two compiled graphs, a stateful model that picks one per step.

Every step-caching method here (DeepCache, FORA block caching, T-Gate) is the same rewrite of the denoiser's IR
with a different choice of values (``features``) and a different step schedule:

- the **full** graph computes everything and also returns the features;
- the **cached** graph takes the features as extra inputs in place of computing them; dead-code elimination
  then drops everything only they needed (the deep path of a U-Net, the cached blocks, the cross-attention).

``split(graph, features)`` makes the two graphs. A method is a settings object with ``features(graph)`` (which
values to reuse, found by an analysis of the graph) and ``full_steps(steps)`` (which step indices run the full
graph). ``StepCachedDenoiser`` holds both compiled graphs and the features of the last full step, counts steps,
and is called like a diffusers denoiser: ``pipe.unet = compiled`` works.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np

from ..backends.base import run_artifact
from ..errors import NnforgeError
from ..ir import Graph, TensorType, Value
from ..passes.manager import PassContext, PassManager


@dataclass
class CacheSplit:
    full: Graph  # the denoiser's outputs, then the features
    cached: Graph  # the denoiser's inputs, then the features; the denoiser's outputs
    features: list[str]  # names of the feature values (outputs of full, inputs of cached)
    outputs: int  # how many outputs the denoiser itself has


def split(graph: Graph, features: Sequence[Value]) -> CacheSplit:
    """The full graph (also returning ``features``) and the cached graph (taking them as inputs), both cleaned up.

    Refuses a feature that is a graph input or constant, and a cut that leaves the cached graph as costly as the
    full one (nothing to save)."""
    if not features:
        raise NnforgeError("step cache: no features to reuse were chosen")
    names = [v.name for v in features]
    for v in features:
        if v.producer is None:
            raise NnforgeError(f"step cache: %{v.name} is a graph input or constant, not a computed feature")
    full = graph.copy()
    by_name = {v.name: v for v in full.all_values()}
    full.outputs = list(full.outputs) + [by_name[n] for n in names]

    cached = graph.copy()
    by_name = {v.name: v for v in cached.all_values()}
    for n in names:
        old = by_name[n]
        new = Value(cached.fresh_name(f"cached_{n}"), TensorType(old.shape, old.dtype))
        cached.inputs.append(new)
        cached.replace_all_uses(old, new)
    cleanup = PassManager(["dce"])
    full, cached = cleanup.run(full, PassContext()), cleanup.run(cached, PassContext())
    if len(cached.nodes) >= len(graph.nodes):
        raise NnforgeError(f"step cache: reusing {', '.join('%' + n for n in names)} saves no work in this graph")
    return CacheSplit(full, cached, names, len(graph.outputs))


class StepCachedDenoiser:
    """A compiled denoiser that reuses features across steps: ``denoiser(sample, timestep, **conditioning)``.

    Called as a diffusers pipeline calls its ``unet`` / ``transformer`` (``return_dict`` True: an object with
    ``.sample``); step ``k`` of a run runs the full graph when ``schedule(k)`` says so, else the cached graph
    with the features of the last full step. A run starts at ``reset(steps)`` (what ``nnforge.diffusion.sample``
    calls) or when the timestep stops decreasing (a pipeline's next call). Inputs of another shape compile the
    graphs for that shape on first use.

    ``build(shapes) -> (full, cached)``: compiled models for inputs of those shapes; ``inputs``: the denoiser's
    argument names in graph order (``sample``, ``timestep``, then conditioning such as ``class_labels``);
    ``full_steps(steps) -> schedule``: the method's step schedule, None when nothing is reused (no cached graph).
    """

    def __init__(
        self,
        build: Callable[[tuple], tuple[Any, Any]],
        inputs: Sequence[str],
        full_steps: Callable[[int | None], Callable[[int], bool]] | None,
        *,
        config=None,
        method: str = "",
        example_shapes: tuple | None = None,
    ):
        self._build = build
        self.inputs = list(inputs)
        self._full_steps = full_steps or (lambda steps: lambda step: True)
        self.reuses = full_steps is not None
        self.config = config
        self.method = method
        self.dtype = _torch().float32
        self.device = _torch().device("cpu")
        self._built: dict[tuple, tuple[Any, Any]] = {}
        self._dtypes: dict[tuple, list[np.dtype]] = {}  # per input shapes seen: the graph's input dtypes
        self._features: list[np.ndarray] | None = None
        self._features_shapes: tuple | None = None  # the input shapes they were computed for
        self._last_t: float | None = None
        self.step = 0
        self._schedule = self._full_steps(None)
        self.full_calls = self.cached_calls = 0
        if example_shapes is not None:
            self.models(example_shapes)

    def models(self, shapes: tuple) -> tuple[Any, Any]:
        """(full, cached) compiled for inputs of these shapes; cached is None when nothing is reused."""
        if shapes not in self._built:
            self._built[shapes] = self._build(shapes)
        return self._built[shapes]

    def full_steps(self, steps: int) -> list[bool]:
        """Which steps of a ``steps``-step run (started by ``reset(steps)``) run the full graph."""
        if not self.reuses:
            return [True] * steps
        schedule = self._full_steps(steps)
        return [k == 0 or bool(schedule(k)) for k in range(steps)]

    def reset(self, steps: int | None = None) -> None:
        """A new sampling run of ``steps`` steps begins (None: not known, e.g. under a pipeline)."""
        self.step = 0
        self._features = self._features_shapes = None
        self._last_t = None
        self._schedule = self._full_steps(steps)

    def __call__(self, sample, timestep, *args, return_dict: bool = True, **conditioning):
        torch = _torch()
        given = dict(zip(self.inputs[2:], args))
        given.update({k: v for k, v in conditioning.items() if v is not None})
        unknown = sorted(set(given) - set(self.inputs))
        if unknown:
            raise NnforgeError(
                f"step-cached denoiser: it was compiled with inputs {self.inputs}, got {', '.join(unknown)} too"
            )
        missing = [n for n in self.inputs[2:] if n not in given]
        if missing:
            raise NnforgeError(f"step-cached denoiser: missing input(s) {', '.join(missing)}")
        x = _numpy(sample).astype(np.float32, copy=False)
        t = np.broadcast_to(_numpy(timestep).reshape(-1), (x.shape[0],))
        t_now = float(t[0])
        if self._last_t is not None and t_now >= self._last_t:
            self.reset()  # timesteps decrease through a run: this is the next run
        self._last_t = t_now
        arrays = [x, t] + [_numpy(given[n]) for n in self.inputs[2:]]
        shapes = tuple(a.shape for a in arrays)
        full, cached = self.models(shapes)
        first = shapes not in self._dtypes  # CompiledModel.run checks names, ranks and dtypes: once per shape
        run = (lambda m, a: m.run(a)) if first else (lambda m, a: run_artifact(m.artifact, a))
        dtypes = self._dtypes.setdefault(shapes, [np.dtype(v.dtype) for v in full.graph.inputs])
        arrays = [a.astype(dtype, copy=False) for a, dtype in zip(arrays, dtypes)]
        if cached is None or self._features_shapes != shapes or self._schedule(self.step):
            outs = run(full, arrays)
            out, self._features = outs[0], outs[len(outs) - self.n_features(cached, arrays) :]
            self._features_shapes = shapes
            self.full_calls += 1
        else:
            out = run(cached, arrays + self._features)[0]
            self.cached_calls += 1
        self.step += 1
        result = torch.from_numpy(np.require(out, requirements="C"))
        return SimpleNamespace(sample=result) if return_dict else (result,)

    @staticmethod
    def n_features(cached, arrays) -> int:
        """The cached graph's inputs are the denoiser's, then the features."""
        return 0 if cached is None else len(cached.graph.inputs) - len(arrays)

    def __repr__(self) -> str:
        return f"<StepCachedDenoiser {self.method} inputs={self.inputs}>"


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _torch():
    import torch

    return torch
