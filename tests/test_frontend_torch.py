"""The torch frontend: torch.export -> IR, checked against eager PyTorch with the reference interpreter."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nnforge.errors import NnforgeError, UnsupportedOpError
from nnforge.frontend.torch import import_torch
from nnforge.ir import interpret, verify
from nnforge.models import zoo

_IMPORTED: dict = {}


def _zoo_graph(family: str):
    """Import each tiny zoo model once (with its dynamic shapes) and share it between tests."""
    if family not in _IMPORTED:
        zm = zoo.build(family, "tiny")
        _IMPORTED[family] = (zm, import_torch(zm.model, zm.inputs, zm.dynamic_shapes))
    return _IMPORTED[family]


def _assert_matches_eager(graph, model, inputs):
    got = interpret(graph, [t.numpy() for t in inputs])
    with torch.no_grad():
        want = model(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        w = w.numpy()
        assert g.shape == w.shape and g.dtype == w.dtype
        scale = max(1.0, float(np.abs(w).max())) if w.size else 1.0
        assert float(np.abs(g.astype(np.float64) - w).max()) <= 1e-4 * scale


def _new_inputs(zm, batch: int, seq: int):
    """Inputs for the zoo model at another batch size (and sequence length for bert/gpt)."""
    gen = torch.Generator().manual_seed(1)
    if zm.family in ("bert", "gpt"):
        ids = torch.randint(0, 100, (batch, seq), generator=gen)
        if zm.family == "gpt":
            return (ids,)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[0, seq // 2 :] = 0  # a padded sequence, not the last one this time
        return ids, mask
    return (torch.randn((batch,) + tuple(zm.inputs[0].shape[1:]), generator=gen),)


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_zoo_family_matches_eager_at_several_shapes(family):
    zm, g = _zoo_graph(family)
    verify(g)
    _assert_matches_eager(g, zm.model, zm.inputs)
    _assert_matches_eager(g, zm.model, _new_inputs(zm, batch=3, seq=11))  # same graph, new symbol values


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_zoo_inputs_are_symbolic_and_printed_so(family):
    zm, g = _zoo_graph(family)
    text = str(g)
    for v in g.inputs:
        assert v.shape[0] == "batch"
        if family in ("bert", "gpt"):
            assert v.shape[1] == "seq"
    if family == "cnn":
        assert "%x: f32[batch,3,32,32]" in text and "f32[batch,10]" in text
    if family in ("bert", "gpt"):
        assert "i64[batch,seq]" in text and "f32[batch,seq,32]" in text
    assert g.meta["symbol_ranges"]["batch"] == [1, 1024]


def test_size_arithmetic_becomes_dim_expressions():
    _, bert = _zoo_graph("bert")
    shapes = [n.attrs["shape"] for n in bert.nodes if n.op == "reshape"]
    assert ["seq", "4*batch", 8] in shapes  # sym_size(mask, 0) * 4, from nn.MultiheadAttention
    assert ["batch*seq", 32] in shapes
    assert any(n.op == "arange" and n.attrs["end"] == "seq" for n in bert.nodes)
    _, gpt = _zoo_graph("gpt")
    assert any(n.op == "slice" and n.attrs["end"] == "seq" for n in gpt.nodes)  # self.pos[:, :idx.shape[1]]


def test_weights_are_named_constants_and_nodes_carry_their_source_line():
    zm, g = _zoo_graph("vit")
    qkv = zm.model.blocks[0].attn.qkv.weight.detach().numpy()
    np.testing.assert_array_equal(g.constants["blocks_0_attn_qkv_weight"], qkv)
    assert "cls_token" in g.constants and "pos_embed" in g.constants
    assert all(n.source.startswith("zoo.py:") for n in g.nodes)
    assert g.meta["frontend"] == "torch" and g.meta["input_names"] == ["x"] and g.meta["output_names"] == ["output"]


def test_batch_norm_running_stats_become_constants():
    _, g = _zoo_graph("cnn")
    assert g.op_counts()["batch_norm"] == 6
    assert "stem_1_running_mean" in g.constants
    assert not any("num_batches_tracked" in k for k in g.constants)  # unused buffers are dropped


def test_static_import_has_static_shapes():
    zm = zoo.build("mlp", "tiny")
    g = import_torch(zm.model, zm.inputs)
    verify(g)
    assert g.symbols() == []
    assert all(isinstance(d, int) for v in g.all_values() for d in v.shape)
    _assert_matches_eager(g, zm.model, zm.inputs)
    with pytest.raises(ValueError, match="expected shape"):
        interpret(g, [np.zeros((3, 32), np.float32)])


class TwoUnsupported(nn.Module):
    def forward(self, x):
        a = torch.logcumsumexp(x, dim=1)
        b = torch.special.bessel_j0(x)
        return a + b + x.sum()


def test_unsupported_ops_are_all_reported_with_their_source_lines():
    lines, first = inspect.getsourcelines(TwoUnsupported.forward)
    cumsum_line = first + next(i for i, s in enumerate(lines) if "logcumsumexp" in s)
    bessel_line = first + next(i for i, s in enumerate(lines) if "bessel_j0" in s)
    with pytest.raises(UnsupportedOpError) as info:
        import_torch(
            TwoUnsupported(), (torch.randn(2, 5),), opaque=False
        )  # (opaque: kept as torch_op, see test_partition)
    msg = str(info.value)
    assert "aten.logcumsumexp.default" in msg and "aten.special_bessel_j0.default" in msg
    assert f"test_frontend_torch.py:{cumsum_line} in forward" in msg
    assert f"test_frontend_torch.py:{bessel_line} in forward" in msg
    assert len(info.value.items) == 2  # the add that consumes them is not blamed


class Misc(nn.Module):
    """Many small ATen ops at once: scalar operands, int->float promotion, masks, reductions, splits."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(8, 6, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding="same", groups=2)
        self.norm = nn.RMSNorm(8)
        self.register_buffer("table", torch.arange(12.0).reshape(3, 4), persistent=False)

    def forward(self, x, ids, mask):
        b = x.shape[0]
        y = 1 - x * 2.5 + ids.unsqueeze(-1) / 3  # rsub, scalars, int tensor / int -> float
        y = torch.where(mask.unsqueeze(-1), y, 0.0)
        y = y.masked_fill(y > 2, -1.0).clamp(-3, 3)
        y = self.norm(y - y.var(-1, keepdim=True) - y.mean(dim=(1, 2), keepdim=True)) ** 2
        z = self.conv1d(y.transpose(1, 2)).flatten(1)  # conv1d -> aten.convolution
        q = y.reshape(b, 2, -1, 4)
        attend = mask[:, None, None, :].expand(-1, 2, 8, -1) | torch.eye(8, dtype=torch.bool)
        a = F.scaled_dot_product_attention(q, q, q, attn_mask=attend)
        c = F.avg_pool2d(self.conv(a.reshape(b, 4, 4, 4)), 2, ceil_mode=True, count_include_pad=False)
        p1, p2 = c.flatten(1).chunk(2, dim=1)
        rows = torch.div(ids, 3, rounding_mode="floor") % 3
        g = self.table[rows[:, 0]].amax(-1)  # advanced indexing into a buffer
        s = torch.cat([p1.log_softmax(1), p2.softmax(dim=1), z[:, :3], g[:, None]], dim=1)
        return s, (ids == 2).sum(1), s.argmax(-1), torch.stack([p1, p2]).sum(0).max(dim=1).values


def test_misc_ops_match_eager_with_dtypes_and_tuple_outputs():
    torch.manual_seed(0)
    model = Misc().eval()

    def inputs(b):
        return torch.randn(b, 8, 8), torch.randint(0, 9, (b, 8)), torch.rand(b, 8) > 0.3

    batch = torch.export.Dim("batch", min=1, max=64)
    spec = {"x": {0: batch}, "ids": {0: batch}, "mask": {0: batch}}  # keyed by forward()'s names
    g = import_torch(model, inputs(2), spec, input_names=["x", "token_ids", "mask"])
    verify(g)
    assert [v.name for v in g.inputs] == ["x", "token_ids", "mask"]
    assert [str(v.type) for v in g.inputs] == ["f32[batch,8,8]", "i64[batch,8]", "i1[batch,8]"]
    assert g.meta["output_names"] == ["output_0", "output_1", "output_2", "output_3"]
    assert [v.dtype for v in g.outputs] == ["float32", "int64", "int64", "float32"]
    for b in (2, 5):
        _assert_matches_eager(g, model, inputs(b))


class ShiftAdd(nn.Module):
    def forward(self, a, b):
        return a[:, :-1] + b


class Shift(nn.Module):
    def forward(self, a, b):
        return a[:, :-1] + b, b[:, : b.shape[1] // 2]


def test_derived_dims_keep_the_root_name():
    n = torch.export.Dim("n", min=3, max=100)
    g = import_torch(ShiftAdd(), (torch.randn(2, 9), torch.randn(2, 8)), ({1: n + 1}, {1: n}))
    assert [str(v.type) for v in g.inputs] == ["f32[2,n + 1]", "f32[2,n]"]
    _assert_matches_eager(g, ShiftAdd(), (torch.randn(2, 13), torch.randn(2, 12)))


def test_unnamed_dims_are_named_after_input_and_axis():
    auto = torch.export.Dim.AUTO
    g = import_torch(Shift(), (torch.randn(2, 9), torch.randn(2, 8)), ({1: auto}, {1: auto}))
    assert [str(v.type) for v in g.inputs] == ["f32[2,b_1 + 1]", "f32[2,b_1]"]
    assert str(g.outputs[1].type) == "f32[2,floor(b_1/2)]"  # b.shape[1] // 2 as a dim expression
    _assert_matches_eager(g, Shift(), (torch.randn(2, 12), torch.randn(2, 11)))


def test_wrong_number_of_input_names_is_a_clear_error():
    zm = zoo.build("mlp", "tiny")
    with pytest.raises(NnforgeError, match="input_names has 2 name"):
        import_torch(zm.model, zm.inputs, input_names=["a", "b"])


class Extras(nn.Module):
    """Activations torch decomposes (hardswish, mish, softplus...) or that we rewrite (elu, log1p, repeat, norms)."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm([4, 8, 8])
        self.cls = nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x):
        y = F.relu6(x) + F.hardswish(x) + F.leaky_relu(x, 0.1) + F.elu(x) + F.selu(x) + F.softplus(x) + F.mish(x)
        y = y + x.exp().log1p() + torch.rsqrt(x.abs() + 1) + torch.tril(torch.ones(8, 8)) @ x
        v = x.flatten(1).std(-1) + x.norm(dim=1).sum((1, 2)) + F.normalize(x.flatten(1), dim=-1).sum(-1)
        return y.transpose(2, 3).mean(-1), v, self.ln(x), x.max(), x.double(), self.cls.repeat(x.shape[0], 2, 1)


def test_decomposed_and_rewritten_ops_match_eager():
    torch.manual_seed(0)
    model = Extras().eval()
    g = import_torch(model, (torch.randn(2, 4, 8, 8),), ({0: torch.export.Dim("batch")},))
    verify(g)
    assert g.outputs[3].shape == () and g.outputs[4].dtype == "float64"
    assert str(g.outputs[5].type) == "f32[batch,2,8]"
    for b in (2, 3):
        _assert_matches_eager(g, model, (torch.randn(b, 4, 8, 8),))


def test_training_mode_model_is_imported_in_eval_mode_and_left_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU()).train()
    model[1].running_mean.normal_()
    g = import_torch(model, (torch.randn(4, 6),))
    assert model.training and g.op_counts()["batch_norm"] == 1
    model.eval()
    _assert_matches_eager(g, model, (torch.randn(4, 6),))


def test_imported_graph_survives_save_and_load(tmp_path):
    from nnforge.ir import load_graph, save_graph

    zm, g = _zoo_graph("bert")
    save_graph(g, tmp_path / "bert")
    loaded = load_graph(tmp_path / "bert")  # 0-d scalar constants keep their shape
    assert loaded.meta["input_names"] == ["input_ids", "attention_mask"]
    _assert_matches_eager(loaded, zm.model, zm.inputs)
