// nnforge loader: runs an nnforge wasm bundle (model.onnx + manifest.json) with onnxruntime-web's
// WebAssembly backend, in a web page or in Node. No dependencies besides onnxruntime-web. A bundle
// built with backend "tvm" (model.wasm) is handed to nnforge-tvm.mjs, which needs nothing else.
//
//   import * as ort from "onnxruntime-web";           // or a <script> tag / CDN build
//   import { loadBundle } from "./nnforge-loader.mjs";
//   const model = await loadBundle("./bundle/", { ort });
//   const [y] = await model.run([new Float32Array(16)]);  // shapes come from manifest.json
//   console.log(y.name, y.dims, y.data);
//
// An input is a typed array (its shape is taken from the spec, which must then be static) or
// { data, dims } for dynamic dimensions. Outputs are { name, dims, dtype, data } in the spec's order.

// nnforge dtype -> [onnxruntime-web tensor type, typed array constructor]
export const DTYPES = {
  float32: ["float32", Float32Array],
  float64: ["float64", Float64Array],
  float16: ["float16", Uint16Array],
  int64: ["int64", BigInt64Array],
  int32: ["int32", Int32Array],
  int16: ["int16", Int16Array],
  int8: ["int8", Int8Array],
  uint8: ["uint8", Uint8Array],
  bool: ["bool", Uint8Array],
};

/** Fetch ``manifest.json`` and ``model.onnx`` from ``baseUrl`` (browser, or Node 18+ with http URLs). */
export async function loadBundle(baseUrl, options = {}) {
  const base = baseUrl.endsWith("/") ? baseUrl : baseUrl + "/";
  const get = async (name) => {
    const r = await fetch(base + name);
    if (!r.ok) throw new Error(`nnforge: cannot fetch ${base + name}: HTTP ${r.status}`);
    return r;
  };
  const spec = await (await get("manifest.json")).json();
  if (spec.backend === "tvm") {  // model.wasm with TVM's kernels: nnforge's own runtime, no onnxruntime-web
    const { loadTvmBundle } = await import("./nnforge-tvm.mjs");
    return loadTvmBundle(base, spec);
  }
  const model = new Uint8Array(await (await get(spec.model || "model.onnx")).arrayBuffer());
  return loadModel(model, spec, options);
}

/**
 * Create a session for ``model`` (bytes or URL) with ``spec`` = { inputs: [{name, shape, dtype}],
 * outputs: [...] } (the bundle's manifest.json has exactly these fields).
 * options: ort (the onnxruntime-web module; imported when absent), numThreads (default 1),
 * wasmPaths (where the .wasm files are served from), logLevel ("warning", "error", ...), sessionOptions.
 */
export async function loadModel(model, spec, options = {}) {
  const ort = options.ort || (await import("onnxruntime-web"));
  ort.env.wasm.numThreads = options.numThreads ?? 1;
  if (options.wasmPaths) ort.env.wasm.wasmPaths = options.wasmPaths;
  if (options.logLevel) ort.env.logLevel = options.logLevel;
  const severity = { verbose: 0, info: 1, warning: 2, error: 3, fatal: 4 }[options.logLevel];
  const session = await ort.InferenceSession.create(model, {
    executionProviders: ["wasm"],
    graphOptimizationLevel: "all",
    ...(severity === undefined ? {} : { logSeverityLevel: severity }),
    ...(options.sessionOptions || {}),
  });
  return new NnforgeModel(ort, session, spec);
}

export class NnforgeModel {
  constructor(ort, session, spec) {
    this.ort = ort;
    this.session = session;
    this.spec = spec;
    const n = spec.inputs.length;
    if (session.inputNames.length !== n) {
      throw new Error(`nnforge: model.onnx takes ${session.inputNames.length} inputs, the spec lists ${n}`);
    }
  }

  _tensor(x, i) {
    const s = this.spec.inputs[i];
    const [type, Ctor] = DTYPES[s.dtype] || [];
    if (!type) throw new Error(`nnforge: input ${s.name}: dtype ${s.dtype} is not supported in wasm`);
    const data = ArrayBuffer.isView(x) ? x : x.data;
    const dims = ArrayBuffer.isView(x) ? s.shape : x.dims;
    if (dims.some((d) => typeof d !== "number")) {
      throw new Error(`nnforge: input ${s.name} has dynamic shape [${s.shape}]: pass { data, dims }`);
    }
    if (dims.length !== s.shape.length || dims.some((d, k) => typeof s.shape[k] === "number" && d !== s.shape[k])) {
      throw new Error(`nnforge: input ${s.name}: shape [${dims}] does not match [${s.shape}]`);
    }
    if (!(data instanceof Ctor)) {
      throw new Error(`nnforge: input ${s.name}: expected a ${Ctor.name} for ${s.dtype}, got ${data.constructor.name}`);
    }
    const numel = dims.reduce((a, b) => a * b, 1);
    if (data.length !== numel) {
      throw new Error(`nnforge: input ${s.name}: ${data.length} elements for shape [${dims}] (needs ${numel})`);
    }
    return new this.ort.Tensor(type, data, dims);
  }

  /** Run the model; ``inputs`` in the spec's order. Returns [{ name, dims, dtype, data }]. */
  async run(inputs) {
    if (inputs.length !== this.spec.inputs.length) {
      throw new Error(`nnforge: the model takes ${this.spec.inputs.length} inputs, got ${inputs.length}`);
    }
    const feeds = {};
    this.session.inputNames.forEach((name, i) => { feeds[name] = this._tensor(inputs[i], i); });
    const results = await this.session.run(feeds);
    return this.session.outputNames.map((name, i) => {
      const t = results[name];
      const s = (this.spec.outputs || [])[i] || {};
      return { name: s.name || name, dims: t.dims, dtype: s.dtype || t.type, data: t.data };
    });
  }
}
