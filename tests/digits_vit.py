"""The ViT trained on scikit-learn's digits (``nnforge.models.digits``), shared by the token/layer/budget/quantize tests.

Trained once per test process (about 18 s on one thread) with fixed seeds; ``digits_vit()`` caches it.
``ViT(img=16, patch=2, dim=64, depth=6, heads=4)`` on the digits upsampled to 16x16: 65 tokens x 64 features.

Its layers are large enough that numpy's OpenBLAS multi-threads the interpreter's matmuls; on a 2-core
machine busy with other work (another test worker, a compile) those threads wait for each other: one
100-image batch took 5-24 s instead of 0.2 s. So importing this module limits BLAS to one thread.
"""
from __future__ import annotations

import functools

from nnforge.models.digits import DigitsViT, accuracy
from nnforge.models.digits import digits_vit as _build

__all__ = ["DigitsViT", "accuracy", "digits_vit"]

try:  # comes with scikit-learn, which the digits need anyway
    from threadpoolctl import threadpool_limits
except ImportError:
    pass
else:
    threadpool_limits(limits=1, user_api="blas")


@functools.lru_cache(maxsize=1)
def digits_vit() -> DigitsViT:
    return _build()
