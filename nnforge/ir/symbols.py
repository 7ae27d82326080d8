"""Symbolic dimensions.

A dimension is an ``int`` or a string naming a symbol ("batch") or a small expression of
symbols ("batch*seq", "seq//2 + 1"). Arithmetic goes through sympy so that shape inference
can simplify; strings are parsed with our own ``ast`` walker, never ``eval``/``sympify``,
because graph files come from outside and must not run code.
"""

from __future__ import annotations

import ast
import operator
from typing import Mapping, Union

import sympy

Dim = Union[int, str]

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,  # sympy prints floor(b/2) for b//2; must parse back
    ast.FloorDiv: lambda a, b: sympy.floor(a / b),
    ast.Mod: operator.mod,
}


def _build(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return sympy.Integer(node.value)
    if isinstance(node, ast.Name):
        return sympy.Symbol(node.id, integer=True, positive=True)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_build(node.left), _build(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_build(node.operand)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("floor", "Max", "Min", "Mod")
        and not node.keywords
    ):
        fn = {"floor": sympy.floor, "Max": sympy.Max, "Min": sympy.Min, "Mod": sympy.Mod}[
            node.func.id
        ]  # sympy prints n % 2 as Mod(n, 2)
        return fn(*[_build(a) for a in node.args])
    raise ValueError(f"not a dimension expression: {ast.dump(node)}")


def to_sympy(d: Dim) -> sympy.Expr:
    if isinstance(d, (int, sympy.Integer)) and not isinstance(d, bool):
        return sympy.Integer(int(d))
    if isinstance(d, sympy.Expr):
        return d
    if not isinstance(d, str) or len(d) > 200:
        raise ValueError(f"bad dimension {d!r}")
    try:
        tree = ast.parse(d, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"bad dimension expression {d!r}") from e
    return _build(tree.body)


def from_sympy(e) -> Dim:
    e = sympy.simplify(e) if not isinstance(e, (int, sympy.Integer, sympy.Symbol)) else e
    if isinstance(e, (int, sympy.Integer)) or (hasattr(e, "is_Integer") and e.is_Integer):
        return int(e)
    return str(e)


def simplify(d: Dim) -> Dim:
    return d if isinstance(d, int) else from_sympy(to_sympy(d))


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


def symbols_in(d: Dim) -> set[str]:
    return set() if isinstance(d, int) else {s.name for s in to_sympy(d).free_symbols}


def evaluate(d: Dim, env: Mapping[str, int]) -> int:
    """Value of a dimension given concrete symbol values."""
    if isinstance(d, int):
        return d
    e = to_sympy(d)
    missing = {s.name for s in e.free_symbols} - set(env)
    if missing:
        raise ValueError(f"dimension {d!r} uses unbound symbol(s) {sorted(missing)}")
    return int(e.subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in env.items()}))


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.simplify(to_sympy(a) - to_sympy(b)) == 0


def mul(*ds: Dim) -> Dim:
    out = sympy.Integer(1)
    for d in ds:
        out = out * to_sympy(d)
    return from_sympy(out)


def div(a: Dim, b: Dim) -> Dim:
    """Exact division used by reshape's -1; sympy cancels common symbols."""
    return from_sympy(sympy.cancel(to_sympy(a) / to_sympy(b)))
