"""The ViT trained on scikit-learn's digits (``nnforge.models.digits``), shared by the token/layer/budget/quantize/sparsity tests.

Trained once per test session (about 18 s on one thread) with fixed seeds: tests take the session fixture
``digits_vit`` (tests/conftest.py), which calls ``trained_once`` with a directory that all pytest-xdist workers
of the session share. Under a file lock, the first worker to need the model trains it and saves its weights
there (safetensors); another worker waits for them and loads them instead of training again. Both go through
``nnforge.models.digits.digits_vit`` (data, split, import), only its training step is replaced.
``ViT(img=16, patch=2, dim=64, depth=6, heads=4)`` on the digits upsampled to 16x16: 65 tokens x 64 features.

Its layers are large enough that numpy's OpenBLAS multi-threads the interpreter's matmuls; on a 2-core
machine busy with other work (another test worker, a compile) those threads wait for each other: one
100-image batch took 5-24 s instead of 0.2 s. So importing this module limits BLAS to one thread.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from unittest import mock

from filelock import FileLock  # a torch dependency
from safetensors.torch import load_file, save_file

from nnforge.models import digits as _digits
from nnforge.models.digits import DigitsViT, accuracy

__all__ = ["DigitsViT", "accuracy", "trained_once"]

try:  # comes with scikit-learn, which the digits need anyway
    from threadpoolctl import threadpool_limits
except ImportError:
    pass
else:
    threadpool_limits(limits=1, user_api="blas")


def trained_once(cache_dir: Path, **train_options) -> DigitsViT:
    """``nnforge.models.digits.digits_vit(**train_options)``, its weights trained at most once per ``cache_dir``."""
    train = _digits.train_digits_vit
    key = hashlib.sha256(repr(sorted(train_options.items())).encode()).hexdigest()[:12]
    weights = Path(cache_dir) / f"digits-vit-{key}.safetensors"

    def train_or_load(x_train, y_train, **options):
        weights.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{weights}.lock"):
            if weights.is_file():
                model = train(x_train, y_train, **{**options, "steps": 0})  # the same ViT, not trained
                model.load_state_dict(load_file(weights))  # strict: every tensor, same names and shapes
                return model
            model = train(x_train, y_train, **options)
            tmp = weights.with_name(f"{weights.name}.{os.getpid()}.tmp")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
            os.replace(tmp, weights)
            return model

    with mock.patch.object(_digits, "train_digits_vit", train_or_load):
        return _digits.digits_vit(**train_options)
