"""The torch executor: runs IR nodes with torch ops. Registered as backend ``"torch"``.

It is the fallback for the parts of a graph another backend cannot take (see ``nnforge.partition``)
and the only runner of ``torch_op`` nodes (ATen or custom ops the frontend kept opaque). Each op's
torch implementation sits beside its numpy reference in its family module (nnforge/ops); some
(low-bit, tokens) run that reference (``TorchCx.reference``), so every registry op runs here. It runs on this host: on the CPU, or on the GPU
for target ``cuda`` when torch sees one. Nothing is compiled, so there are no files to save: the
bundle's IR is all it needs.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import NnforgeError
from ..ir import Graph, Node, bind_symbols, get_op
from ..ir.registry import REGISTRY, call_impl
from ..ir.torch_dtypes import TORCH_DTYPES, from_torch, to_torch
from ..ops.fallback import TorchOpError
from ..targets import Target, get_target
from .base import Artifact, Backend, Unsupported, register_backend


@dataclass
class TorchCx:
    """What a torch implementation may use besides its inputs: the node, the device it runs on, the
    values of the graph's symbols in this run."""

    node: Node
    device: str = "cpu"
    env: dict = field(default_factory=dict)

    def lower(self, node: Node, args: list) -> list:
        """Run ``node`` (a step of a composite op) on torch values ``args``; its outputs."""
        return run_node_torch(node, list(args), self.env, self.device)

    def reference(self, *inputs, **attrs) -> list:
        """The node's numpy reference on torch tensors (an op may run it as its torch implementation)."""
        args = [from_torch(a) if a is not None else None for a in inputs]
        with np.errstate(all="ignore"):  # NaN/Inf propagate like eager instead of warning
            res = get_op(self.node.op).ref(*args, **attrs)
        res = list(res) if isinstance(res, (tuple, list)) else [res]
        return [
            to_torch(np.asarray(r).astype(o.dtype, copy=False)).to(self.device) for r, o in zip(res, self.node.outputs)
        ]


# ---------------------------------------------------------------------------------------
# running a graph
# ---------------------------------------------------------------------------------------


def _device(target: Target) -> str:
    return "cuda" if target.name == "cuda" and torch.cuda.is_available() else "cpu"


def torch_constants(graph: Graph, device: str = "cpu") -> dict:
    return {v: to_torch(graph.constants[name]).to(device) for name, v in graph.const_values.items()}


def run_graph_torch(
    graph: Graph, inputs: Sequence[np.ndarray], device: str = "cpu", constants: dict | None = None
) -> list[np.ndarray]:
    """Run ``graph`` node by node with torch; numpy in, numpy out (values are freed after their last use).

    ``constants`` (from ``torch_constants``) saves converting the weights on every call.
    """
    arrays = [np.asarray(a) for a in inputs]
    env = bind_symbols(graph, arrays)
    vals: dict = dict(constants) if constants is not None else torch_constants(graph, device)
    vals.update((v, to_torch(a).to(device)) for v, a in zip(graph.inputs, arrays))
    remaining: dict = {}
    for n in graph.nodes:
        for i in n.inputs:
            if i is not None:
                remaining[i] = remaining.get(i, 0) + 1
    keep = set(graph.outputs)
    with torch.no_grad():
        for node in graph.nodes:
            outs = run_node_torch(node, [vals[i] if i is not None else None for i in node.inputs], env, device)
            vals.update(zip(node.outputs, outs))
            for i in node.inputs:
                if i is not None and i in remaining:
                    remaining[i] -= 1
                    if remaining[i] == 0 and i not in keep and not graph.is_constant(i):
                        del vals[i]
    return [from_torch(vals[o]) for o in graph.outputs]


def run_node_torch(node: Node, args: list, env: dict, device: str = "cpu") -> list:
    opdef = get_op(node.op)
    attrs = opdef.bind_attrs(node.attrs, env)
    while args and args[-1] is None:  # optional trailing inputs given as None: the lowerings default them
        args = args[:-1]
    if "torch" not in opdef.impls:
        raise NnforgeError(f"torch executor: {node.op} (%{node.outputs[0].name}): {opdef.problem('torch', node)}")
    res = call_impl("torch", TorchCx(node, device, env), node, args, attrs)
    return [r.to(TORCH_DTYPES[o.dtype]) if r.dtype != TORCH_DTYPES[o.dtype] else r for r, o in zip(res, node.outputs)]


def _torch_check(n: Node):
    """The op's support check on the torch executor (torch_op: its name must resolve; an op declared not to run
    on torch, such as a kept ONNX node, says why)."""
    opdef = REGISTRY.get(n.op)
    if opdef is None:
        return None
    return lambda node, target_name: opdef.problem("torch", node, target_name)


_threads_lock = threading.Lock()
_threads_depth = 0
_threads_saved = 0


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread for a while (re-entrant, across threads). A torch partition between ONNX Runtime
    or TVM partitions runs so: torch's OpenMP workers otherwise spin after each op and take the cores from the
    runtime that runs next (bench/fallback_cost.py: 2.4x the model without the fallback op, 1.09x so)."""
    global _threads_depth, _threads_saved
    with _threads_lock:
        if _threads_depth == 0:
            _threads_saved = torch.get_num_threads()
            if _threads_saved != 1:
                torch.set_num_threads(1)
        _threads_depth += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_depth -= 1
            if _threads_depth == 0 and _threads_saved != 1:
                torch.set_num_threads(_threads_saved)


class TorchArtifact(Artifact):
    """Runs the IR with torch on this host; stateless per call, so it is thread-safe."""

    backend = "torch"
    thread_safe = True  # no state is written per call; the weights' tensors are only read

    def __init__(self, graph: Graph, target: Target):
        super().__init__(graph, target)
        for (
            n
        ) in graph.nodes:  # check every node now (an opaque op's name resolves): a bad one fails at load, not mid-run
            check = _torch_check(n)
            reason = check(n, target.name) if check else None
            if reason:
                raise NnforgeError(f"torch executor: node %{n.outputs[0].name if n.outputs else n.name}: {reason}")
        self.device = _device(target)
        self.constants = torch_constants(graph, self.device)  # converted once, only read afterwards

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        try:
            return run_graph_torch(self.graph, inputs, self.device, self.constants)
        except ValueError as e:
            raise NnforgeError(f"torch executor: bad input: {e}") from None
        except TorchOpError as e:
            raise NnforgeError(f"torch executor: {e}") from None

    __call__ = run

    def save_files(self, directory: Path) -> list[str]:
        return []  # the bundle's IR (graph.json + weights) is the whole model

    @classmethod
    def load_files(cls, directory: Path, graph: Graph, target: Target, manifest: dict) -> "TorchArtifact":
        return cls(graph, get_target(target))


class TorchBackend(Backend):
    name = "torch"
    artifact_class = TorchArtifact

    def supports(self, graph: Graph, target: Target | str = "cpu") -> list[Unsupported]:
        target = get_target(target)
        out = []
        for n in graph.nodes:
            reason = None
            if target.name not in ("cpu", "cuda"):
                reason = f"the torch executor runs on this host (cpu, cuda), not on {target.name!r}"
            else:
                check = _torch_check(n)
                reason = check(n, target.name) if check else None
            if reason:
                out.append(Unsupported(n.op, n.outputs[0].name if n.outputs else n.name, n.source, reason))
        return out

    def build(self, graph: Graph, target: Target | str = "cpu", options: dict | None = None) -> TorchArtifact:
        target = get_target(target)
        bad = self.supports(graph, target)
        if bad:
            raise NnforgeError(f"torch executor: cannot run {bad[0]}")
        return TorchArtifact(graph, target)


register_backend(TorchBackend())
