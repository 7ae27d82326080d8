"""The op registry: one ``OpDef`` per op holds everything about it.

An op family module under ``nnforge/ops/`` declares, side by side, each op's attribute schema, its
shape/dtype rule, its numpy reference (the oracle), its torch-executor implementation and each
backend's lowering and support check. Every implementation has the same signature::

    fn(cx, *inputs, **attrs) -> output | list of outputs

``cx`` is the backend's lowering context (``cx.node`` is the node being lowered); ``inputs`` are the
backend's values for the node's inputs (a torch tensor, a Relax expression, an ONNX value name;
trailing optional inputs that are absent are left out); ``attrs`` are the node's attributes. A support
check is ``check(node, target_name) -> reason | None``. A backend an op deliberately does not run on
is declared with ``opdef.not_on(backend, reason)``; the completeness test walks the registry.

The family modules are loaded on the registry's first use (``load_ops``), so ``nnforge.ir`` imports
no backend and the families may import ``nnforge.ir`` freely.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import symbols
from .graph import DTYPES, TensorType

REQUIRED = object()
BACKENDS = ("torch", "onnxrt", "tvm")  # the executors every op declares itself for
_SHOWN = {"torch": "torch", "onnxrt": "ONNX", "tvm": "TVM"}

# Attribute kinds: how to validate a value, and whether the interpreter must bind symbols in it.
_ATTR_CHECKS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "ints": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
    "dims": lambda v: (
        isinstance(v, (list, tuple)) and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in v)
    ),
    "dim": lambda v: isinstance(v, (int, str)) and not isinstance(v, bool),
    "dtype": lambda v: v in DTYPES,
    "optional_ints": lambda v: v is None or (isinstance(v, (list, tuple)) and all(isinstance(x, int) for x in v)),
    "optional_float": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
    "any": lambda v: True,
}

Impl = Callable[..., Any]
Check = Callable[..., "str | None"]


class OpError(ValueError):
    """Bad attributes or input types for an op (names the op)."""


@dataclass
class OpDef:
    name: str
    infer: Callable[[list, dict], list[TensorType]]
    ref: Callable[..., Any]
    attrs: dict[str, tuple[str, Any]] = field(default_factory=dict)  # name -> (kind, default)
    num_inputs: tuple[int, int] = (1, 1)  # (min, max); max -1 = variadic
    kind: str = "compute"  # elementwise | reduce | shape | compute | fused | opaque
    doc: str = ""
    bind: Callable[[dict, dict], dict] | None = None  # extra symbol binding for attributes of kind "any"
    impls: dict[str, Impl] = field(default_factory=dict)  # backend -> fn(cx, *inputs, **attrs)
    checks: dict[str, Check] = field(default_factory=dict)  # backend -> fn(node, target_name) -> reason | None
    unsupported: dict[str, str] = field(default_factory=dict)  # backend -> why the op never runs there

    # -- declaring implementations (decorators) --------------------------------------------
    def implement(self, backend: str, fn: Impl | None = None, *, check: Check | None = None):
        """Register ``fn`` as this op's implementation on ``backend`` (usable as a decorator)."""
        if backend not in BACKENDS:
            raise ValueError(f"{self.name}: unknown backend {backend!r}; backends are {BACKENDS}")

        def deco(f: Impl) -> Impl:
            self.impls[backend] = f
            if check is not None:
                self.checks[backend] = check
            return f

        return deco(fn) if fn is not None else deco

    def torch(self, fn: Impl | None = None, **kw):
        return self.implement("torch", fn, **kw)

    def onnxrt(self, fn: Impl | None = None, **kw):
        return self.implement("onnxrt", fn, **kw)

    def tvm(self, fn: Impl | None = None, **kw):
        return self.implement("tvm", fn, **kw)

    def not_on(self, backend: str, reason: str) -> "OpDef":
        self.unsupported[backend] = reason
        return self

    def problem(self, backend: str, node, target_name: str = "cpu") -> str | None:
        """Why ``node`` cannot run on ``backend`` (None when it can)."""
        if backend not in self.impls:
            return self.unsupported.get(backend, f"no {_SHOWN[backend]} lowering for this op")
        check = self.checks.get(backend)
        return check(node, target_name) if check else None

    # -- attributes ---------------------------------------------------------------------
    def check_attrs(self, attrs: dict) -> dict:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise OpError(f"{self.name}: unknown attribute(s) {sorted(unknown)}")
        out = {}
        for key, (kind, default) in self.attrs.items():
            if key in attrs:
                val = attrs[key]
                if isinstance(val, tuple):
                    val = list(val)
                if not _ATTR_CHECKS[kind](val):
                    raise OpError(f"{self.name}: attribute {key}={val!r} is not of kind {kind}")
                out[key] = val
            elif default is REQUIRED:
                raise OpError(f"{self.name}: missing attribute {key!r}")
            else:
                out[key] = default
        return out

    def bind_attrs(self, attrs: dict, env: dict[str, int]) -> dict:
        """Replace symbolic dims in 'dims'/'dim' attributes by their values (for execution)."""
        out = dict(attrs)
        for key, (kind, _) in self.attrs.items():
            if kind == "dims":
                out[key] = [symbols.evaluate(d, env) for d in attrs[key]]
            elif kind == "dim":
                out[key] = symbols.evaluate(attrs[key], env)
        return out if self.bind is None else self.bind(out, env)


class _Registry(dict):
    """name -> OpDef; the op family modules are loaded before the first lookup."""

    def _full(self) -> "_Registry":
        load_ops()
        return self

    def __getitem__(self, k):
        return dict.__getitem__(self._full(), k)

    def __contains__(self, k):
        return dict.__contains__(self._full(), k)

    def __iter__(self):
        return dict.__iter__(self._full())

    def __len__(self):
        return dict.__len__(self._full())

    def get(self, k, default=None):
        return dict.get(self._full(), k, default)

    def items(self):
        return dict.items(self._full())

    def keys(self):
        return dict.keys(self._full())

    def values(self):
        return dict.values(self._full())


REGISTRY: dict[str, OpDef] = _Registry()
_loaded = False


def load_ops() -> None:
    """Import the op families (``nnforge.ops``), which register themselves; idempotent."""
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module("nnforge.ops")


def defop(name: str, infer, attrs=None, num_inputs=(1, 1), kind="compute", doc="", ref=None):
    """Declare op ``name``; with ``ref`` returns the OpDef, else a decorator taking the numpy reference."""

    def make(fn) -> OpDef:
        if dict.__contains__(REGISTRY, name):
            raise OpError(f"op {name!r} is declared twice")
        opdef = OpDef(name, infer, fn, dict(attrs or {}), num_inputs, kind, doc or (fn.__doc__ or "").strip())
        dict.__setitem__(REGISTRY, name, opdef)
        return opdef

    return make(ref) if ref is not None else make


def implement(backend: str, *names: str, check: Check | None = None):
    """Decorator: ``fn`` implements every op in ``names`` on ``backend`` (for families sharing one rule)."""

    def deco(fn: Impl) -> Impl:
        for n in names:
            get_op(n).implement(backend, fn, check=check)
        return fn

    return deco


def get_op(name: str) -> OpDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise OpError(f"unknown op {name!r}") from None


def infer_types(op: str, in_types: Sequence[TensorType | None], attrs: dict) -> list[TensorType]:
    opdef = get_op(op)
    lo, hi = opdef.num_inputs
    if len(in_types) < lo or (hi >= 0 and len(in_types) > hi):
        raise OpError(f"{op}: expects {lo}..{hi if hi >= 0 else 'n'} inputs, got {len(in_types)}")
    try:
        return opdef.infer(list(in_types), opdef.check_attrs(attrs))
    except OpError as e:  # make every message start with the op's name
        raise e if str(e).startswith(op + ":") else OpError(f"{op}: {e}") from None


def call_impl(backend: str, cx, node, inputs: list, attrs: dict | None = None) -> list:
    """Run ``node``'s ``backend`` implementation (with ``attrs``, default the node's); returns its outputs as a list."""
    impl = get_op(node.op).impls[backend]
    args = list(inputs)
    while args and args[-1] is None:  # absent trailing optional inputs: the implementation defaults them
        args.pop()
    out = impl(cx, *args, **(node.attrs if attrs is None else attrs))
    return list(out) if isinstance(out, (list, tuple)) else [out]
