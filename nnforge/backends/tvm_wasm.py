"""TVM for target wasm: the model's kernels compiled to one WebAssembly module, run by a small JS runtime.

TVM's own web runtime (the Relax VM built for wasm) cannot be built from the PyPI wheel, so the bundle
does without it. At build time:

- the weight transforms that LiftTransformParams separates out run once, here, on the host CPU: the
  bundle ships their results (``tvm_params.bin``), so the device never runs them;
- ``main`` goes through the same pipeline as for the CPU (legalize, fuse, nnforge's default schedules)
  for ``wasm32`` with SIMD128; every kernel it calls is compiled by TVM's LLVM to a wasm object file and
  linked by ``wasm-ld`` into ``model.wasm``: plain functions with TVM's packed calling convention,
  importing only a few runtime hooks (workspace, parallel launch, errors) and libm, which the JS side
  provides;
- what ``main`` does between kernels is written as a list of steps (``tvm_program.json``): call a
  kernel on named tensors, alias a tensor with a new shape. ``runtime/nnforge-tvm.mjs`` allocates the
  tensors in the module's memory and walks the steps.

Shapes must be static (the steps hold concrete sizes); a model with symbolic sizes is refused with a
message naming them.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from ..errors import NnforgeError
from ..ir.graph import Graph
from ..targets import Target
from . import tvm_log
from .base import Artifact

WASM_TARGET = {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm", "mattr": ["+simd128"]}
MODULE_NAME, PROGRAM_NAME, PARAMS_NAME = "model.wasm", "tvm_program.json", "tvm_params.bin"
PROGRAM_FORMAT = 1
DTYPES = ("float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def wasm_target() -> "tvm.target.Target":
    return tvm.target.Target(WASM_TARGET)


def _wasm_ld() -> str:
    from ..runtime.edge import require

    return require("wasm-ld")


def _static_shape(value, what: str) -> list[int]:
    shape = value.ty.shape if hasattr(value, "ty") else value.shape
    dims = []
    for d in shape.values if hasattr(shape, "values") else shape:
        if not isinstance(d, tvm.tirx.IntImm):
            raise NnforgeError(
                f"TVM wasm bundles need static shapes: {what} has size {d}; export with fixed sizes "
                "(no dynamic_shapes) or use the onnxrt backend for wasm"
            )
        dims.append(int(d))
    return dims


def _dtype(ty) -> str:
    dtype = str(ty.dtype)
    if dtype not in DTYPES:
        raise NnforgeError(f"TVM wasm bundles take tensors of {', '.join(DTYPES)}, not {dtype}")
    return dtype


class _Program:
    """Walks the scheduled Relax ``main`` into steps over named tensors; collects kernels and constants."""

    def __init__(self, mod: "tvm.IRModule"):
        self.mod, self.steps, self.kernels, self.constants, self.names = mod, [], {}, [], {}
        self.tuple_fields: dict[str, list[str]] = {}  # a tuple's name -> its fields' names

    def name_of(self, expr) -> str:
        if isinstance(expr, tvm.ir.expr.Constant):
            name = f"const{len(self.constants)}"
            self.constants.append((name, expr.value.numpy()))
            return name
        if expr not in self.names:
            raise NnforgeError(f"TVM wasm: {type(expr).__name__} {expr} is not a tensor the program knows")
        return self.names[expr]

    def tensor(self, var, name: str) -> dict:
        return {"id": name, "shape": _static_shape(var, name), "dtype": _dtype(var.ty)}

    def walk(self, func) -> dict:
        num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(func.params)
        params = []
        for i, p in enumerate(func.params):
            name = f"in{i}" if i < num_input else f"param{i - num_input}"
            self.names[p] = name
            params.append(self.tensor(p, name))
        body = func.body
        for block in body.blocks:
            for binding in block.bindings:
                self.bind(binding.var, binding.value)
        result = body.body
        names = [self.name_of(f) for f in result.fields] if isinstance(result, relax.Tuple) else [self.name_of(result)]
        outs = [field for n in names for field in self.tuple_fields.get(n, [n])]
        return {
            "format": PROGRAM_FORMAT,
            "inputs": params[:num_input],
            "params": params[num_input:],
            "steps": self.steps,
            "outputs": outs,
        }

    def bind(self, var, value) -> None:
        name = f"t{len(self.names)}"
        if isinstance(value, relax.Call) and value.op.name == "relax.call_tir":
            kernel = value.args[0]
            self.kernels[kernel.name_hint] = self.mod[kernel]
            args = [self.name_of(a) for a in value.args[1].fields]
            tys = var.ty.fields if isinstance(var.ty, relax.TupleType) else [var.ty]
            outs = []
            for k, ty in enumerate(tys):
                out = {
                    "id": f"{name}_{k}" if len(tys) > 1 else name,
                    "shape": _static_shape(ty, kernel.name_hint),
                    "dtype": _dtype(ty),
                }
                outs.append(out)
            if len(value.args) > 2:
                raise NnforgeError(f"TVM wasm: kernel {kernel.name_hint} takes symbolic sizes; shapes must be static")
            self.steps.append({"kernel": kernel.name_hint, "args": args, "outs": outs})
            self.names[var] = name
            if len(tys) > 1:
                self.tuple_fields[name] = [o["id"] for o in outs]
        elif isinstance(value, relax.Call) and value.op.name in ("relax.reshape", "relax.memory.view"):
            self.steps.append({"alias": name, "src": self.name_of(value.args[0]), "shape": _static_shape(var, name)})
            self.names[var] = name
        elif isinstance(value, relax.TupleGetItem):
            tup = self.name_of(value.tuple_value)
            self.names[var] = self.tuple_fields[tup][value.index]
        elif isinstance(value, relax.Tuple):
            self.names[var] = name
            self.tuple_fields[name] = [self.name_of(f) for f in value.fields]
        elif isinstance(value, (relax.Var, tvm.ir.expr.Constant)):
            self.names[var] = self.name_of(value)
        else:
            what = (
                value.op.name if isinstance(value, relax.Call) and hasattr(value.op, "name") else type(value).__name__
            )
            raise NnforgeError(f"TVM wasm: main computes {what} outside a kernel, which the wasm runtime cannot run")


def _link(kernels: dict, target, work: Path) -> bytes:
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in kernels.items()})
    mod = mod.with_attr("system_lib_prefix", "")
    with tvm_log.quiet():
        lib = tvm.tirx.build(mod, target=target)
    obj = work / "kernels.o"
    lib.write_to_file(str(obj))
    out = work / MODULE_NAME
    cmd = [
        _wasm_ld(),
        "--no-entry",
        "--export-dynamic",
        "--export=__heap_base",
        "--export-table",
        "--allow-undefined",
        "--growable-table",
        "-o",
        str(out),
        str(obj),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NnforgeError(f"wasm-ld could not link the TVM kernels: {proc.stderr.strip()[-500:]}")
    return out.read_bytes()


def _transformed_params(lowered, mod, graph: Graph) -> list[np.ndarray]:
    """Run main_transform_params on the host CPU: the bundle ships the weights as main takes them."""
    from ..targets import get_target
    from .tvm import make_pipeline, tvm_target

    consts = [np.require(graph.constants[name], requirements="C") for name in lowered.param_names]
    if "main_transform_params" not in [gv.name_hint for gv in mod.functions]:
        return consts
    host = tvm_target(get_target("cpu"), {})
    fn = mod["main_transform_params"].with_attr("global_symbol", "main")
    ex = tvm.compile(tvm.IRModule({"main": fn}), target=host, relax_pipeline=make_pipeline(host))
    vm = relax.VirtualMachine(ex, tvm.cpu(0))
    return [a.numpy() for a in vm["main"]([tvm.runtime.tensor(c) for c in consts])]


def build(graph: Graph, target: Target, options: dict, lowered, stage) -> "TVMWasmArtifact":
    from .tvm import pipeline_passes

    wt = wasm_target()
    mod = relax.transform.LiftTransformParams()(lowered.mod) if lowered.param_names else lowered.mod
    stage("weights: running the lifted transforms on the host")
    params = _transformed_params(lowered, mod, graph)
    stage("fusing and scheduling for wasm32")
    with wt, tvm_log.quiet():  # LLVM's wasm32 target logs its vector width each time it is made
        sched = tvm.transform.Sequential(
            pipeline_passes(
                wt, options.get("schedule", "default"), options.get("fast_math", True), stop_after_schedule=True
            )
        )(mod)
    prog = _Program(sched)
    program = prog.walk(sched["main"])
    if len(params) != len(program["params"]):
        raise NnforgeError(f"TVM wasm: main takes {len(program['params'])} weights, the transforms gave {len(params)}")
    for spec, arr in zip(program["params"], params):
        if list(arr.shape) != spec["shape"] or str(arr.dtype) != spec["dtype"]:
            raise NnforgeError(
                f"TVM wasm: weight {spec['id']} is {arr.dtype}{list(arr.shape)}, main wants "
                f"{spec['dtype']}{spec['shape']}"
            )
    arrays = list(zip([p["id"] for p in program["params"]], params)) + prog.constants
    blob, index, offset = bytearray(), [], 0
    for name, arr in arrays:
        data = np.require(arr, requirements="C").astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        index.append(
            {"id": name, "dtype": str(arr.dtype), "shape": list(arr.shape), "offset": offset, "nbytes": len(data)}
        )
        blob += data + b"\0" * (-len(data) % 64)
        offset = len(blob)
    program["weights"] = index
    stage(f"compiling {len(prog.kernels)} kernels to wasm32 and linking")
    with tempfile.TemporaryDirectory(prefix="nnforge-wasm-") as work:
        module = _link(prog.kernels, wt, Path(work))
    return TVMWasmArtifact(graph, target, module, program, bytes(blob))


class TVMWasmArtifact(Artifact):
    """model.wasm + tvm_program.json + tvm_params.bin; runs in Node (here: through the bundle's runner)."""

    backend = "tvm"

    def __init__(self, graph: Graph, target: Target, module: bytes, program: dict, params: bytes):
        super().__init__(graph, target)
        self.module, self.program, self.params = module, program, params

    def run(self, inputs):
        return self.run_emulated(inputs)

    __call__ = run

    def save_files(self, directory: Path) -> list[str]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODULE_NAME).write_bytes(self.module)
        (directory / PROGRAM_NAME).write_text(json.dumps(self.program))
        (directory / PARAMS_NAME).write_bytes(self.params)
        return [MODULE_NAME, PROGRAM_NAME, PARAMS_NAME]

    @classmethod
    def load_files(cls, directory: Path, graph: Graph, target: Target, manifest: dict) -> "TVMWasmArtifact":
        directory = Path(directory)
        for name in (MODULE_NAME, PROGRAM_NAME, PARAMS_NAME):
            if not (directory / name).is_file():
                raise NnforgeError(f"TVM wasm bundle {directory} lacks {name}")
        try:
            program = json.loads((directory / PROGRAM_NAME).read_text())
        except (OSError, ValueError) as e:
            raise NnforgeError(f"TVM wasm bundle {directory}: {PROGRAM_NAME} is not valid JSON ({e})") from None
        if not isinstance(program, dict) or program.get("format") != PROGRAM_FORMAT:
            raise NnforgeError(f"TVM wasm bundle {directory}: {PROGRAM_NAME} is not format {PROGRAM_FORMAT}")
        art = cls(
            graph, target, (directory / MODULE_NAME).read_bytes(), program, (directory / PARAMS_NAME).read_bytes()
        )
        art.bundle_dir = directory
        return art
