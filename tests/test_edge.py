"""Edge runtimes: arm bundles run under qemu-aarch64, wasm bundles in Node (onnxruntime-web, or TVM's
kernels in model.wasm with nnforge's own JS runtime).

Real runs, compared with eager torch. The toolchains come from scripts/install_toolchains.sh
(`make test` runs it); without them these tests fail (skip with NNFORGE_ALLOW_MISSING_TOOLCHAINS=1: tests/toolchains.py).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from toolchains import need

import nnforge
from nnforge.errors import NnforgeError
from nnforge.runtime import edge

ARM_TOOLS = (edge.ARM_CXX, edge.QEMU, "aarch64-sysroot", "aarch64-tvm-runtime")
WASM_TOOLS = ("node", "onnxruntime-web")
TVM_WASM_TOOLS = ("node", "wasm-ld")


class Tiny(torch.nn.Module):
    """int64 + float32 in; float32, bool and int64 out."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.a = torch.nn.Linear(8, 32)
        self.b = torch.nn.Linear(32, 4)

    def forward(self, ids, x):
        y = self.b(torch.nn.functional.gelu(self.a(self.emb(ids) + x)))
        return y, y > 0, y.argmax(-1)


@pytest.fixture(scope="module")
def example():
    torch.manual_seed(0)
    model = Tiny().eval()
    args = (torch.tensor([[1, 2, 3], [4, 5, 9]]), torch.randn(2, 3, 8))
    with torch.no_grad():
        ref = [t.numpy() for t in model(*args)]
    return model, args, [a.numpy() for a in args], ref


def check(outs, ref):
    assert len(outs) == len(ref)
    for got, want in zip(outs, ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def arm_bundle(example, tmp_path_factory):
    need(*ARM_TOOLS)
    model, args, _, _ = example
    d = tmp_path_factory.mktemp("arm") / "bundle"
    nnforge.compile(model, args, target="arm", progress=False).save(d)
    if not (d / edge.ARM_RUNNER).is_file():  # bundle saving may already call it
        written = edge.write_arm_runtime(d)
        assert written == [edge.ARM_RUNNER, *edge.ARM_LIBS, "README.md"]
    return d


@pytest.fixture(scope="module")
def wasm_bundle(example, tmp_path_factory):
    need(*WASM_TOOLS)
    model, args, _, _ = example
    d = tmp_path_factory.mktemp("wasm") / "bundle"
    nnforge.compile(model, args, target="wasm", progress=False).save(d)
    if not (d / "wasm_runner.mjs").is_file():
        written = edge.write_wasm_runtime(d)
        assert written == ["nnforge-loader.mjs", "nnforge-tvm.mjs", "wasm_runner.mjs", "README.md", "package.json"]
    return d


# ---------------------------------------------------------------------------------------------
# arm
# ---------------------------------------------------------------------------------------------


def test_arm_bundle_runs_under_qemu(arm_bundle, example):
    _, _, inputs, ref = example
    check(edge.run_arm(arm_bundle, inputs), ref)


def test_arm_bundle_is_self_contained_aarch64(arm_bundle):
    for name in (edge.ARM_RUNNER, *edge.ARM_LIBS, "model.so"):
        head = (arm_bundle / name).read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183, f"{name} is not aarch64"
    assert os.access(arm_bundle / edge.ARM_RUNNER, os.X_OK)
    assert "nnforge-arm-runner" in (arm_bundle / "README.md").read_text()


def test_arm_bundle_without_runtime_files_uses_the_cached_runner(arm_bundle, example, tmp_path):
    _, _, inputs, ref = example
    d = tmp_path / "bare"
    shutil.copytree(arm_bundle, d)
    for name in (edge.ARM_RUNNER, *edge.ARM_LIBS):
        (d / name).unlink()
    check(edge.run_arm(d, inputs), ref)


def test_arm_runner_failure_quotes_its_stderr(arm_bundle, example, tmp_path):
    _, _, inputs, _ = example
    d = tmp_path / "no-manifest"
    shutil.copytree(arm_bundle, d)
    (d / "manifest.json").unlink()  # no Python-side input check: the runner itself must complain
    with pytest.raises(NnforgeError, match=r"(?s)exit 1.*takes 2 input\(s\) \(ids, x\), got 1"):
        edge.run_arm(d, inputs[:1])


def test_arm_input_mismatch_is_caught_before_emulation(arm_bundle, example):
    _, _, inputs, _ = example
    with pytest.raises(NnforgeError, match="takes 2 input"):
        edge.run_arm(arm_bundle, inputs[:1])
    with pytest.raises(NnforgeError, match="'x' must be float32, got float64"):
        edge.run_arm(arm_bundle, [inputs[0], inputs[1].astype(np.float64)])


# ---------------------------------------------------------------------------------------------
# wasm
# ---------------------------------------------------------------------------------------------


def test_wasm_bundle_runs_in_node(wasm_bundle, example):
    _, _, inputs, ref = example
    check(edge.run_wasm(wasm_bundle, inputs), ref)


def test_wasm_bundle_files(wasm_bundle):
    package = json.loads((wasm_bundle / "package.json").read_text())
    root = json.loads((edge.REPO_ROOT / "package.json").read_text())
    assert package["dependencies"]["onnxruntime-web"] == root["dependencies"]["onnxruntime-web"] == edge.ORT_WEB_VERSION
    assert "loadBundle" in (wasm_bundle / "README.md").read_text()
    assert "export async function loadModel" in (wasm_bundle / "nnforge-loader.mjs").read_text()


@pytest.mark.parametrize(
    "bundle,model,runtime",
    [("wasm_bundle", "model.onnx", "onnxruntime-web"), ("tvm_wasm_bundle", "model.wasm", "nnforge-tvm.mjs")],
)
def test_wasm_runner_failure_quotes_its_stderr(bundle, model, runtime, example, tmp_path, request):
    _, _, inputs, _ = example
    d = tmp_path / "broken"
    shutil.copytree(request.getfixturevalue(bundle), d)
    (d / model).write_bytes(b"\0asm broken")
    with pytest.raises(
        NnforgeError, match=rf"(?s)wasm runner \(node \+ {runtime}\) failed.*exit 1.*nnforge wasm runner:"
    ):
        edge.run_wasm(d, inputs)


# ---------------------------------------------------------------------------------------------
# wasm through TVM
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tvm_wasm_bundle(example, tmp_path_factory):
    need(*TVM_WASM_TOOLS)
    model, args, _, _ = example
    d = tmp_path_factory.mktemp("tvm-wasm") / "bundle"
    nnforge.compile(model, args, target="wasm", backend="tvm", progress=False).save(d)
    return d


def test_tvm_wasm_bundle_runs_in_node(tvm_wasm_bundle, example):
    """int64 gather, float math, bool and int64 outputs: TVM's wasm32 kernels, run by nnforge-tvm.mjs."""
    _, _, inputs, ref = example
    check(edge.run_wasm(tvm_wasm_bundle, inputs), ref)
    manifest = json.loads((tvm_wasm_bundle / "manifest.json").read_text())
    assert manifest["backend"] == "tvm" and not (tvm_wasm_bundle / "model.onnx").exists()
    assert (tvm_wasm_bundle / "model.wasm").read_bytes()[:4] == b"\0asm"
    program = json.loads((tvm_wasm_bundle / "tvm_program.json").read_text())
    assert program["steps"] and all("kernel" in s or "alias" in s for s in program["steps"])


@pytest.mark.parametrize("family", ["mlp", "cnn", "vit", "bert", "gpt"])
def test_tvm_wasm_runs_every_family_like_eager(family):
    """compile() runs the wasm build in Node and compares it with eager torch on the example inputs."""
    need(*TVM_WASM_TOOLS)
    from nnforge.models import zoo

    zm = zoo.build(family)
    fast = nnforge.compile(zm.model, zm.inputs, target="wasm", backend="tvm", progress=False)
    assert fast.accuracy["max_rel_error"] <= 1e-4


def test_tvm_wasm_refuses_symbolic_sizes_by_name(example):
    need(*TVM_WASM_TOOLS)
    model, args, _, _ = example
    batch = torch.export.Dim("batch", min=1, max=8)
    with pytest.raises(NnforgeError, match=r"TVM wasm bundles need static shapes.*onnxrt backend"):
        nnforge.compile(
            model, args, target="wasm", backend="tvm", progress=False, dynamic_shapes=({0: batch}, {0: batch})
        )


LOAD_OVER_HTTP = """
import { createServer } from "node:http";
import { readFileSync } from "node:fs";
import { join } from "node:path";
const [loader, dir] = process.argv.slice(2);
const server = createServer((req, res) => {
  try { res.end(readFileSync(join(dir, req.url.slice(1)))); } catch { res.statusCode = 404; res.end(); }
}).listen(0, "127.0.0.1", async () => {
  try {
    const { loadBundle } = await import(loader);
    const model = await loadBundle(`http://127.0.0.1:${server.address().port}/`);
    const ids = new BigInt64Array([1n, 2n, 3n, 4n, 5n, 9n]);
    const x = new Float32Array(48).fill(0.5);
    const outs = await model.run([ids, x]);
    console.log(JSON.stringify(outs.map((o) => ({ name: o.name, dims: o.dims, data: Array.from(o.data, Number) }))));
  } finally { server.close(); }
});
"""


def test_tvm_wasm_bundle_loads_over_http_like_a_web_page(tvm_wasm_bundle, example, tmp_path):
    """The bundle's own nnforge-loader.mjs fetches manifest.json, sees backend "tvm" and runs model.wasm
    through nnforge-tvm.mjs: what a web page does (here a local HTTP server and Node's fetch)."""
    import subprocess

    model, _, _, _ = example
    script = tmp_path / "load.mjs"
    script.write_text(LOAD_OVER_HTTP)
    proc = subprocess.run(
        [edge.require("node"), str(script), (tvm_wasm_bundle / "nnforge-loader.mjs").as_uri(), str(tvm_wasm_bundle)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    outs = json.loads(proc.stdout)
    ids, x = torch.tensor([[1, 2, 3], [4, 5, 9]]), torch.full((2, 3, 8), 0.5)
    with torch.no_grad():
        want = model(ids, x)
    assert [o["name"] for o in outs] == [
        o["name"] for o in json.loads((tvm_wasm_bundle / "manifest.json").read_text())["outputs"]
    ]
    np.testing.assert_allclose(
        np.array(outs[0]["data"]).reshape(outs[0]["dims"]), want[0].numpy(), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_array_equal(np.array(outs[2]["data"]).reshape(outs[2]["dims"]), want[2].numpy())


# ---------------------------------------------------------------------------------------------
# missing tools
# ---------------------------------------------------------------------------------------------


def test_missing_tools_give_clear_errors(monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    status = edge.toolchain_status()
    assert set(status) == set(edge.TOOLS)
    assert status["qemu-aarch64"] is None and status["node"] is None
    with pytest.raises(
        NnforgeError, match=r"qemu-aarch64 not found: run scripts/install_toolchains.sh or apt-get install qemu-user"
    ):
        edge.run_arm(tmp_path, [np.zeros(2, np.float32)])
    with pytest.raises(NnforgeError, match=r"node not found: .*Node.js"):
        edge.run_wasm(tmp_path, [np.zeros(2, np.float32)])
    with pytest.raises(NnforgeError, match=r"aarch64-linux-gnu-g\+\+ not found"):
        edge.require(edge.ARM_CXX)
    monkeypatch.setenv("NNFORGE_AARCH64_DIR", str(empty))
    with pytest.raises(NnforgeError, match=r"aarch64-tvm-runtime not found: run scripts/install_toolchains.sh"):
        edge.write_arm_runtime(tmp_path / "b")
    monkeypatch.setenv("NNFORGE_NODE_MODULES", str(empty))
    with pytest.raises(NnforgeError, match=r"onnxruntime-web not found: .*npm install --ignore-scripts"):
        edge.require("onnxruntime-web")
    with pytest.raises(NnforgeError, match="unknown edge tool"):
        edge.require("gcc-for-mars")


def test_a_missing_toolchain_fails_the_tests_that_need_it_unless_allowed(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no node here
    monkeypatch.delenv("NNFORGE_ALLOW_MISSING_TOOLCHAINS", raising=False)
    with pytest.raises(pytest.fail.Exception, match=r"missing node\b.*: run scripts/install_toolchains.sh"):
        need("node", "onnxruntime-web")
    monkeypatch.setenv("NNFORGE_ALLOW_MISSING_TOOLCHAINS", "1")
    with pytest.raises(pytest.skip.Exception, match="missing node"):
        need("node")


@pytest.mark.parametrize("target", ["arm", "wasm"])
def test_compiled_edge_model_runs_from_python_and_after_load(example, target, tmp_path):
    """compile() checks an edge build by running it emulated; the model and its loaded bundle run from Python."""
    need(*(ARM_TOOLS if target == "arm" else WASM_TOOLS))
    model, args, arrays, ref = example
    fast = nnforge.compile(model, args, target=target, progress=False)
    assert fast.accuracy["max_rel_error"] <= 1e-4
    check([o.numpy() for o in fast(*args)], ref)
    fast.save(tmp_path / "b")
    check(nnforge.load(tmp_path / "b").run(arrays), ref)


def test_cli_runs_an_arm_bundle_under_qemu(arm_bundle, example, tmp_path, capsys):
    from nnforge.cli import main

    _, _, arrays, ref = example
    ins = []
    for k, a in enumerate(arrays):
        ins += ["--input", str(tmp_path / f"in{k}.npy")]
        np.save(tmp_path / f"in{k}.npy", a)
    outs = []
    for k in range(len(ref)):
        outs += ["--output", str(tmp_path / f"out{k}.npy")]
    assert main(["run", str(arm_bundle), *ins, *outs]) == 0
    check([np.load(tmp_path / f"out{k}.npy") for k in range(len(ref))], ref)
