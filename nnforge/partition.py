"""Partitioning with fallback: split a graph between a backend and the torch executor.

When ``Backend.supports`` lists nodes a backend cannot take, ``plan_partitions`` groups the
nodes into maximal partitions of one kind (the backend's, or torch's for the rest) such that
the partitions form a DAG (no path leaves a partition and comes back into it). A backend
partition smaller than ``min_block_size`` nodes stays on torch (as Torch-TensorRT's
min_block_size): a tiny island costs more in copies than it saves. Each partition becomes a
subgraph built by its backend; ``PartitionedArtifact`` runs them in order, passing values by
name. The plan is plain JSON and goes into the bundle manifest, so a loaded bundle runs the
same plan; the sub-artifacts' files are stored with a ``p<k>_`` prefix.

``build(graph, BuildSettings.resolve(target, backend, ...))`` is the one plan-and-build step every
caller goes through (compile, the budget search timing its candidates, export; ``explain`` shows
``plan_for``'s plan): the backend takes the whole graph when it can, else the planned partitions.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import networkx as nx
import numpy as np

from .backends.base import Artifact, Unsupported, artifact_class, get_backend, run_artifact
from .errors import BundleError, NnforgeError, UnsupportedOpError
from .ir import Graph, Node, Value, bind_symbols, get_op, symbols
from .targets import Target, get_target, resolve_backend

FALLBACK = "torch"
FALLBACK_TARGETS = ("cpu", "cuda")  # the torch executor runs on this host, not on an edge device


def fallback_chain(backend: str, target: Target) -> list[str]:
    """Who takes a node ``backend`` cannot, in order of preference: ONNX Runtime (kept ONNX nodes run only
    there, and its partitions are cheaper than torch's), then the torch executor."""
    if target.name not in FALLBACK_TARGETS:
        return []  # an edge bundle runs one backend's runtime on the device
    chain = ["onnxrt"] if backend != "onnxrt" and "onnxrt" in target.backends else []
    return chain + ([FALLBACK] if backend != FALLBACK else [])


DEFAULT_MIN_BLOCK_SIZE = 3


@dataclass
class Partition:
    backend: str
    nodes: list[int]  # indices into the graph's node list (in order)
    inputs: list[str] = field(default_factory=list)  # value names it reads, in its subgraph's input order
    outputs: list[str] = field(default_factory=list)  # value names later partitions or the graph read
    files: dict[str, str] = field(default_factory=dict)  # sub-artifact file -> bundle file name

    @property
    def fallback(self) -> bool:
        return self.backend == FALLBACK


@dataclass
class PartitionPlan:
    backend: str  # the chosen backend
    min_block_size: int
    partitions: list[Partition]
    reasons: dict[int, str] = field(default_factory=dict)  # node index -> why it runs on torch

    @property
    def fallback_nodes(self) -> list[int]:
        return sorted(i for p in self.partitions if p.fallback for i in p.nodes)

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "fallback": FALLBACK,
            "min_block_size": self.min_block_size,
            "partitions": [asdict(p) for p in self.partitions],
            "reasons": {str(k): v for k, v in sorted(self.reasons.items())},
        }

    @staticmethod
    def from_json(doc, graph: Graph) -> "PartitionPlan":
        """Read and validate a plan against its graph; BundleError naming what is wrong."""
        try:
            parts = [
                Partition(
                    str(p["backend"]),
                    [int(i) for i in p["nodes"]],
                    [str(s) for s in p["inputs"]],
                    [str(s) for s in p["outputs"]],
                    {str(k): str(v) for k, v in p.get("files", {}).items()},
                )
                for p in doc["partitions"]
            ]
            plan = PartitionPlan(
                str(doc["backend"]),
                int(doc["min_block_size"]),
                parts,
                {int(k): str(v) for k, v in doc.get("reasons", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"partition plan is malformed: {type(e).__name__}: {e}") from None
        _validate(plan, graph)
        return plan

    def __str__(self) -> str:
        lines = [
            f"partition plan: {len(self.partitions)} partition(s), backend {self.backend}, "
            f"min_block_size {self.min_block_size}"
        ]
        for k, p in enumerate(self.partitions):
            lines.append(
                f"  p{k} {p.backend:7s} {len(p.nodes):4d} node(s)  in: {', '.join(p.inputs) or '-'}  "
                f"out: {', '.join(p.outputs) or '-'}"
            )
        return "\n".join(lines)


def _validate(plan: PartitionPlan, graph: Graph) -> None:
    names = {v.name for v in graph.all_values()}
    seen: list[int] = []
    allowed = [plan.backend, "onnxrt", FALLBACK]
    for k, p in enumerate(plan.partitions):
        if p.backend not in allowed:
            raise BundleError(f"partition p{k}: backend {p.backend!r} is not one of {allowed}")
        if any(not 0 <= i < len(graph.nodes) for i in p.nodes):
            raise BundleError(f"partition p{k}: node index out of range (graph has {len(graph.nodes)} nodes)")
        unknown = [n for n in p.inputs + p.outputs if n not in names]
        if unknown:
            raise BundleError(f"partition p{k}: values {unknown[:5]} are not in the graph")
        bad = [f for f in p.files.values() if not f.startswith(f"p{k}_") or "/" in f or "\\" in f]
        if bad:
            raise BundleError(f"partition p{k}: file names {bad} are not p{k}_ files of the bundle")
        seen += p.nodes
    if sorted(seen) != list(range(len(graph.nodes))):
        raise BundleError("partition plan does not cover every node exactly once")


# ---------------------------------------------------------------------------------------
# the plan-and-build step
# ---------------------------------------------------------------------------------------


@dataclass
class BuildSettings:
    """Where and how a graph is built: what the plan-and-build step and the compile cache key read."""

    target: Target
    backend: str
    options: dict = field(default_factory=dict)  # the backend's build options
    fallback: bool = True  # nodes the backend cannot take run on the torch executor (else refused)
    min_block_size: int = DEFAULT_MIN_BLOCK_SIZE

    @classmethod
    def resolve(
        cls,
        target: Target | str = "cpu",
        backend: str | None = None,
        options: dict | None = None,
        *,
        tune: int = 0,
        fallback: bool = True,
        min_block_size: int = DEFAULT_MIN_BLOCK_SIZE,
    ) -> "BuildSettings":
        """Names and aliases -> settings, refusing a backend the target does not take. ``tune``: MetaSchedule
        trials, a TVM build option."""
        tgt = get_target(target)
        name = resolve_backend(tgt, backend)
        options = dict(options or {})
        if tune:
            if name != "tvm":
                raise NnforgeError(f"tune={tune}: MetaSchedule tuning needs backend='tvm', not {name!r}")
            options["tune"] = tune
        return cls(tgt, name, options, fallback, min_block_size)


def plan_for(graph: Graph, settings: BuildSettings) -> "PartitionPlan | None":
    """None when the backend takes the whole graph; else which nodes run on it and which on torch.
    UnsupportedOpError naming the nodes when some need torch and ``settings.fallback`` is off."""
    missing = get_backend(settings.backend).supports(graph, settings.target)
    if not missing:
        return None
    if not settings.fallback:
        raise UnsupportedOpError(
            [(f"{u.op}: {u.reason}", u.source) for u in missing], where=f"backend {settings.backend}"
        )
    return plan_partitions(graph, settings.backend, settings.target, settings.min_block_size)


def build(graph: Graph, settings: BuildSettings) -> Artifact:
    """Plan, then build: the whole graph with the backend, or each planned partition with its own."""
    plan = plan_for(graph, settings)
    if plan is None:
        return get_backend(settings.backend).build(graph, settings.target, dict(settings.options))
    return build_partitioned(graph, settings.target, settings.backend, settings.options, settings.min_block_size, plan)


# ---------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------


def _blamed_nodes(graph: Graph, problems: Sequence[Unsupported]) -> dict[int, str]:
    """Node index -> reason, from supports()'s list (which names nodes by their first output)."""
    by_output = {o.name: k for k, n in enumerate(graph.nodes) for o in n.outputs}
    users: dict[str, list[int]] = {}
    for k, n in enumerate(graph.nodes):
        for i in n.inputs:
            if i is not None:
                users.setdefault(i.name, []).append(k)
    out: dict[int, str] = {}
    for u in problems:
        # a node by its output; else a value (e.g. a graph input of a dtype the backend lacks): its users
        for k in [by_output[u.node]] if u.node in by_output else users.get(u.node, []):
            out.setdefault(k, u.reason)
    return out


def group_nodes(graph: Graph, on_backend: Sequence) -> list[tuple[Any, list[int]]]:
    """Greedy grouping in node order into (kind, node indices), keeping the group graph acyclic; a kind is
    any label (the backend that runs the node).

    A node joins the newest group of its kind that no other group it reads from can be reached
    from (else joining would close a cycle); otherwise it opens a new group. Groups come back in
    an order that runs (a topological order of the group graph).
    """
    groups: list[tuple[Any, list[int]]] = []
    dag = nx.DiGraph()
    where: dict[Node, int] = {}
    for k, node in enumerate(graph.nodes):
        kind = on_backend[k]
        preds = {where[i.producer] for i in node.inputs if i is not None and i.producer in where}
        chosen = None
        for gid in reversed(range(len(groups))):
            if groups[gid][0] != kind:
                continue
            if not any(q != gid and nx.has_path(dag, gid, q) for q in preds):
                chosen = gid
                break
        if chosen is None:
            chosen = len(groups)
            groups.append((kind, []))
            dag.add_node(chosen)
        groups[chosen][1].append(k)
        where[node] = chosen
        dag.add_edges_from((q, chosen) for q in preds if q != chosen)
    order = list(nx.lexicographical_topological_sort(dag))
    return [groups[g] for g in order]


def _symbol_carriers(graph: Graph, sub_inputs: list[str], nodes: list[Node], outputs: list[str]) -> list[str]:
    """Graph inputs a subgraph needs only for their sizes: symbols it uses that its inputs lack as plain dims."""
    values = {v.name: v for v in graph.all_values()}
    used: set[str] = set()
    for name in sub_inputs + outputs:
        for d in values[name].shape:
            used |= symbols.symbols_in(d)
    for n in nodes:
        for o in n.outputs:
            for d in o.shape:
                used |= symbols.symbols_in(d)
        used |= _attr_symbols(n)
    have = {d for name in sub_inputs for d in values[name].shape if isinstance(d, str) and d.isidentifier()}
    carriers: list[str] = []
    for sym in sorted(used - have):
        src = next((v.name for v in graph.inputs if sym in v.shape), None)
        if src is not None and src not in carriers and src not in sub_inputs:
            carriers.append(src)
            have |= {d for d in values[src].shape if isinstance(d, str) and d.isidentifier()}
    return carriers


def _attr_symbols(n: Node) -> set[str]:
    """Symbols in a node's size attributes (dims, and the sizes a torch_op passes to its op)."""
    kinds = get_op(n.op).attrs
    dims: list = []
    for key, v in n.attrs.items():
        if kinds[key][0] == "dim":
            dims.append(v)
        elif kinds[key][0] == "dims":
            dims += list(v)
        elif n.op == "torch_op" and key in ("args", "kwargs"):
            dims += _torch_op_dims(v)
    return {s for d in dims if isinstance(d, str) for s in symbols.symbols_in(d)}


def _torch_op_dims(tree) -> list:
    if isinstance(tree, dict):
        return [tree["$dim"]] if "$dim" in tree else [d for v in tree.values() for d in _torch_op_dims(v)]
    return [d for v in tree for d in _torch_op_dims(v)] if isinstance(tree, list) else []


def _io(graph: Graph, groups: list[tuple[Any, list[int]]]) -> list[tuple[list[str], list[str]]]:
    """Per group: the non-constant values it reads from outside, and the values read after it."""
    owner = {o.name: g for g, (_, idx) in enumerate(groups) for k in idx for o in graph.nodes[k].outputs}
    readers: dict[str, set] = {}
    for g, (_, idx) in enumerate(groups):
        for k in idx:
            for i in graph.nodes[k].inputs:
                if i is not None and not graph.is_constant(i):
                    readers.setdefault(i.name, set()).add(g)
    graph_out = {v.name for v in graph.outputs}
    out = []
    for g, (_, idx) in enumerate(groups):
        ins: list[str] = []
        for k in idx:
            for i in graph.nodes[k].inputs:
                if i is not None and not graph.is_constant(i) and owner.get(i.name) != g and i.name not in ins:
                    ins.append(i.name)
        outs = [
            o.name
            for k in idx
            for o in graph.nodes[k].outputs
            if o.name in graph_out or readers.get(o.name, set()) - {g}
        ]
        out.append((ins, outs))
    return out


def plan_partitions(
    graph: Graph, backend: str, target: Target | str, min_block_size: int = DEFAULT_MIN_BLOCK_SIZE
) -> PartitionPlan:
    """Which backend runs each node, grouped into partitions: ``backend`` where it can, else the first of
    its ``fallback_chain`` that can (ONNX Runtime, then torch)."""
    tgt = get_target(target)
    chain = [backend] + fallback_chain(backend, tgt)
    refused = {b: _blamed_nodes(graph, get_backend(b).supports(graph, tgt)) for b in chain}
    reasons = dict(refused[backend])

    def next_choice(k: int, after: str) -> str:
        rest = chain[chain.index(after) + 1 :]
        return next((b for b in rest if k not in refused[b]), FALLBACK)

    label = [backend if k not in reasons else next_choice(k, backend) for k in range(len(graph.nodes))]
    while True:  # labels only move down the chain, so this ends
        groups = group_nodes(graph, label)
        small = [g for g in groups if g[0] == backend and len(g[1]) < min_block_size]
        for _, idx in small:
            for k in idx:
                reasons[k] = f"in a partition of {len(idx)} node(s), below min_block_size {min_block_size}"
                label[k] = next_choice(k, backend)
        if small:
            continue
        parts = [Partition(b, idx, ins, outs) for (b, idx), (ins, outs) in zip(groups, _io(graph, groups))]
        for p in parts:
            p.inputs += _symbol_carriers(graph, p.inputs, [graph.nodes[k] for k in p.nodes], p.outputs)
        # a node can be fine in the whole graph and not in its partition (a symbol it cannot read there)
        late = {}
        for p in parts:
            if not p.fallback:
                sub = subgraph(graph, p)
                blamed = _blamed_nodes(sub, get_backend(p.backend).supports(sub, tgt))
                late.update({p.nodes[k]: (p.backend, r) for k, r in blamed.items()})
        if not late:
            return PartitionPlan(backend, min_block_size, parts, reasons)
        for k, (b, r) in late.items():
            reasons.setdefault(k, r)
            refused[b][k] = r
            label[k] = next_choice(k, b)


def subgraph(graph: Graph, part: Partition, name: str | None = None) -> Graph:
    """The partition as a standalone graph: its inputs, the constants it reads, its nodes and outputs."""
    g = Graph(name or f"{graph.name}_p")
    g.meta = {k: v for k, v in graph.meta.items() if k == "symbol_ranges"}
    values = {v.name: v for v in graph.all_values()}
    vmap: dict[Value, Value] = {}

    def mapped(v: Value) -> Value:
        if v not in vmap:
            vmap[v] = Value(v.name, v.type)
            g._names.add(v.name)
            if graph.is_constant(v):
                g.constants[v.name] = graph.constant(v)
                g.const_values[v.name] = vmap[v]
        return vmap[v]

    g.inputs = [mapped(values[n]) for n in part.inputs]
    for k in part.nodes:
        n = graph.nodes[k]
        g.insert_node(
            Node(
                n.op,
                [mapped(i) if i is not None else None for i in n.inputs],
                [mapped(o) for o in n.outputs],
                dict(n.attrs),
                n.name,
                n.source,
            )
        )
    g.outputs = [mapped(values[n]) for n in part.outputs]
    return g


# ---------------------------------------------------------------------------------------
# building and running
# ---------------------------------------------------------------------------------------


def build_partitioned(
    graph: Graph,
    target: Target | str,
    backend: str,
    options: dict | None = None,
    min_block_size: int = DEFAULT_MIN_BLOCK_SIZE,
    plan: PartitionPlan | None = None,
) -> "PartitionedArtifact":
    """Build each partition of ``plan`` (planned here when not given) with its backend."""
    tgt = get_target(target)
    plan = plan or plan_partitions(graph, backend, tgt, min_block_size)
    if tgt.name not in FALLBACK_TARGETS:
        bad = [
            (
                f"{_op_name(graph.nodes[k])} (%{graph.nodes[k].outputs[0].name}): {plan.reasons.get(k, '')}",
                graph.nodes[k].source,
            )
            for k in plan.fallback_nodes
        ]
        raise UnsupportedOpError(
            bad,
            where=f"backend {backend} for target {tgt.name} (falling back to the torch "
            f"executor needs a host target: {', '.join(FALLBACK_TARGETS)})",
        )
    subs = []
    for k, p in enumerate(plan.partitions):
        sub = subgraph(graph, p, f"{graph.name}_p{k}")
        opts = dict(options or {}) if p.backend == backend else {}
        if p.backend == "onnxrt":  # partitions take turns on the cores: ORT's idle workers must not spin
            opts["spinning"] = False
        subs.append(get_backend(p.backend).build(sub, tgt, opts))
    return PartitionedArtifact(graph, tgt, plan, subs)


def _op_name(node: Node) -> str:
    """An opaque torch op by the op it stands for (``torch_op aten.cumsum.default``), else the IR op."""
    return f"torch_op {node.attrs['target']}" if node.op == "torch_op" else node.op


class PartitionedArtifact(Artifact):
    """Runs its partitions' artifacts in plan order, passing values by name (no shared state per call)."""

    thread_safe = True  # each sub-artifact is called through run_artifact, which serializes unsafe ones

    def __init__(self, graph: Graph, target: Target, plan: PartitionPlan, subs: list[Artifact]):
        super().__init__(graph, target)
        self.plan = plan
        self.subs = subs
        others = dict.fromkeys(p.backend for p in plan.partitions if p.backend != plan.backend)
        self.backend = "+".join([plan.backend, *others])

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        arrays = [np.asarray(a) for a in inputs]
        try:
            bind_symbols(self.graph, arrays)
        except ValueError as e:
            raise NnforgeError(f"partitioned model: bad input: {e}") from None
        env = {v.name: a for v, a in zip(self.graph.inputs, arrays)}
        for p, art in zip(self.plan.partitions, self.subs):
            with self._turn(p):
                env.update(zip(p.outputs, run_artifact(art, [env[n] for n in p.inputs])))
        return [env[v.name] if v.name in env else self.graph.constant(v) for v in self.graph.outputs]

    __call__ = run

    def _turn(self, p: Partition):
        """Partitions take turns on the cores: a torch partition on the host runs on one torch thread (see
        torch_exec.one_torch_thread); ONNX Runtime's partitions were built not to spin."""
        if p.fallback and self.target.name == "cpu":
            from .backends.torch_exec import one_torch_thread

            return one_torch_thread()
        return contextlib.nullcontext()

    def manifest_fields(self) -> dict:
        return {"partitions": self.plan.to_json()}

    def save_files(self, directory: Path) -> list[str]:
        directory = Path(directory)
        names: list[str] = []
        for k, (p, art) in enumerate(zip(self.plan.partitions, self.subs)):
            if p.fallback:
                continue  # torch partitions run from the bundle's IR
            with tempfile.TemporaryDirectory(prefix="nnforge-part-") as tmp:
                for f in art.save_files(Path(tmp)):
                    p.files[f] = f"p{k}_{f}"
                    shutil.move(str(Path(tmp) / f), str(directory / p.files[f]))
                    names.append(p.files[f])
        return names

    @classmethod
    def load_files(cls, directory: Path, graph: Graph, target: Target, manifest: dict) -> "PartitionedArtifact":
        plan = PartitionPlan.from_json(manifest.get("partitions"), graph)
        target = get_target(target)
        subs = []
        for k, p in enumerate(plan.partitions):
            sub = subgraph(graph, p, f"{graph.name}_p{k}")
            try:
                art_cls = artifact_class(p.backend)
            except NnforgeError as e:
                raise BundleError(f"partition p{k}: {e}") from None
            if p.fallback:
                try:
                    subs.append(art_cls.load_files(Path(directory), sub, target, manifest))
                except BundleError:
                    raise
                except NnforgeError as e:  # e.g. an opaque op that does not resolve here
                    raise BundleError(f"partition p{k}: {e}") from None
                continue
            listed = manifest.get("files", {})
            if any(stored not in listed for stored in p.files.values()):
                raise BundleError(f"partition p{k}: its files {sorted(p.files.values())} are not all in the manifest")
            tmp = tempfile.mkdtemp(prefix="nnforge-part-")  # the sub-artifact sees its files under their own names
            for f, stored in p.files.items():
                shutil.copyfile(Path(directory) / stored, Path(tmp) / Path(f).name)
            sub_manifest = manifest
            if p.backend == "onnxrt":  # as built: an ORT partition's idle workers do not spin
                opts = manifest.get("options") if p.backend == plan.backend else {}
                sub_manifest = {**manifest, "options": {**(opts or {}), "spinning": False}}
            art = art_cls.load_files(Path(tmp), sub, target, sub_manifest)
            weakref.finalize(art, shutil.rmtree, tmp, True)
            subs.append(art)
        return cls(graph, target, plan, subs)
