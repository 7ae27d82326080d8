"""``onnx_node``: ONNX nodes nnforge has no IR op for, kept as they are for ONNX Runtime to run.

When the ONNX frontend meets an operator without a converter (or an attribute combination its
converter cannot take), it keeps the node opaque instead of refusing the model. The node stores a
self-contained ONNX model (``model``, base64 of its protobuf): usually one node (with its attributes
and subgraphs, its opset imports, and typed graph inputs for every value it reads, including the
outer values its subgraphs (If/Loop/Scan bodies) refer to); several nodes where values pass between them
that IR types cannot hold (sequences, optionals, shapes known only at run time). ``out_types`` are the output types ONNX
shape inference gave at import, which nnforge's shape inference returns.

It runs where ONNX runs: the ONNX Runtime backend inlines the node into its model; the TVM backend
and the torch executor cannot run it, so the partitioner gives it an ONNX Runtime partition; the
reference interpreter runs it with ONNX's own reference implementation (``onnx.reference``). The
payload is protobuf, parsed, never executed as code: a hostile graph file can name only ONNX ops.
"""

from __future__ import annotations

import base64
import binascii
import functools

import numpy as np

from ..ir.registry import REQUIRED, OpError, defop
from .common import declared_out_types


class OnnxNodeError(OpError):
    """An onnx_node's payload is malformed or its op cannot run (names the op)."""


@functools.lru_cache(maxsize=256)
def fragment(payload: str):
    """The one-node ONNX model an onnx_node carries (parsed once per payload)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.ModelProto.FromString(base64.b64decode(payload.encode("ascii"), validate=True))
    except (binascii.Error, ValueError, DecodeError, UnicodeEncodeError) as e:
        raise OnnxNodeError(f"onnx_node: its model payload is not a base64 ONNX protobuf: {e}") from None
    if not model.graph.node or not model.opset_import:
        raise OnnxNodeError("onnx_node: its model payload must hold its nodes and opset imports")
    return model


def pack(model) -> str:
    return base64.b64encode(model.SerializeToString()).decode("ascii")


def _infer(ts, attrs):
    model = fragment(attrs["model"])
    op = attrs["op_type"]
    if op != "+".join(dict.fromkeys(n.op_type for n in model.graph.node)):
        raise OpError(f"onnx_node: op_type {op!r} does not match its payload's nodes")
    if len(model.graph.input) != len(ts):
        raise OpError(f"onnx_node {op}: its payload reads {len(model.graph.input)} values, node has {len(ts)}")
    types = declared_out_types(attrs["out_types"], "onnx_node")
    if len(types) != len(model.graph.output):
        raise OpError(f"onnx_node {op}: {len(types)} out_types for {len(model.graph.output)} outputs")
    return types


@defop(
    "onnx_node",
    _infer,
    num_inputs=(0, -1),
    kind="opaque",
    attrs={"op_type": ("str", REQUIRED), "model": ("str", REQUIRED), "out_types": ("any", REQUIRED)},
    doc="an ONNX node kept as is (run by ONNX Runtime; onnx.reference in the interpreter); see nnforge.ops.onnx_node",
)
def onnx_node(*xs, op_type, model, out_types):
    from onnx.reference import ReferenceEvaluator

    proto = fragment(model)
    feeds = {i.name: np.asarray(x) for i, x in zip(proto.graph.input, xs)}
    try:
        outs = ReferenceEvaluator(proto).run(None, feeds)
    except Exception as e:  # noqa: BLE001 - the reference raises many types; name the op
        raise OnnxNodeError(f"onnx_node {op_type}: onnx.reference cannot run it: {type(e).__name__}: {e}") from None
    return [_as_ir(np.asarray(o), t["dtype"]) for o, t in zip(outs, out_types)]


def _as_ir(a: np.ndarray, dtype: str) -> np.ndarray:
    """onnx.reference's result in the IR dtype's numpy form (ml_dtypes' types, object arrays for strings)."""
    import ml_dtypes

    if dtype == "string":
        return a.astype(object)
    return a.astype(getattr(ml_dtypes, dtype, None) or dtype)


@onnx_node.onnxrt
def _(cx, *ins, op_type, model, out_types):
    """Inline the nodes: inputs renamed to the values lowered so far, every value they make given a fresh name."""
    proto = fragment(model)
    rename = {i.name: name for i, name in zip(proto.graph.input, ins)}
    for n in proto.graph.node:
        for o in n.output:
            if o:
                rename[o] = cx.fresh(n.op_type.lower())
    for n in proto.graph.node:
        cx.add_foreign_node(_renamed(n, rename), proto.opset_import)
    return [rename[o.name] for o in proto.graph.output]


def _renamed(node, rename: dict):
    """A copy of ``node`` whose inputs, outputs and subgraphs' outer references follow ``rename``."""
    import onnx

    out = onnx.NodeProto()
    out.CopyFrom(node)
    out.input[:] = [rename.get(i, i) if i else "" for i in node.input]
    out.output[:] = [rename.get(o, o) if o else "" for o in node.output]
    for a in out.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            _rename_outer(g, rename)
    return out


def _rename_outer(graph, rename: dict) -> None:
    """Rename references to outer values inside a subgraph (names it defines itself shadow them)."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for n in graph.node:
        n.input[:] = [i if (not i or i in local) else rename.get(i, i) for i in n.input]
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _rename_outer(g, {k: v for k, v in rename.items() if k not in local})
        local |= set(n.output)
    for o in graph.output:
        if o.name not in local and o.name in rename:
            o.name = rename[o.name]


onnx_node.not_on("tvm", "an ONNX op with no IR equivalent: it runs on ONNX Runtime")
onnx_node.not_on("torch", "an ONNX op with no IR equivalent: it runs on ONNX Runtime")
