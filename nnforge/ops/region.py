"""``elementwise_region``: a chain of elementwise ops kept as one node (made by the ``fuse_elementwise`` pass).

Attribute ``body`` lists the steps in order as ``[op, [arg, ...], attrs]``: an arg ``i`` below the number
of inputs is input ``i``, above it the result of step ``i - len(inputs)``; the last step's result is the
output. Every executor runs the steps one by one through the steps' own implementations (``cx.lower``):
ONNX Runtime fuses its own ops again, TVM's FuseOps makes the chain one kernel. The reference runs them
with the registry's references, so the region computes exactly what the ops it replaced did.
"""

from __future__ import annotations

import numpy as np

from ..ir.graph import Graph, Node, TensorType, Value
from ..ir.registry import REQUIRED, OpError, defop, get_op, infer_types


def region_nodes(inputs: list[Value], body: list) -> list[Node]:
    """The body as typed IR nodes over ``inputs`` (a scratch graph names them; callers may rename outputs)."""
    scratch, vals, nodes = Graph("region"), list(inputs), []
    for step in body:
        op, args, attrs = step
        if get_op(op).kind != "elementwise" or any(not 0 <= a < len(vals) for a in args):
            raise OpError(f"elementwise_region: bad step {step!r}")
        node = scratch.make_node(op, [vals[a] for a in args], attrs)
        nodes.append(node)
        vals.append(node.output)
    if not nodes:
        raise OpError("elementwise_region: empty body")
    return nodes


def _region_infer(ts, attrs):
    ins = [Value(f"in{i}", t) for i, t in enumerate(ts)]
    return [region_nodes(ins, attrs["body"])[-1].output.type]


@defop(
    "elementwise_region",
    _region_infer,
    attrs={"body": ("any", REQUIRED)},
    num_inputs=(1, -1),
    kind="fused",
    doc="a chain of elementwise ops as one node; body: [op, [arg indices], attrs] steps, the last is the output",
)
def elementwise_region(*xs, body):
    vals = [np.asarray(x) for x in xs]
    for op, args, attrs in body:
        ins = [vals[a] for a in args]
        out = infer_types(op, [TensorType.of(a) for a in ins], get_op(op).check_attrs(attrs))[0]
        with np.errstate(all="ignore"):
            vals.append(np.asarray(get_op(op).ref(*ins, **attrs)).astype(out.dtype, copy=False))
    return vals[-1]


def _run_steps(cx, xs, body, *, rename=None, settle=None):
    """The body's steps through ``cx.lower`` (the executor's own dispatch); the last step's value.
    ``rename(step)`` names a step's output before it is lowered; ``settle(value)`` prepares a step's
    value for the steps that read it."""
    vals = list(xs)
    for step, (_, args, _) in zip(region_nodes(list(cx.node.inputs), body), body):
        if rename:
            rename(step)
        (value,) = cx.lower(step, [vals[a] for a in args])
        vals.append(settle(value) if settle else value)
    return vals[-1]


@elementwise_region.torch
def _(cx, *xs, body):
    return _run_steps(cx, xs, body)


@elementwise_region.onnxrt
def _(cx, *xs, body):
    def rename(step):  # the scratch graph's names could clash with the model's
        step.output.name = cx.fresh(step.op)

    return _run_steps(cx, xs, body, rename=rename)


@elementwise_region.tvm
def _(c, *xs, body):
    from tvm import relax

    return _run_steps(c, xs, body, settle=lambda value: value if isinstance(value, relax.Var) else c.emit(value))
