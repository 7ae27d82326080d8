"""The op registry: per op, its attribute schema, shape/dtype inference and a numpy reference.

Adding an op is one ``@register`` block here plus one lowering per backend. The numpy
reference implementations are the oracle every pass and backend is checked against, so
they favour obviousness over speed.
"""
from __future__ import annotations

import importlib

from .registry import REGISTRY, REQUIRED, OpDef, OpError, defop, get_op, infer_types  # noqa: F401
from .shapes import broadcast_shapes, conv_out as _conv_out, float_only as _float_only  # noqa: F401
from .shapes import norm_axis as _norm_axis, pair as _pair, same_dtype as _same_dtype  # noqa: F401


def register(name: str, infer, attrs=None, num_inputs=(1, 1), kind="compute", doc=""):
    """(legacy form of ``registry.defop``, while ops move to nnforge/ops: a decorator that returns the reference)"""
    def deco(ref):
        defop(name, infer, attrs, num_inputs, kind, doc, ref=ref)
        return ref

    return deco


# elementwise ops and reductions live in nnforge/ops (elementwise.py, reduce.py); the ops still here use
# their softmax reference and the one activation table, reached on first use (nnforge.ops imports this module)

def _family(name: str):
    return importlib.import_module(f"nnforge.ops.{name}")


def _softmax(x, axis=-1):
    return _family("reduce").softmax_ref(x, axis)


def __getattr__(name: str):
    """``ACTIVATIONS`` (legacy name): the one activation table, in nnforge/ops/elementwise.py."""
    if name == "ACTIVATIONS":
        return _family("elementwise").ACTIVATIONS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
