"""What the op families share: lazily imported backend modules, and the IR's shape helpers for shape rules."""

from __future__ import annotations

import importlib

from ..ir.shapes import BIG, broadcast_shapes, conv_out, float_only, norm_axis, pair, same_dtype  # noqa: F401


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
F = LazyModule("torch.nn.functional")
R = LazyModule("tvm.relax.op")  # Relax operators, for TVM lowerings
