"""The TVM backend: IR -> Relax (BlockBuilder) -> ``tvm.compile`` -> Relax VM.

Targets:
  cpu   llvm for this machine's CPU (``mcpu`` = the host CPU LLVM reports), run with the Relax VM
  cuda  CUDA (this machine's GPU arch, else sm_80, unless ``options["arch"]``) with dlight GPU schedules; builds without a GPU,
        the CUDA source is kept and saved as ``model.cu`` beside the library
  arm   aarch64 Linux with NEON, cross-compiled and linked with ``aarch64-linux-gnu-g++``; ``run``
        runs the saved bundle under qemu-aarch64 (``Artifact.run_emulated``, nnforge.runtime.edge)

Weights are parameters of ``main`` (after the graph inputs), not constants in the library: the
library stays small, and weight-only work (the ``linear`` weight transpose, batch-norm folding) is
lifted into ``main_transform_params``, run once when the artifact is made or loaded. Pass
``options={"embed_params": True}`` to bake them into the library instead.

Build options (``options=`` of ``build``; unknown keys are refused):
  progress      callable taking a stage string, or True for a rich status line on stderr
  embed_params  bake the weights into the library (default False: weights stay parameters)
  schedule      CPU schedules: "default" (nnforge's rules, tvm_schedule.py), "dlight" (TVM's dlight
                CPU rules only) or "none" (naive loops); for comparisons
  fast_math     vectorisable polynomial exp/erf/tanh on CPUs (default True; ~1e-7 relative error)
  arch          CUDA architecture (default: this machine's GPU, else "sm_80")
  mcpu          LLVM CPU for the cpu target (default: the host's, e.g. znver5)
  tune          MetaSchedule trials for the cpu target's kernels (default 0: no tuning); see tvm_tune.py
  tune_db       the tuning database directory (default $NNFORGE_TUNE_DB or ~/.cache/nnforge/tuning)
  tune_rpc      HOST:PORT of a TVM RPC tracker: measure the trials on its devices (tvm_rpc.py), also for arm
  tune_key      the key those devices registered under

CPU threads: TVM's pool defaults to half the logical CPUs on x86 (it assumes hyper-threading), one
thread on a 2-core machine; this module sets TVM_NUM_THREADS to every CPU the process may use unless
it is already set. TVM reads it once, when its pool starts.

The lowering table lives in ``tvm_lower.py``, the CPU schedule rules in ``tvm_schedule.py``.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import tvm  # noqa: E402  (absolute import: the apache-tvm package, not this module)
from tvm import relax  # noqa: E402

from ..errors import NnforgeError, UnsupportedOpError
from ..ir import Graph
from ..targets import Target, get_target
from . import tvm_log, tvm_lower, tvm_schedule  # noqa: E402
from .base import Backend, Unsupported, register_backend
from .tvm_artifact import (  # noqa: F401  # noqa: F401  (sets TVM_NUM_THREADS before TVM loads)
    CUDA_SOURCE_NAME,
    FORMAT_VERSION,
    LIB_NAME,
    META_NAME,
    TUNING_FILES,
    TVMArtifact,
    first_line,
    num_threads,
)

OPTIONS = (
    "progress",
    "embed_params",
    "schedule",
    "fast_math",
    "arch",
    "mcpu",
    "tune",
    "tune_db",
    "tune_rpc",
    "tune_key",
)
SCHEDULES = ("default", "dlight", "none")


# ---------------------------------------------------------------------------------------------
# targets and pipelines
# ---------------------------------------------------------------------------------------------


def tvm_target(target: Target, options: dict | None = None) -> "tvm.target.Target":
    """The TVM target for an nnforge target (dicts: TVM 0.27 rejects flag strings)."""
    options = options or {}
    if target.name == "cpu":
        spec = {"kind": "llvm", "mcpu": options.get("mcpu") or tvm.target.codegen.llvm_get_system_cpu()}
    elif target.name == "cuda":
        spec = {"kind": "cuda", "arch": options.get("arch") or _cuda_arch()}
    elif target.name == "arm":
        spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    elif target.name == "wasm":
        from .tvm_wasm import WASM_TARGET as spec
    else:
        raise NnforgeError(f"the TVM backend cannot build for target {target.name!r}; it takes cpu, cuda, arm, wasm")
    return tvm.target.Target(spec)


def _cuda_arch() -> str:
    """This machine's GPU architecture when it has one (a cubin for another arch would not load), else sm_80."""
    dev = tvm.cuda(0)
    return "sm_" + dev.compute_version.replace(".", "") if dev.exist else "sm_80"


def pipeline_passes(
    target: "tvm.target.Target",
    schedule: str = "default",
    fast_math: bool = True,
    stop_after_schedule: bool = False,
    tuned: bool = False,
) -> list:
    """The Relax pipeline as a plain list of passes (printable, editable).

    llvm targets: fast math (vectorisable exp/erf/tanh), TVM's legalize + fusion, then nnforge's
    default (untuned) CPU schedules, then TVM's lowering to the VM.
    cuda: TVM's CUDA pipeline (legalize, fusion, dlight's GPU rules, CUDA-graph rewrite), with each
    dlight rule guarded.
    ``tuned``: apply the current MetaSchedule database first (the default rules skip what it scheduled).
    """
    from tvm.relax.backend.cpu_generic import pipeline as cpu_stages

    if target.kind.name == "llvm":
        stages = cpu_stages
        sched = tvm_schedule.schedule_passes(target, schedule)
    else:
        from tvm.relax.backend.cuda import pipeline as stages

        sched = tvm_schedule.gpu_schedule_passes(target)  # dlight's GPU rules, guarded
        fast_math = False  # GPUs have fast exp/erf/tanh instructions
    if tuned:
        with target:  # the pass takes the target when it is made
            sched = [relax.transform.MetaScheduleApplyDatabase()] + sched
    # legalize + fusion (TVM's CUDA legalize stage is the same five passes followed by dlight)
    passes = (
        ([relax.transform.FastMathTransform()] if fast_math else [])
        + stages.library_dispatch_passes(target)
        + cpu_stages.legalize_passes(target)
        + sched
    )
    if stop_after_schedule:
        return passes
    return passes + stages.dataflow_lower_passes(target) + stages.finalize_passes(target)


def make_pipeline(
    target: "tvm.target.Target", schedule: str = "default", fast_math: bool = True, tuned: bool = False
) -> "tvm.transform.Pass":
    passes = pipeline_passes(target, schedule, fast_math, tuned=tuned)

    @tvm.transform.module_pass(opt_level=0, name="NnforgePipeline")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------


@contextmanager
def _progress(option, what: str):
    """Yields a ``stage(str)`` callable: the user's callback, a rich status line, or nothing."""
    if callable(option):
        yield option
        return
    if option:
        from rich.console import Console

        console = Console(stderr=True)
        with console.status(f"[tvm] {what}") as status:
            yield lambda stage: status.update(f"[tvm] {what}: {stage}")
        return
    yield lambda stage: None


def _cuda_source(lib) -> str | None:
    def walk(m):
        if m.kind == "cuda":
            return m.inspect_source("cuda")
        for i in m.imports:
            s = walk(i)
            if s is not None:
                return s
        return None

    return walk(lib.mod if hasattr(lib, "mod") else lib)


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------


class TVMBackend(Backend):
    name = "tvm"
    artifact_class = TVMArtifact

    def supports(self, graph: Graph, target: Target | str = "cpu") -> list[Unsupported]:
        target = get_target(target)
        out = []
        for node in graph.nodes:
            reason = tvm_lower.node_problem(node, target.name)
            if reason:
                out.append(
                    Unsupported(node.op, node.outputs[0].name if node.outputs else node.name, node.source, reason)
                )
        for v in list(graph.inputs) + list(graph.outputs):
            if v.dtype in tvm_lower.UNSUPPORTED_DTYPES:
                out.append(Unsupported("<io>", v.name, "", tvm_lower.UNSUPPORTED_DTYPES[v.dtype]))
        return out

    def lower(
        self, graph: Graph, options: dict | None = None, target: "tvm.target.Target | None" = None
    ) -> "tvm_lower.Lowered":
        """The Relax module for ``graph`` before any pipeline ran (for inspection and tests)."""
        with tvm_log.quiet():  # asking LLVM about wasm32 logs its vector width
            return tvm_lower.lower_graph(graph, embed_params=bool((options or {}).get("embed_params")), target=target)

    def kernels(self, graph: Graph, target: Target | str = "cpu", options: dict | None = None) -> "tvm.IRModule":
        """The module after fusion and scheduling (TIR kernels + Relax main): to read or time kernels."""
        options = _check_options(options)
        ttarget = tvm_target(get_target(target), options)
        lowered = self.lower(graph, options, ttarget)
        mod = relax.transform.LiftTransformParams()(lowered.mod) if lowered.param_names else lowered.mod
        with ttarget:
            return tvm.transform.Sequential(
                pipeline_passes(ttarget, options.get("schedule", "default"), options.get("fast_math", True), True)
            )(mod)

    def build(self, graph: Graph, target: Target | str = "cpu", options: dict | None = None) -> TVMArtifact:
        target = get_target(target)
        options = _check_options(options)
        problems = self.supports(graph, target)
        if problems:
            raise UnsupportedOpError(
                [(f"{p.op} (%{p.node}): {p.reason}", p.source) for p in problems],
                where=f"the TVM backend for {target.name}",
            )
        ttarget = tvm_target(target, options)
        trials = int(options.get("tune") or 0)
        farm = None
        if trials:
            from . import tvm_rpc, tvm_tune  # MetaSchedule: imported only when tuning

            farm = tvm_rpc.farm_from_options(options)
            if target.name not in (("cpu", "arm") if farm else ("cpu",)):
                raise NnforgeError(
                    f"tuning (tune={trials}) measures kernels on this machine (target cpu) or on a farm's devices "
                    f"(tune_rpc, target cpu or arm), not target {target.name!r}"
                    + ("" if farm else ": give tune_rpc and tune_key")
                )
            tvm_tune.require_packages()
            ttarget = tvm_tune.tune_target(ttarget, farm)
        if target.name == "wasm":  # kernels in a wasm module, run by nnforge's JS runtime
            from . import tvm_wasm

            with _progress(options.get("progress"), f"building {graph.name} for wasm") as stage:
                return tvm_wasm.build(graph, target, options, self.lower(graph, options, ttarget), stage)
        schedule, fast_math = options.get("schedule", "default"), options.get("fast_math", True)
        tuning, tuning_files, database = None, {}, None
        with _progress(options.get("progress"), f"building {graph.name} for {target.name}") as stage:
            t0 = time.perf_counter()
            stage("lowering to Relax")
            lowered = self.lower(graph, options, ttarget)
            mod = lowered.mod
            transform = bool(lowered.param_names)
            if transform:
                stage("lifting weight transforms")
                mod = relax.transform.LiftTransformParams()(mod)
            if trials:
                stage("fusing kernels for tuning")
                with ttarget:
                    fused = tvm.transform.Sequential(pipeline_passes(ttarget, "none", fast_math, True))(mod)
                db_dir = tvm_tune.db_dir(options.get("tune_db"), ttarget)
                full = tvm_tune.open_db(db_dir)
                tuning = tvm_tune.tune(fused, ttarget, trials, full, stage, farm)
                tuning.update(tvm_tune.vet(fused, ttarget, full, db_dir, stage, farm=farm))  # tuned vs default schedule
                with tempfile.TemporaryDirectory(prefix="nnforge-tunedb-") as tmp:  # this model's kept records
                    tvm_tune.export_records(fused, ttarget, full, tmp, tvm_tune.load_verdicts(db_dir))
                    tuning_files = {p.name: p.read_text() for p in Path(tmp).iterdir() if p.suffix == ".json"}
                    database = tvm_tune.open_db(tmp)  # applied: only records faster than the default schedule
            stage("compiling (legalize, fuse, schedule, codegen)")
            try:
                with database if database is not None else contextlib.nullcontext(), tvm_log.quiet():
                    ex = tvm.compile(
                        mod,
                        target=ttarget,
                        relax_pipeline=make_pipeline(ttarget, schedule, fast_math, tuned=database is not None),
                    )
            except Exception as e:
                raise NnforgeError(f"TVM failed to build {graph.name!r} for {target.name}: {first_line(e)}") from e
            stage(f"done in {time.perf_counter() - t0:.1f}s")
        meta = {
            "format": FORMAT_VERSION,
            "target": target.name,
            "tvm_target": str(ttarget),
            "tvm_version": tvm.__version__,
            "func": "main",
            "inputs": lowered.input_names,
            "params": lowered.param_names,
            "transform_params": transform,
            "symbols": lowered.symbols,
            "schedule": schedule,
        }
        if tuning is not None:
            # trials run now, kernels tuned now, kernels whose records came from the database, records applied
            # (kept) and left for the default schedule because they were not faster (dropped)
            meta["tuning"] = tuning
        cuda_src = _cuda_source(ex) if target.name == "cuda" else None
        return TVMArtifact(graph, target, ex, meta, cuda_src, tuning_files)


def _check_options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise NnforgeError(f"unknown TVM backend option(s) {unknown}; it takes {list(OPTIONS)}")
    if options.get("schedule", "default") not in SCHEDULES:
        raise NnforgeError(f"TVM backend option schedule={options['schedule']!r}; choose from {list(SCHEDULES)}")
    tune = options.get("tune") or 0
    if not isinstance(tune, int) or isinstance(tune, bool) or tune < 0:
        raise NnforgeError(f"TVM backend option tune={tune!r}: give a number of trials (an int >= 0)")
    return options


BACKEND = register_backend(TVMBackend())


def build(graph: Graph, target: Target | str = "cpu", options: dict | None = None) -> TVMArtifact:
    return BACKEND.build(graph, target, options)


def supports(graph: Graph, target: Target | str = "cpu") -> list[Unsupported]:
    return BACKEND.supports(graph, target)
