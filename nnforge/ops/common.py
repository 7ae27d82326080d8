"""What the op families share: lazily imported backend modules, and the IR's shape helpers for shape rules."""

from __future__ import annotations

import importlib

from ..ir.graph import DTYPES, TensorType
from ..ir.registry import OpError
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


def declared_out_types(raw, op: str) -> list[TensorType]:
    """An opaque op's ``out_types`` attribute (the types its source framework computed at import), checked."""
    if not isinstance(raw, list) or not raw:
        raise OpError(f"{op}: out_types must be a non-empty list of {{shape, dtype}}")
    out = []
    for t in raw:
        if not isinstance(t, dict) or not isinstance(t.get("shape"), list) or t.get("dtype") not in DTYPES:
            raise OpError(f"{op}: bad out_types entry {str(t)[:80]}")
        try:
            out.append(TensorType(tuple(t["shape"]), t["dtype"]))
        except (ValueError, TypeError) as e:
            raise OpError(f"{op}: bad out_types entry {str(t)[:80]}: {e}") from None
    return out
