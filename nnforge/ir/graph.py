"""The IR: a Graph of Nodes over Values, plus named constants.

A graph is plain data. Nodes are kept in topological order; values are referenced by
object identity and carry unique names. Constants (weights) are Values whose array lives
in ``graph.constants``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from . import symbols
from .symbols import Dim

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(symbols.simplify(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> Dim:
        return symbols.mul(*self.shape) if self.shape else 1

    def __str__(self) -> str:
        short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int64": "i64",
                 "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}[self.dtype]
        return f"{short}[{','.join(str(d) for d in self.shape)}]"

    @staticmethod
    def of(array: np.ndarray) -> "TensorType":
        return TensorType(tuple(int(d) for d in array.shape), dtype_name(array.dtype))


def dtype_name(dt) -> str:
    name = np.dtype(dt).name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name}")
    return name


class Value:
    """An SSA value: graph input, node output or constant."""

    __slots__ = ("name", "type", "producer", "__weakref__")

    def __init__(self, name: str, type: TensorType, producer: "Node | None" = None):
        self.name = name
        self.type = type
        self.producer = producer

    @property
    def shape(self):
        return self.type.shape

    @property
    def dtype(self):
        return self.type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}:{self.type}"


class Node:
    __slots__ = ("op", "inputs", "outputs", "attrs", "name", "source")

    def __init__(self, op: str, inputs: Sequence[Value | None], outputs: Sequence[Value],
                 attrs: dict[str, Any] | None = None, name: str = "", source: str = ""):
        self.op = op
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.attrs = dict(attrs or {})
        self.name = name
        self.source = source  # model source line, for error messages
        for o in self.outputs:
            o.producer = self

    @property
    def output(self) -> Value:
        assert len(self.outputs) == 1, f"{self.op} has {len(self.outputs)} outputs"
        return self.outputs[0]

    def __repr__(self) -> str:
        return f"Node({self.op}, {[i.name if i else None for i in self.inputs]} -> {[o.name for o in self.outputs]})"


class Graph:
    def __init__(self, name: str = "graph"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.constants: dict[str, np.ndarray] = {}
        self.const_values: dict[str, Value] = {}
        self.meta: dict[str, Any] = {}  # free-form (frontend info, symbol bindings)
        self._names: set[str] = set()
        self._counter = itertools.count()

    # -- naming -------------------------------------------------------------------------
    def fresh_name(self, hint: str = "v") -> str:
        hint = "".join(c if c.isalnum() or c == "_" else "_" for c in (hint or "v"))
        name = hint
        while name in self._names:
            name = f"{hint}_{next(self._counter)}"
        self._names.add(name)
        return name

    # -- building -------------------------------------------------------------------------
    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self.fresh_name(name), type)
        self.inputs.append(v)
        return v

    def add_constant(self, array, name: str = "c") -> Value:
        array = np.asarray(array, order="C")  # not ascontiguousarray: it turns 0-d scalars into shape (1,)
        v = Value(self.fresh_name(name), TensorType.of(array))
        self.constants[v.name] = array
        self.const_values[v.name] = v
        return v

    def make_node(self, op: str, inputs: Sequence[Value | None], attrs: dict | None = None,
                  name: str = "", source: str = "", out_types: Sequence[TensorType] | None = None) -> Node:
        """Create a node (not inserted); output types come from the op registry unless given."""
        from .registry import get_op, infer_types  # local: registry imports graph

        attrs = get_op(op).check_attrs(attrs or {})
        if out_types is None:
            out_types = infer_types(op, [i.type if i is not None else None for i in inputs], attrs)
        outs = [Value(self.fresh_name(name or op), t) for t in out_types]
        return Node(op, inputs, outs, attrs, name=outs[0].name if outs else op, source=source)

    def add_node(self, op: str, inputs: Sequence[Value | None], attrs: dict | None = None, name: str = "",
                 source: str = "", out_types=None, before: Node | None = None) -> Node:
        node = self.make_node(op, inputs, attrs, name, source, out_types)
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    def op(self, op: str, *inputs: Value | None, name: str = "", **attrs) -> Value:
        """Shorthand used by passes and tests: append a single-output node, return its value."""
        return self.add_node(op, list(inputs), attrs, name=name).output

    # -- queries --------------------------------------------------------------------------
    def is_constant(self, v: Value | None) -> bool:
        return v is not None and self.const_values.get(v.name) is v

    def constant(self, v: Value) -> np.ndarray:
        return self.constants[v.name]

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i is not None:
                    out.setdefault(i, []).append(n)
        return out

    def all_values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.const_values.values()
        for n in self.nodes:
            yield from n.outputs

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def symbols(self) -> list[str]:
        seen: list[str] = []
        for v in self.inputs:
            for d in v.shape:
                for s in sorted(symbols.symbols_in(d)):
                    if s not in seen:
                        seen.append(s)
        return seen

    # -- editing --------------------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        for n in self.nodes:
            n.inputs = [new if i is old else i for i in n.inputs]
        self.outputs = [new if o is old else o for o in self.outputs]

    def remove_node(self, node: Node) -> None:
        self.nodes.remove(node)

    def remove_unused_constants(self) -> int:
        used = {i.name for n in self.nodes for i in n.inputs if i is not None} | {o.name for o in self.outputs}
        dead = [k for k in self.constants if k not in used]
        for k in dead:
            del self.constants[k]
            del self.const_values[k]
        return len(dead)

    def toposort(self) -> None:
        """Re-order nodes topologically (stable), after passes that inserted nodes out of order."""
        from .analysis import topological_order

        self.nodes = topological_order(self)

    def copy(self) -> "Graph":
        """Deep copy of structure; constant arrays are shared (treat them as immutable)."""
        g = Graph(self.name)
        g.meta = dict(self.meta)
        g._names = set(self._names)
        g._counter = itertools.count(next(self._counter) + 1000000)
        vmap: dict[Value, Value] = {}

        def cp(v: Value) -> Value:
            if v not in vmap:
                vmap[v] = Value(v.name, v.type)
            return vmap[v]

        g.inputs = [cp(v) for v in self.inputs]
        for name, v in self.const_values.items():
            g.const_values[name] = cp(v)
            g.constants[name] = self.constants[name]
        for n in self.nodes:
            g.nodes.append(Node(n.op, [cp(i) if i is not None else None for i in n.inputs],
                                [cp(o) for o in n.outputs], dict(n.attrs), n.name, n.source))
        g.outputs = [cp(v) for v in self.outputs]
        return g

    def __str__(self) -> str:
        from .printer import format_graph

        return format_graph(self)
