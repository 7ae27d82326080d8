"""TVM lowering of ``elementwise_region``: its steps through their own lowerings; Relax's FuseOps then
makes the chain one kernel."""
from __future__ import annotations

from tvm import relax

from ..ir.ops_region import region_nodes
from .tvm_lower import Ctx, lower_node, lowering


@lowering("elementwise_region")
def _elementwise_region(c: Ctx, *args):
    node, body = c.node, c.node.attrs["body"]
    vals = list(args)
    for step, (_, idx, _) in zip(region_nodes(list(node.inputs), body), body):
        (out,) = lower_node(c, step, [vals[i] for i in idx])
        vals.append(out if isinstance(out, relax.Var) else c.bb.emit(out))
    return vals[-1]
