"""Diffusion denoisers that reuse work across steps: DeepCache, FORA block caching, T-Gate, as cuts of the IR.

    denoiser = nnforge.compile_denoiser(unet, sample, t, cache=nnforge.DeepCache(interval=3), class_labels=y)
    images = nnforge.diffusion.sample(denoiser, scheduler, noise, steps=50, class_labels=y)
    pipe.unet = denoiser                      # or use it inside a diffusers pipeline

See docs/diffusion.md.
"""

from .blockcache import BlockCache, TGate, cross_attentions, residual_branches
from .budget import CacheChoice, search_cache
from .compile import Combined, compile_denoiser
from .deepcache import DeepCache, find_skips, format_skips
from .sample import sample
from .stepcache import CacheSplit, StepCachedDenoiser, split
from .tome import DiffusionToMe, merge_self_attention

__all__ = [
    "BlockCache",
    "CacheChoice",
    "CacheSplit",
    "Combined",
    "DeepCache",
    "DiffusionToMe",
    "StepCachedDenoiser",
    "TGate",
    "compile_denoiser",
    "cross_attentions",
    "find_skips",
    "format_skips",
    "merge_self_attention",
    "residual_branches",
    "sample",
    "search_cache",
    "split",
]
