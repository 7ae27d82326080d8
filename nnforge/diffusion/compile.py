"""``compile_denoiser``: a diffusion denoiser -> a StepCachedDenoiser, its graphs cut by a step-cache method.

The denoiser (diffusers ``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``, or any module
called as ``model(sample, timestep=t, **conditioning)``) is imported once per input shape, the method picks
the features to reuse on the imported IR, ``stepcache.split`` cuts it, and both graphs go through the normal
``nnforge.compile`` path (lossless pipeline, backend build).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import NnforgeError
from .sample import noise_prediction
from .stepcache import StepCachedDenoiser, split


def denoiser_step(model, conditioning: list[str]):
    """One denoising step as a plain tensor function: positional (sample, timestep, *conditioning) -> noise."""
    import torch

    class DenoiserStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, sample, timestep, *values):
            return noise_prediction(self.model(sample, timestep=timestep, **dict(zip(conditioning, values))))

    return DenoiserStep()


@dataclass(frozen=True)
class Combined:
    """Several settings at once: graph rewrites (``DiffusionToMe``), applied in order, and at most one step cache
    (``DeepCache``, ``BlockCache``, ``TGate``), which cuts the rewritten graph. ``compile_denoiser(cache=[...])``
    makes one from a list."""

    settings: tuple

    def __post_init__(self):
        caches = [s for s in self.settings if reuses(s)]
        if len(caches) > 1:
            raise NnforgeError(f"compile_denoiser: at most one step cache at a time, got {[s.name for s in caches]}")

    @property
    def name(self) -> str:
        return " + ".join(s.name for s in self.settings)

    @property
    def step_cache(self):
        return next((s for s in self.settings if reuses(s)), None)

    @property
    def reuses(self) -> bool:
        return self.step_cache is not None

    def rewrite(self, graph):
        for s in self.settings:
            if hasattr(s, "rewrite"):
                graph = s.rewrite(graph)
        return graph

    def features(self, graph):
        return self.step_cache.features(graph)

    def full_steps(self, steps):
        return self.step_cache.full_steps(steps)


def as_setting(cache: Any):
    """None, one setting, or a list / tuple of them (a ``Combined``)."""
    if isinstance(cache, (list, tuple)):
        return Combined(tuple(cache)) if len(cache) != 1 else cache[0]
    return cache


def reuses(setting) -> bool:
    """Whether a setting reuses work across steps (a step cache) rather than only rewriting the graph."""
    return setting is not None and getattr(setting, "reuses", hasattr(setting, "features"))


def _example(shape: tuple, dtype, like=None, seed: int = 0):
    import torch

    if like is not None and tuple(like.shape) == shape:
        return like
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=dtype)
    return torch.randint(0, 10, shape, generator=g, dtype=dtype)


def compile_denoiser(
    model,
    sample,
    timestep,
    *,
    cache: Any = None,
    target: str = "cpu",
    backend: str | None = None,
    pipeline: str = "O2",
    check: bool = False,
    options: dict | None = None,
    progress: bool | None = None,
    **conditioning,
) -> StepCachedDenoiser:
    """Compile ``model`` for denoising: ``cache`` a step-cache method (``DeepCache``, ``BlockCache``, ``TGate``),
    a graph rewrite (``DiffusionToMe``), a list of them (rewrites first, at most one step cache) or None (every
    step runs the whole graph). ``sample``, ``timestep`` and ``conditioning`` (``class_labels=``,
    ``encoder_hidden_states=``) are example inputs; other batch sizes compile on first use. ``options``: the
    backend's build options (e.g. ``{"threads": 1}`` for ONNX Runtime); ``progress``: a status line while
    each graph builds (default: when stderr is a terminal)."""
    import torch

    if not isinstance(sample, torch.Tensor) or sample.dim() < 1:
        raise NnforgeError("compile_denoiser: sample must be a torch tensor with a batch dimension")

    from ..api import compile as nnforge_compile
    from ..api import import_model

    model = model.eval()
    cache = as_setting(cache)
    names = [k for k, v in conditioning.items() if v is not None]
    examples = [sample, torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0]).contiguous()]
    examples += [torch.as_tensor(conditioning[k]) for k in names]
    if examples[1].dtype == torch.float64:
        examples[1] = examples[1].float()
    step = denoiser_step(model, names)
    dtypes = [e.dtype for e in examples]

    def build(shapes: tuple):
        inputs = tuple(_example(tuple(s), d, e) for s, d, e in zip(shapes, dtypes, examples))
        with torch.no_grad():
            graph = import_model(step, inputs)
        if hasattr(cache, "rewrite"):
            graph = cache.rewrite(graph)
        arrays = [x.numpy() for x in inputs]

        def build_one(g, extra=()):
            return nnforge_compile(
                g,
                arrays + list(extra),
                target,
                backend=backend,
                pipeline=pipeline,
                check=check,
                options=options,
                cache=False,
                progress=progress,
            )

        if not reuses(cache):
            return build_one(graph), None
        cut = split(graph, cache.features(graph))
        full = build_one(cut.full)
        features = full.run(arrays)[cut.outputs :]
        return full, build_one(cut.cached, features)

    return StepCachedDenoiser(
        build,
        ["sample", "timestep", *names],
        cache.full_steps if reuses(cache) else None,
        config=getattr(model, "config", None),
        method=getattr(cache, "name", "uncached"),
        example_shapes=tuple(tuple(e.shape) for e in examples),
    )
