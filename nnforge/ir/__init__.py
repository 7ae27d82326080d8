"""nnforge's intermediate representation."""

from .graph import Graph, Node, TensorType, Value, dtype_name
from .interpret import bind_symbols, interpret
from .printer import format_graph, summary
from .registry import REGISTRY, OpDef, OpError, defop, get_op, implement, load_ops
from .serialize import load_graph, save_graph
from .verify import verify

__all__ = [
    "Graph",
    "Node",
    "TensorType",
    "Value",
    "dtype_name",
    "interpret",
    "bind_symbols",
    "REGISTRY",
    "OpDef",
    "OpError",
    "defop",
    "get_op",
    "implement",
    "load_ops",
    "format_graph",
    "summary",
    "load_graph",
    "save_graph",
    "verify",
]
