"""Ops created by the token and layer passes; registered into nnforge.ir.ops.REGISTRY on import."""
from __future__ import annotations

from .ops import REQUIRED, OpError, register  # noqa: F401
