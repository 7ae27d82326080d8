#!/usr/bin/env node
// nnforge wasm runner (Node): runs an nnforge wasm bundle: model.onnx with onnxruntime-web's wasm
// backend, or (manifest backend "tvm") model.wasm with nnforge-tvm.mjs.
//
//   node wasm_runner.mjs BUNDLE_DIR OUT_DIR in0.npy in1.npy ...
//
// Reads BUNDLE_DIR/manifest.json (input/output names, shapes, dtypes) and BUNDLE_DIR/model.onnx,
// inputs from .npy files (little-endian, C order), and writes OUT_DIR/out<i>.npy per output.
// onnxruntime-web is resolved from $NNFORGE_NODE_MODULES (a node_modules folder holding it) when
// set, else as usual from this file's folder (run `npm install --ignore-scripts` there first).
// Exit codes: 0 ok, 1 error (message on stderr), 2 usage.
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { DTYPES, loadModel } from "./nnforge-loader.mjs";
import { loadTvmModel } from "./nnforge-tvm.mjs";

const NPY_DTYPES = {
  "<f4": "float32", "<f8": "float64", "<f2": "float16", "<i8": "int64", "<i4": "int32",
  "<i2": "int16", "|i1": "int8", "|u1": "uint8", "|b1": "bool",
};

export function readNpy(path) {
  const buf = readFileSync(path);
  if (buf.length < 10 || buf.readUInt8(0) !== 0x93 || buf.toString("latin1", 1, 6) !== "NUMPY") {
    throw new Error(`${path} is not a .npy file`);
  }
  const v1 = buf.readUInt8(6) === 1;
  const hlen = v1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const off = (v1 ? 10 : 12) + hlen;
  const header = buf.toString("latin1", v1 ? 10 : 12, off);
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const dtype = NPY_DTYPES[descr];
  if (!dtype) throw new Error(`${path}: dtype ${descr} is not supported`);
  if (!/'fortran_order':\s*False/.test(header)) throw new Error(`${path}: Fortran-order arrays are not supported`);
  const dims = (/'shape':\s*\(([^)]*)\)/.exec(header)?.[1] || "").split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const Ctor = DTYPES[dtype][1];
  const numel = dims.reduce((a, b) => a * b, 1);
  const bytes = buf.subarray(off, off + numel * Ctor.BYTES_PER_ELEMENT);
  if (bytes.length !== numel * Ctor.BYTES_PER_ELEMENT) throw new Error(`${path}: truncated data`);
  const data = new Ctor(numel);  // a fresh, aligned copy
  new Uint8Array(data.buffer).set(bytes);
  return { data, dims, dtype };
}

export function writeNpy(path, { data, dims, dtype }) {
  const descr = Object.keys(NPY_DTYPES).find((k) => NPY_DTYPES[k] === dtype);
  if (!descr) throw new Error(`cannot write dtype ${dtype}`);
  const shape = dims.length === 1 ? `${dims[0]},` : dims.join(", ");
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${shape}), }`;
  header += " ".repeat(63 - ((10 + header.length) % 64)) + "\n";
  const head = Buffer.alloc(10);
  head.writeUInt8(0x93, 0);
  head.write("NUMPY", 1, "latin1");
  head.writeUInt8(1, 6);
  head.writeUInt8(0, 7);
  head.writeUInt16LE(header.length, 8);
  const body = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  writeFileSync(path, Buffer.concat([head, Buffer.from(header, "latin1"), body]));
}

async function importOrt() {
  const dir = process.env.NNFORGE_NODE_MODULES;
  if (!dir) return import("onnxruntime-web");
  const req = createRequire(join(resolve(dir), "nnforge-resolve.js"));
  const mod = await import(pathToFileURL(req.resolve("onnxruntime-web")).href);
  return mod.InferenceSession ? mod : mod.default;
}

async function main(argv) {
  if (argv.length < 2) {
    process.stderr.write("usage: node wasm_runner.mjs BUNDLE_DIR OUT_DIR [in0.npy in1.npy ...]\n");
    return 2;
  }
  const [bundle, outDir, ...inputs] = argv;
  const spec = JSON.parse(readFileSync(join(bundle, "manifest.json"), "utf8"));
  let session;
  if (spec.backend === "tvm") {  // model.wasm: TVM's kernels, run by nnforge's own runtime
    const read = (name) => new Uint8Array(readFileSync(join(bundle, name)));
    const program = JSON.parse(readFileSync(join(bundle, "tvm_program.json"), "utf8"));
    session = await loadTvmModel(read("model.wasm"), program, read("tvm_params.bin"), spec);
  } else {
    const model = readFileSync(join(bundle, spec.model || "model.onnx"));
    const ort = await importOrt();
    session = await loadModel(new Uint8Array(model.buffer, model.byteOffset, model.byteLength), spec, { ort, logLevel: "error" });
  }
  const arrays = inputs.map((p, i) => {
    const a = readNpy(p);
    const want = spec.inputs[i]?.dtype;
    if (want && a.dtype !== want) throw new Error(`input ${i} (${p}) is ${a.dtype}, the model wants ${want}`);
    return { data: a.data, dims: a.dims };
  });
  const outs = await session.run(arrays);
  outs.forEach((o, i) => writeNpy(join(outDir, `out${i}.npy`), o));
  process.stdout.write(`${outs.length} output(s) written to ${outDir}\n`);
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  main(process.argv.slice(2)).then(
    (code) => { process.exitCode = code; },
    (err) => { process.stderr.write(`nnforge wasm runner: ${err && err.message ? err.message : err}\n`); process.exitCode = 1; },
  );
}
