"""``torch_op``: an operator the torch frontend could not map, kept opaque for the torch executor.

When a model given as a torch module uses an ATen op nnforge has no IR op for (or an argument
combination a converter cannot take), or a custom op (``torch.library``), the frontend keeps it
as one ``torch_op`` node instead of failing. The node stores

- ``target``: the op's qualified name, e.g. ``"aten.logcumsumexp.default"`` or ``"mylib.scale.default"``;
- ``args`` / ``kwargs``: the call's arguments as plain JSON, where a tensor argument is
  ``{"$t": k}`` (the node's k-th input), a symbolic size ``{"$dim": "batch*2"}``, a dtype
  ``{"$dtype": "float32"}``, a non-finite float ``{"$float": "inf"}`` (and a few torch enums);
- ``out_types``: the output types torch computed at import, which shape inference returns.

The op is resolved only by name through the ``torch.ops`` namespaces (never eval, never pickle),
and only to a functional (non-mutating) ``OpOverload``, so a hostile graph file cannot name
arbitrary Python. Running such a node needs torch, also in the numpy interpreter; a custom op's
library must be imported (registered) in the process that runs it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..ir import symbols
from ..ir.registry import REQUIRED, OpError, defop
from .common import declared_out_types

_NAME = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*\.[A-Za-z_]\w*$")
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
# torch enums that may appear as arguments: marker -> allowed attribute names of torch
_ENUMS = {"$layout": ("strided",), "$memory_format": ("contiguous_format", "preserve_format", "channels_last")}


class TorchOpError(OpError):
    """A torch_op node names an op that cannot be resolved or run (names the op)."""


# ---------------------------------------------------------------------------------------
# shape inference: the types torch computed at import
# ---------------------------------------------------------------------------------------


def tensor_slots(tree) -> list[int]:
    """Every ``{"$t": k}`` index in an args/kwargs template."""
    if isinstance(tree, dict):
        if "$t" in tree:
            return [tree["$t"]]
        return [k for v in tree.values() for k in tensor_slots(v)]
    if isinstance(tree, list):
        return [k for v in tree for k in tensor_slots(v)]
    return []


def _infer(ts, attrs):
    if not isinstance(attrs["target"], str) or not _NAME.match(attrs["target"]):
        raise OpError(
            f"torch_op: target {attrs['target']!r} is not a qualified op name like 'aten.logcumsumexp.default'"
        )
    slots = tensor_slots(attrs["args"]) + tensor_slots(attrs["kwargs"])
    if any(not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(ts) for k in slots):
        raise OpError(f"torch_op {attrs['target']}: arguments refer to inputs {slots}, node has {len(ts)}")
    return declared_out_types(attrs["out_types"], "torch_op")


# ---------------------------------------------------------------------------------------
# symbols in arguments are bound per call (the interpreter and the torch executor call this)
# ---------------------------------------------------------------------------------------


def _bind_dims(tree, env):
    if isinstance(tree, dict):
        if "$dim" in tree:
            return symbols.evaluate(tree["$dim"], env)
        return {k: _bind_dims(v, env) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_bind_dims(v, env) for v in tree]
    return tree


def _bind(attrs: dict, env: dict) -> dict:
    return {**attrs, "args": _bind_dims(attrs["args"], env), "kwargs": _bind_dims(attrs["kwargs"], env)}


# ---------------------------------------------------------------------------------------
# resolving and calling the op (torch imported lazily: only graphs with torch_op need it)
# ---------------------------------------------------------------------------------------


def resolve(name: str):
    """The torch OpOverload called ``name``, looked up through torch.ops namespaces only."""
    import torch

    if not isinstance(name, str) or not _NAME.match(name):
        raise TorchOpError(f"torch_op: {name!r} is not a qualified op name like 'aten.logcumsumexp.default'")
    ns, op, overload = name.split(".")
    try:
        fn = getattr(getattr(getattr(torch.ops, ns), op), overload)
    except (AttributeError, RuntimeError):
        raise TorchOpError(
            f"torch_op: op {name!r} is not registered with torch here; for a custom op, "
            "import the library that defines it before running"
        ) from None
    if not isinstance(fn, torch._ops.OpOverload):
        raise TorchOpError(f"torch_op: {name!r} is not a torch operator")
    if fn._schema.is_mutable:
        raise TorchOpError(f"torch_op: {name!r} mutates its arguments; only functional ops can run")
    return fn


def decode(tree, tensors: list, device: str = "cpu"):
    """A JSON argument template back into torch call arguments."""
    import torch

    from ..ir.torch_dtypes import TORCH_DTYPES

    if isinstance(tree, list):
        return [decode(v, tensors, device) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "$t" in tree:
        return tensors[tree["$t"]]
    if "$dim" in tree:
        raise TorchOpError(f"torch_op: symbolic size {tree['$dim']!r} was not bound to a value")
    if "$dtype" in tree:
        if tree["$dtype"] not in TORCH_DTYPES:
            raise TorchOpError(f"torch_op: unknown dtype {tree['$dtype']!r}")
        return TORCH_DTYPES[tree["$dtype"]]
    if "$float" in tree:
        if tree["$float"] not in _FLOATS:
            raise TorchOpError(f"torch_op: bad float {tree['$float']!r}")
        return _FLOATS[tree["$float"]]
    if "$device" in tree:
        return torch.device(device)  # runs where the executor runs, whatever the export saw
    for marker, allowed in _ENUMS.items():
        if marker in tree:
            if tree[marker] not in allowed:
                raise TorchOpError(f"torch_op: {marker[1:]} {tree[marker]!r} is not supported")
            return getattr(torch, tree[marker])
    return {k: decode(v, tensors, device) for k, v in tree.items()}


def flat_tensors(res) -> list:
    if isinstance(res, (tuple, list)):
        return [t for r in res for t in flat_tensors(r)]
    return [res]


def call(target: str, args, kwargs, tensors: list, device: str = "cpu") -> list:
    """Run the op on torch tensors; returns its tensor outputs, flattened."""
    import torch

    fn = resolve(target)
    a, k = decode(args, tensors, device), decode(kwargs, tensors, device)
    if not isinstance(a, list) or not isinstance(k, dict):
        raise TorchOpError(f"torch_op {target}: args must be a list and kwargs an object")
    try:
        with torch.no_grad():
            return flat_tensors(fn(*a, **k))
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise TorchOpError(
            f"torch_op {target} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


@defop(
    "torch_op",
    _infer,
    num_inputs=(0, -1),
    kind="opaque",
    attrs={"target": ("str", REQUIRED), "args": ("any", []), "kwargs": ("any", {}), "out_types": ("any", REQUIRED)},
    doc="an ATen or custom torch op kept as is (run by torch); see nnforge.ops.fallback",
)
def torch_op(*xs, target, args, kwargs, out_types):
    from ..ir.torch_dtypes import from_torch, to_torch

    outs = call(target, args, kwargs, [to_torch(x) for x in xs])
    if len(outs) != len(out_types):
        raise TorchOpError(f"torch_op {target}: returned {len(outs)} output(s), the graph declares {len(out_types)}")
    return [from_torch(t) for t in outs]


torch_op.bind = _bind


def _resolvable(node, target: str) -> str | None:
    """Checked when the torch executor takes the graph: a bad name fails at load, not mid-run."""
    try:
        resolve(node.attrs["target"])
    except TorchOpError as e:
        return str(e)
    return None


@torch_op.torch(check=_resolvable)
def _(cx, *xs, target, args, kwargs, out_types):
    return call(target, args, kwargs, list(xs), cx.device)


torch_op.not_on("onnxrt", "an opaque torch op (no ONNX equivalent): it runs on the torch executor")
torch_op.not_on("tvm", "no TVM lowering for this op")


def describe(attrs: dict) -> str:
    """Short text for explain/printing: the op name and its non-tensor arguments."""

    def short(tree) -> Any:
        if isinstance(tree, dict):
            for marker in ("$t", "$dim", "$dtype", "$float", "$device", "$layout", "$memory_format"):
                if marker in tree:
                    return f"%{tree[marker]}" if marker == "$t" else str(tree[marker])
            return {k: short(v) for k, v in tree.items()}
        return [short(v) for v in tree] if isinstance(tree, list) else tree

    parts = [str(short(a)) for a in attrs.get("args", [])]
    parts += [f"{k}={short(v)}" for k, v in attrs.get("kwargs", {}).items()]
    return f"{attrs.get('target')}({', '.join(parts)})"
