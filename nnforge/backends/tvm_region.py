"""TVM lowering of ``elementwise_region``: its steps through their own lowerings; Relax's FuseOps then
makes the chain one kernel."""
from __future__ import annotations

from tvm import relax

from ..ir.ops_region import region_nodes
from .tvm_lower import BROADCASTING, LOWERINGS, Ctx, _align_broadcast, lowering


@lowering("elementwise_region")
def _elementwise_region(c: Ctx, *args):
    node, body = c.node, c.node.attrs["body"]
    vals = list(args)
    try:
        for step, (_, idx, _) in zip(region_nodes(list(node.inputs), body), body):
            c.node = step
            ins = [vals[i] for i in idx]
            if step.op in BROADCASTING:
                ins = _align_broadcast(c.bb, c.dims, step, ins)
            out = LOWERINGS[step.op](c, *ins)
            vals.append(out if isinstance(out, relax.Var) else c.bb.emit(out))
    finally:
        c.node = node
    return vals[-1]
