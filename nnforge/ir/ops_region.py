"""``elementwise_region``: a chain of elementwise ops kept as one node (made by the ``fuse_elementwise`` pass).

Attribute ``body`` lists the steps in order as ``[op, [arg, ...], attrs]``: an arg ``i`` below the number
of inputs is input ``i``, above it the result of step ``i - len(inputs)``; the last step's result is the
output. Backends lower the steps one by one (ONNX Runtime fuses its own ops again; TVM's FuseOps makes the
chain one kernel); the reference runs them with the registry's references, so the region computes exactly
what the ops it replaced did.
"""
from __future__ import annotations

import numpy as np

from .graph import Graph, Node, TensorType, Value
from .ops import REQUIRED, OpError, get_op, infer_types, register


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


@register("elementwise_region", _region_infer, attrs={"body": ("any", REQUIRED)}, num_inputs=(1, -1), kind="fused",
          doc="a chain of elementwise ops as one node; body: [op, [arg indices], attrs] steps, the last is the output")
def _elementwise_region(*xs, body):
    vals = [np.asarray(x) for x in xs]
    for op, args, attrs in body:
        ins = [vals[a] for a in args]
        out = infer_types(op, [TensorType.of(a) for a in ins], get_op(op).check_attrs(attrs))[0]
        with np.errstate(all="ignore"):
            vals.append(np.asarray(get_op(op).ref(*ins, **attrs)).astype(out.dtype, copy=False))
    return vals[-1]
