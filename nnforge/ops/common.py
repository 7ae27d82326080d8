"""What the op families share: lazily imported backend modules, and shape/dtype helpers for shape rules."""
from __future__ import annotations

import importlib

from ..ir.ops import _float_only as float_only, _norm_axis as norm_axis, _same_dtype as same_dtype  # noqa: F401
from ..ir.ops import broadcast_shapes  # noqa: F401


class LazyModule:
    """A module imported on first attribute access, so declaring a TVM or torch lowering costs no import:
    ``nnforge.ir`` and the ONNX path never load TVM, and TVM paths never wait for what they do not use."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name}>"


torch = LazyModule("torch")
R = LazyModule("tvm.relax.op")  # Relax operators, for TVM lowerings
