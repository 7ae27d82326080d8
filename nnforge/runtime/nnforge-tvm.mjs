// nnforge TVM wasm runtime: runs a TVM-built nnforge wasm bundle (model.wasm + tvm_program.json +
// tvm_params.bin) in a web page or in Node. No dependencies.
//
//   import { loadTvmBundle } from "./nnforge-tvm.mjs";
//   const model = await loadTvmBundle("./bundle/");
//   const [y] = await model.run([new Float32Array(16)]);
//
// model.wasm holds the model's kernels (TVM's packed calling convention: fn(self, args, nargs, result)
// with DLTensor arguments); tvm_program.json says which kernel runs on which tensors, in order. This
// file allocates the tensors in the module's own memory, provides the few functions the kernels import
// (workspace memory, a serial parallel-for, error reporting, libm) and walks the program.

const DL = {  // dtype -> [DLPack type code, bits, typed array]
  float32: [2, 32, Float32Array], float64: [2, 64, Float64Array], int64: [0, 64, BigInt64Array],
  int32: [0, 32, Int32Array], int16: [0, 16, Int16Array], int8: [0, 8, Int8Array],
  uint8: [1, 8, Uint8Array], bool: [6, 8, Uint8Array],
};
const K_DLTENSOR_PTR = 7;  // TVMFFITypeIndex::kTVMFFIDLTensorPtr
const K_DL_CPU = 1;

/** Fetch the three files from ``baseUrl`` (browser, or Node 18+ with http URLs). */
export async function loadTvmBundle(baseUrl, spec = null) {
  const base = baseUrl.endsWith("/") ? baseUrl : baseUrl + "/";
  const get = async (name) => {
    const r = await fetch(base + name);
    if (!r.ok) throw new Error(`nnforge: cannot fetch ${base + name}: HTTP ${r.status}`);
    return r;
  };
  const [wasm, program, params] = await Promise.all([
    get("model.wasm").then((r) => r.arrayBuffer()), get("tvm_program.json").then((r) => r.json()),
    get("tvm_params.bin").then((r) => r.arrayBuffer())]);
  return loadTvmModel(new Uint8Array(wasm), program, new Uint8Array(params), spec);
}

function erf(x) {  // Abramowitz-Stegun 7.1.26: |error| < 1.5e-7
  const s = Math.sign(x), a = Math.abs(x), t = 1 / (1 + 0.3275911 * a);
  const y = 1 - ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * Math.exp(-a * a);
  return s * y;
}

const LIBM = {
  exp: Math.exp, log: Math.log, sqrt: Math.sqrt, tanh: Math.tanh, pow: Math.pow, fabs: Math.abs, sin: Math.sin,
  cos: Math.cos, tan: Math.tan, floor: Math.floor, ceil: Math.ceil, trunc: Math.trunc, round: Math.round,
  nearbyint: (x) => { const r = Math.round(x); return (Math.abs(x % 1) === 0.5 && r % 2 !== 0) ? r - 1 : r; },
  fmod: (a, b) => a % b, exp2: (x) => 2 ** x, log2: Math.log2, log10: Math.log10, log1p: Math.log1p,
  expm1: Math.expm1, erf, atan: Math.atan, atan2: Math.atan2, asin: Math.asin, acos: Math.acos,
  sinh: Math.sinh, cosh: Math.cosh, fmin: Math.min, fmax: Math.max,
};

/** Instantiate ``wasm`` (bytes) with ``program`` (parsed tvm_program.json), ``params`` (bytes) and
 * optionally ``spec`` (manifest.json: input and output names). */
export async function loadTvmModel(wasm, program, params, spec = null) {
  const state = { lastError: "", rt: null };
  const env = {
    TVMFFIErrorSetRaisedFromCStr: (kind, msg) => { state.lastError = `${state.rt.str(kind)}: ${state.rt.str(msg)}`; },
    TVMFFIErrorSetRaisedFromCStrParts: (kind, parts, n) => {
      const p = new Uint32Array(state.rt.memory.buffer, parts, n);
      state.lastError = `${state.rt.str(kind)}: ${Array.from(p, (q) => state.rt.str(q)).join("")}`;
    },
    TVMBackendAllocWorkspace: (devType, devId, nbytes) => state.rt.alloc(Number(nbytes)),
    TVMBackendFreeWorkspace: () => 0,  // workspace lives until the end of the run
    TVMBackendParallelLaunch: (flambda, cdata, numTask) => {
      const penv = state.rt.alloc(8);  // TVMParallelGroupEnv { sync_handle, num_task }: one task, serially
      new Int32Array(state.rt.memory.buffer, penv, 2).set([0, 1]);
      return state.rt.table.get(flambda)(0, penv, cdata);
    },
    TVMBackendParallelBarrier: () => 0,
    TVMFFIEnvModRegisterSystemLibSymbol: () => 0,  // kernels are found by their export names instead
  };
  const module = await WebAssembly.compile(wasm);
  for (const imp of WebAssembly.Module.imports(module)) {
    if (imp.module !== "env" || imp.name in env) continue;
    const base = imp.name.endsWith("f") && LIBM[imp.name.slice(0, -1)] ? imp.name.slice(0, -1) : imp.name;
    if (!LIBM[base]) throw new Error(`nnforge: model.wasm imports ${imp.module}.${imp.name}, which this runtime does not provide`);
    env[imp.name] = LIBM[base];
  }
  const instance = await WebAssembly.instantiate(module, { env });
  state.rt = new Runtime(instance, program, params);
  return new TvmModel(state.rt, program, state, spec);
}

class Runtime {
  constructor(instance, program, params) {
    this.exports = instance.exports;
    this.memory = instance.exports.memory;
    this.table = instance.exports.__indirect_function_table;
    this.top = Number(instance.exports.__heap_base.value);
    this.weights = {};
    for (const w of program.weights) {  // copied once; the runs allocate above them
      const t = this.tensor(w.shape, w.dtype);
      new Uint8Array(this.memory.buffer, t.ptr, w.nbytes).set(params.subarray(w.offset, w.offset + w.nbytes));
      this.weights[w.id] = t;
    }
    this.base = this.top;
  }

  alloc(nbytes, align = 64) {
    const ptr = Math.ceil(this.top / align) * align;
    this.top = ptr + Math.max(nbytes, 1);
    const need = this.top - this.memory.buffer.byteLength;
    if (need > 0) this.memory.grow(Math.ceil(need / 65536));
    return ptr;
  }

  str(ptr) {
    const bytes = new Uint8Array(this.memory.buffer, ptr);
    return new TextDecoder().decode(bytes.subarray(0, bytes.indexOf(0)));
  }

  tensor(shape, dtype) {
    const [, bits] = DL[dtype];
    const numel = shape.reduce((a, b) => a * b, 1);
    return { ptr: this.alloc(numel * bits / 8), shape, dtype, numel };
  }

  dltensor(t) {  // DLTensor on wasm32: data@0 device@4 ndim@12 dtype@16 shape@20 strides@24 byte_offset@32
    const p = this.alloc(40 + 8 * t.shape.length, 8);
    const v = new DataView(this.memory.buffer);
    const [code, bits] = DL[t.dtype];
    v.setUint32(p, t.ptr, true);
    v.setInt32(p + 4, K_DL_CPU, true);
    v.setInt32(p + 8, 0, true);
    v.setInt32(p + 12, t.shape.length, true);
    v.setUint8(p + 16, code);
    v.setUint8(p + 17, bits);
    v.setUint16(p + 18, 1, true);
    v.setUint32(p + 20, p + 40, true);
    v.setUint32(p + 24, 0, true);
    v.setBigUint64(p + 32, 0n, true);
    t.shape.forEach((d, i) => v.setBigInt64(p + 40 + 8 * i, BigInt(d), true));
    return p;
  }

  call(kernel, tensors, state) {
    const fn = this.exports[`__tvm_ffi_${kernel}`];
    if (!fn) throw new Error(`nnforge: model.wasm has no kernel ${kernel}`);
    const args = this.alloc(16 * tensors.length, 16);
    const ptrs = tensors.map((t) => this.dltensor(t));
    const v = new DataView(this.memory.buffer);
    ptrs.forEach((p, i) => {
      v.setInt32(args + 16 * i, K_DLTENSOR_PTR, true);
      v.setInt32(args + 16 * i + 4, 0, true);
      v.setBigUint64(args + 16 * i + 8, BigInt(p), true);
    });
    const result = this.alloc(16, 16);
    if (fn(0, args, tensors.length, result) !== 0) {
      throw new Error(`nnforge: kernel ${kernel} failed: ${state.lastError || "(no message)"}`);
    }
  }
}

export class TvmModel {
  constructor(rt, program, state, spec) {
    this.rt = rt;
    this.program = program;
    this.state = state;
    this.spec = spec || { inputs: program.inputs, outputs: program.outputs.map((id) => ({ name: id })) };
  }

  /** Run the model; ``inputs`` are typed arrays (or { data, dims }) in the program's input order. */
  async run(inputs) {
    const { rt, program } = this;
    if (inputs.length !== program.inputs.length) {
      throw new Error(`nnforge: the model takes ${program.inputs.length} inputs, got ${inputs.length}`);
    }
    rt.top = rt.base;
    const env = { ...rt.weights };
    program.inputs.forEach((spec, i) => {
      const x = inputs[i];
      const data = ArrayBuffer.isView(x) ? x : x.data;
      const dims = ArrayBuffer.isView(x) ? spec.shape : x.dims;
      if (dims.length !== spec.shape.length || dims.some((d, k) => d !== spec.shape[k])) {
        throw new Error(`nnforge: input ${i}: shape [${dims}] does not match [${spec.shape}]`);
      }
      const Ctor = DL[spec.dtype][2];
      if (!(data instanceof Ctor)) throw new Error(`nnforge: input ${i}: expected a ${Ctor.name} for ${spec.dtype}`);
      const t = rt.tensor(spec.shape, spec.dtype);
      if (data.length !== t.numel) throw new Error(`nnforge: input ${i}: ${data.length} elements, needs ${t.numel}`);
      new Ctor(rt.memory.buffer, t.ptr, t.numel).set(data);
      env[spec.id] = t;
    });
    for (const step of program.steps) {
      if (step.alias) {
        env[step.alias] = { ...env[step.src], shape: step.shape };
        continue;
      }
      const outs = step.outs.map((o) => { env[o.id] = rt.tensor(o.shape, o.dtype); return env[o.id]; });
      rt.call(step.kernel, [...step.args.map((a) => env[a]), ...outs], this.state);
    }
    return program.outputs.map((id, i) => {
      const t = env[id];
      const Ctor = DL[t.dtype][2];
      return { name: this.spec.outputs?.[i]?.name || id, dims: t.shape, dtype: t.dtype, data: new Ctor(rt.memory.buffer.slice(t.ptr, t.ptr + t.numel * Ctor.BYTES_PER_ELEMENT)) };
    });
  }
}
