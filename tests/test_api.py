"""nnforge.compile / save / load end to end on the CPU with ONNX Runtime, on all five families."""

import json
import shutil

import numpy as np
import pytest
import torch

import nnforge
from nnforge import BundleError
from nnforge.models import zoo


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(1.0, np.abs(a).max())


@pytest.fixture(scope="module")
def compiled_families():
    out = {}
    for fam in zoo.FAMILIES:
        zm = zoo.build(fam, "tiny")
        out[fam] = (
            zm,
            nnforge.compile(zm.model, zm.inputs, target="cpu", dynamic_shapes=zm.dynamic_shapes, progress=False),
        )
    return out


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_compile_matches_eager_and_reports(compiled_families, family):
    zm, fast = compiled_families[family]
    with torch.no_grad():
        want = zm.model(*zm.inputs)
    got = fast(*zm.inputs)
    assert isinstance(got, torch.Tensor) and got.shape == want.shape
    assert rel_err(want, got) <= 1e-4
    assert fast.accuracy["max_rel_error"] <= 1e-4
    report = fast.report()
    for word in ("pass", "nodes before", "nodes after", "max error", "canonicalize", "accuracy traded"):
        assert word in report
    assert fast.records and all(r.max_error is not None and r.max_error <= 1e-4 for r in fast.records)


@pytest.mark.parametrize("family", ["mlp", "bert", "gpt"])
def test_dynamic_shapes_accept_other_sizes(compiled_families, family):
    zm, fast = compiled_families[family]
    if family == "mlp":
        new = (torch.randn(5, zm.inputs[0].shape[1]),)
    else:
        ids = torch.randint(0, 100, (3, 11))
        new = (ids, torch.ones(3, 11, dtype=torch.int64)) if family == "bert" else (ids,)
    with torch.no_grad():
        want = zm.model(*new)
    assert rel_err(want, fast(*new)) <= 1e-4


def test_wrong_inputs_raise_value_error_naming_the_input(compiled_families):
    zm, fast = compiled_families["vit"]
    x = zm.inputs[0]
    with pytest.raises(ValueError, match="input 'x'.*rank 4"):
        fast(x[0])
    with pytest.raises(ValueError, match="input 'x'.*dtype float32"):
        fast(x.double())
    with pytest.raises(ValueError, match="input 'x'.*shape"):
        fast(x[:, :, :16, :16])
    with pytest.raises(ValueError, match="expected 1 input"):
        fast(x, x)


def test_numpy_in_numpy_out(compiled_families):
    zm, fast = compiled_families["mlp"]
    out = fast(zm.inputs[0].numpy())
    assert isinstance(out, np.ndarray)


def test_bundle_round_trip_and_tamper_detection(compiled_families, tmp_path):
    zm, fast = compiled_families["cnn"]
    fast.save(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["target"] == "cpu" and manifest["backend"] == "onnxrt"
    assert [i["name"] for i in manifest["inputs"]] == ["x"] and manifest["inputs"][0]["shape"][0] == "batch"
    assert {"nnforge", "onnxruntime", "python"} <= set(manifest["versions"])
    assert len(manifest["hash"]) == 64 and "model.onnx" in manifest["files"]

    again = nnforge.load(tmp_path / "b")
    assert torch.equal(again(*zm.inputs), fast(*zm.inputs))
    assert "canonicalize" in again.report()

    # a changed weight byte
    shutil.copytree(tmp_path / "b", tmp_path / "w")
    model_file = tmp_path / "w" / "model.onnx"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx was modified"):
        nnforge.load(tmp_path / "w")

    # a manifest edited by hand
    shutil.copytree(tmp_path / "b", tmp_path / "m")
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    m["inputs"][0]["shape"] = [1, 3, 32, 32]
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest.json was modified"):
        nnforge.load(tmp_path / "m")

    # another target, and a newer format
    with pytest.raises(BundleError, match="for target 'cpu', not 'arm'"):
        nnforge.load(tmp_path / "b", target="arm")
    shutil.copytree(tmp_path / "b", tmp_path / "n")
    m = json.loads((tmp_path / "n" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "n" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="newer"):
        nnforge.load(tmp_path / "n")
    with pytest.raises(BundleError, match="not an nnforge bundle"):
        nnforge.load(tmp_path)


def test_a_loaded_bundle_maps_its_files_and_can_be_saved_over_itself(compiled_families, tmp_path):
    """A loaded bundle's IR weights are read-only maps of weights.safetensors and ORT reads model.onnx itself:
    neither is held in memory a second time. Saving over the bundle it came from writes new files beside the
    mapped ones and renames them over, so the loaded model keeps running."""
    zm, fast = compiled_families["mlp"]
    fast.save(tmp_path / "b")
    loaded = nnforge.load(tmp_path / "b")
    weights = [a for a in loaded.graph.constants.values() if a.size]
    assert weights and not any(a.flags.writeable for a in weights)
    assert not isinstance(loaded.artifact._model_bytes, bytes)
    expected = fast(*zm.inputs)
    loaded.save(tmp_path / "b")
    assert torch.equal(loaded(*zm.inputs), expected)
    assert torch.equal(nnforge.load(tmp_path / "b")(*zm.inputs), expected)
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.suffix == ".tmp") == []


def test_compile_an_onnx_file(tmp_path):
    zm = zoo.build("mlp", "tiny")
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(zm.model, zm.inputs, str(path), dynamo=True, verbose=False)
    fast = nnforge.compile(str(path), target="cpu", progress=False)
    with torch.no_grad():
        want = zm.model(*zm.inputs).numpy()
    assert rel_err(want, fast(zm.inputs[0].numpy())) <= 1e-4


def test_unknown_target_and_backend_are_named():
    zm = zoo.build("mlp", "tiny")
    with pytest.raises(nnforge.NnforgeError, match="unknown target 'tpu'"):
        nnforge.compile(zm.model, zm.inputs, target="tpu")
    with pytest.raises(nnforge.NnforgeError, match="backend 'onnxrt' cannot build for target 'arm'"):
        nnforge.compile(zm.model, zm.inputs, target="arm", backend="onnxrt")


def test_backend_aliases_mean_onnxrt_and_an_unknown_backend_lists_the_names():
    zm = zoo.build("mlp", "tiny")
    for alias in ("onnxruntime", "ORT", "onnxrt"):
        fast = nnforge.compile(zm.model, zm.inputs, backend=alias, progress=False)
        assert fast.backend == "onnxrt" and fast.accuracy["max_rel_error"] <= 1e-4
    with pytest.raises(nnforge.NnforgeError) as e:
        nnforge.compile(zm.model, zm.inputs, backend="tensorrt", progress=False)
    assert "unknown backend 'tensorrt'" in str(e.value)
    assert all(name in str(e.value) for name in ("'onnxrt'", "'tvm'", "'onnxruntime'", "'ort'"))


def test_lossy_settings_run_after_the_lossless_pipeline_and_report_their_error():
    zm = zoo.build("vit", "tiny")
    cal = [(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    fast = nnforge.compile(
        zm.model,
        zm.inputs,
        tokens=nnforge.TokenMerge(r=2),
        layers=nnforge.SkipLayers(n=1),
        calibration=cal,
        progress=False,
    )
    assert fast.pipeline == "O2+skip_layers+token_merge"
    lossy = [r for r in fast.records if r.lossy]
    assert [r.name for r in lossy] == ["skip_layers", "token_merge"] and lossy[0].max_error > 0
    assert lossy[1].stats["r"] == [2]  # the typed settings reached the pass (one block left after skipping one)
    names = [r.name for r in fast.records]  # sink_slices trims a block: it runs after the passes that find blocks
    assert names.index("sink_slices") > names.index("token_merge")
    assert fast.accuracy["max_rel_error"] > 1e-4  # it traded accuracy, and says so
    assert fast(zm.inputs[0]).shape == (2, 10)
    with pytest.raises(nnforge.NnforgeError, match="not an nnforge lossy setting"):
        nnforge.compile(zm.model, zm.inputs, tokens="fast please")


def test_lossy_settings_group_the_keywords():
    zm = zoo.build("vit", "tiny")
    cal = [(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    grouped = nnforge.LossySettings(tokens=nnforge.TokenMerge(r=2), calibration=cal)
    fast = nnforge.compile(zm.model, zm.inputs, lossy=grouped, progress=False)
    same = nnforge.compile(zm.model, zm.inputs, tokens=nnforge.TokenMerge(r=2), calibration=cal, progress=False)
    assert fast.pipeline == same.pipeline == "O2+token_merge"
    assert [r.name for r in fast.records] == [r.name for r in same.records]
    np.testing.assert_array_equal(fast(zm.inputs[0]).numpy(), same(zm.inputs[0]).numpy())
    with pytest.raises(nnforge.NnforgeError, match="not both"):
        nnforge.compile(zm.model, zm.inputs, lossy=grouped, quantize=nnforge.Quantize())


def test_budget_picks_a_setting_within_budget_and_reports_it():
    zm = zoo.build("vit", "tiny")
    cal = [(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    fast = nnforge.compile(zm.model, zm.inputs, budget=nnforge.Budget(max_drop=0.05), calibration=cal, progress=False)
    note = fast.notes[0]
    assert "chosen:" in note and "held-out drop" in note and "within budget" in note
    assert "budget: cosine drop <= 0.05" in fast.report()


# ---------------------------------------------------------------------------------------
# every compile path goes through the partition plan: a model with an op no backend takes
# ---------------------------------------------------------------------------------------


class WithCumsum(torch.nn.Module):
    """Linear layers around torch.logcumsumexp, which no backend lowers: it runs on the torch executor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.l2(torch.nn.functional.gelu(self.l1(x))))
        h = torch.logcumsumexp(torch.tanh(h * 0.5), dim=-1)
        return torch.sigmoid(self.l3(torch.tanh(h) * 2.0)) + 1.0


BATCH = torch.export.Dim("batch", min=1, max=64)
HOST_BACKENDS = ["onnxrt", "tvm"]


def _cumsum_model():
    model = WithCumsum().eval()
    cal = [(torch.randn(16, 8, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    return model, (torch.randn(4, 8),), cal


def _assert_falls_back(fast, backend):
    assert fast.backend == f"{backend}+torch"
    plan = fast.artifact.plan
    assert [p.backend for p in plan.partitions] == [backend, "torch", backend], str(plan)
    (k,) = plan.fallback_nodes
    assert fast.graph.nodes[k].attrs["target"] == "aten.logcumsumexp.default"


def _eager(model, x):
    with torch.no_grad():
        return model(x).numpy()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NNFORGE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_a_cache_hit_runs_the_partition_plan(backend, cache_dir):
    model, xs, _ = _cumsum_model()
    first = nnforge.compile(model, xs, backend=backend, dynamic_shapes=({0: BATCH},), cache=True, progress=False)
    hit = nnforge.compile(model, xs, backend=backend, dynamic_shapes=({0: BATCH},), cache=True, progress=False)
    assert not first.from_cache and hit.from_cache and hit.cache_key == first.cache_key
    _assert_falls_back(hit, backend)
    x = torch.randn(7, 8)  # another batch size
    assert rel_err(_eager(model, x), hit(x).numpy()) <= 1e-5


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_lossy_passes_run_the_partition_plan(backend):
    model, xs, cal = _cumsum_model()
    fast = nnforge.compile(
        model,
        xs,
        backend=backend,
        dynamic_shapes=({0: BATCH},),
        quantize=nnforge.Quantize(),
        calibration=cal,
        cache=False,
        progress=False,
    )
    _assert_falls_back(fast, backend)
    assert any(r.lossy for r in fast.records) and any(n.op == "qlinear" for n in fast.graph.nodes)
    assert 0 < fast.accuracy["max_rel_error"] <= 0.05  # int8 weights: some error, reported


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_the_budget_search_runs_the_partition_plan(backend):
    model, xs, cal = _cumsum_model()
    fast = nnforge.compile(
        model,
        xs,
        backend=backend,
        dynamic_shapes=({0: BATCH},),
        budget=nnforge.Budget(max_drop=0.01, sparsity=[0.0, 0.5]),
        calibration=cal,
        progress=False,
    )
    _assert_falls_back(fast, backend)
    assert "chosen:" in fast.notes[0] and "within budget" in fast.notes[0]
    assert fast.accuracy["max_rel_error"] < 1.0


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_export_for_a_host_target_keeps_the_plan_and_a_cached_export_too(backend, tmp_path, cache_dir):
    model, xs, _ = _cumsum_model()
    for name in ("first", "cached"):
        out = nnforge.export(model, xs, target="cpu", backend=backend, out=tmp_path / name, cache=True, progress=False)
        loaded = nnforge.load(out)
        _assert_falls_back(loaded, backend)
        assert rel_err(_eager(model, xs[0]), loaded(*xs).numpy()) <= 1e-5
    assert "compile cache" in " ".join(loaded.notes)


def test_export_for_cuda_plans_tvm_and_torch_partitions(tmp_path):
    model, xs, _ = _cumsum_model()
    out = nnforge.export(model, xs, target="cuda", out=tmp_path / "cuda", check=False, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "cuda" and manifest["backend"] == "tvm+torch"
    assert [p["backend"] for p in manifest["partitions"]["partitions"]] == ["tvm", "torch", "tvm"]


@pytest.mark.parametrize("target, backend", [("arm", "tvm"), ("wasm", "onnxrt"), ("wasm", "tvm")])
def test_edge_targets_refuse_a_fallback_op_by_name(target, backend, tmp_path, cache_dir):
    model, xs, _ = _cumsum_model()
    for cache in (False, True):
        with pytest.raises(nnforge.UnsupportedOpError) as e:
            nnforge.export(model, xs, target=target, backend=backend, out=tmp_path / "b", cache=cache, progress=False)
        assert "torch_op aten.logcumsumexp.default" in str(e.value) and "needs a host target" in str(e.value)
        assert "test_api.py" in str(e.value)  # the model's source line
    assert not (tmp_path / "b").exists()
