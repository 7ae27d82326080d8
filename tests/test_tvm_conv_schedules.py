"""Depthwise and 1-D convolutions on the TVM cpu target: the direct depthwise kernel (tvm_depthwise) and the
height-1 im2col matmul, against the reference interpreter and eager PyTorch, and which schedule they get."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from toolchains import need

import nnforge
from nnforge.backends import tvm as tb
from nnforge.backends.tvm_depthwise import CONV_BLOCK, CPUDepthwiseConv, padded_width
from nnforge.backends.tvm_schedule import CPUMatmul
from nnforge.ir import Graph, TensorType, interpret

RNG = np.random.default_rng(0)
TARGET = tb.tvm_target(tb.get_target("cpu"))


def rand(*shape):
    return RNG.standard_normal(shape).astype("float32")


def depthwise_graph(c, h, w, k, stride=(1, 1), padding=(0, 0), dilation=(1, 1), bias=True, mult=1, batch=1):
    """conv2d(groups=C) -> scale and shift (a folded batch norm) -> relu: the epilogue fuses into the kernel."""
    g = Graph("dw")
    x = g.add_input("x", TensorType((batch, c, h, w)))
    args = [x, g.add_constant(rand(c * mult, 1, *k), "w")] + ([g.add_constant(rand(c * mult), "b")] if bias else [])
    y = g.op("conv2d", *args, stride=list(stride), padding=list(padding), dilation=list(dilation), groups=c)
    y = g.op(
        "add",
        g.op("mul", y, g.add_constant(rand(1, c * mult, 1, 1), "s")),
        g.add_constant(rand(1, c * mult, 1, 1), "t"),
    )
    g.outputs = [g.op("relu", y)]
    return g


def kernels(g, schedule="default"):
    mod = tb.BACKEND.kernels(g, "cpu", {"schedule": schedule})
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def depthwise_kernel(g, schedule="default"):
    (name,) = [n for n in kernels(g, schedule) if CONV_BLOCK in n]
    return kernels(g, schedule)[name]


def assert_scheduled_by_the_rule(g):
    """The depthwise kernel the pipeline built is exactly what CPUDepthwiseConv makes of the unscheduled one
    (not a generic rule's schedule after ours failed); returns it."""
    sched, plain = depthwise_kernel(g), depthwise_kernel(g, "none")
    with TARGET:
        ours = CPUDepthwiseConv().apply(plain, TARGET, False)
    assert ours is not None, "CPUDepthwiseConv did not take the depthwise kernel"
    assert tvm_ffi.structural_equal(sched.body, ours.mod["main"].body)
    return sched


@pytest.mark.parametrize(
    "c,h,w,k,stride,padding,dilation,bias,mult",
    [
        (8, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1), True, 1),  # MobileNet 3x3, odd sizes
        (6, 10, 7, (3, 3), (2, 2), (1, 1), (1, 1), False, 1),  # stride 2, no bias
        (5, 13, 13, (5, 5), (1, 1), (2, 2), (1, 1), True, 1),  # EfficientNet 5x5
        (4, 11, 9, (5, 5), (2, 2), (2, 2), (1, 1), True, 1),
        (3, 15, 17, (7, 7), (1, 1), (3, 3), (1, 1), True, 1),  # ConvNeXt 7x7
        (3, 16, 16, (7, 7), (2, 2), (3, 3), (1, 1), False, 1),
        (4, 12, 12, (3, 3), (1, 1), (2, 2), (2, 2), True, 1),  # dilation 2
        (4, 12, 13, (3, 3), (2, 2), (2, 2), (2, 2), True, 1),  # dilation 2 with stride 2: phases mix
        (4, 9, 9, (3, 3), (1, 1), (0, 0), (1, 1), True, 1),  # no padding
        (3, 10, 12, (3, 5), (2, 1), (1, 2), (1, 1), True, 1),  # non-square window, stride 2 along H only
        (3, 10, 12, (3, 3), (1, 3), (1, 1), (1, 1), True, 1),  # stride 3 along W: three phases
        (4, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), True, 2),  # depth multiplier 2 (O = 2C)
        (2, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1), True, 1),  # a 1x1 image: every tap but one is padding
        (2, 5, 150, (3, 3), (1, 1), (1, 1), (1, 1), True, 1),  # a row of 10 vectors: two chunks of 5
        (2, 4, 200, (5, 5), (2, 2), (2, 2), (1, 1), True, 1),  # stride 2, a 100-wide output row
        (2, 6, 40, (31, 35), (1, 1), (15, 17), (1, 1), True, 1),  # a window too large to unroll whole
    ],
)
def test_depthwise_matches_the_interpreter(c, h, w, k, stride, padding, dilation, bias, mult):
    """Depthwise convolutions at odd, tiny and wide sizes, strides 1-3, padding, dilation, a depth multiplier,
    a huge window, with and without bias, batch 2, the scale/shift/relu after it fused: same numbers as the
    interpreter."""
    g = depthwise_graph(c, h, w, k, stride, padding, dilation, bias, mult, batch=2)
    assert_scheduled_by_the_rule(g)
    xs = rand(2, c, h, w)
    np.testing.assert_allclose(tb.build(g, "cpu").run([xs])[0], interpret(g, [xs])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c,hw,k,stride", [(32, 14, 3, 1), (16, 9, 5, 2), (8, 7, 7, 1)])
def test_depthwise_kernel_is_scheduled_by_its_rule(c, hw, k, stride):
    """The kernel the pipeline builds is exactly what CPUDepthwiseConv makes of the unscheduled one (not a
    generic rule's schedule): channels in parallel, the plane in a thread-local buffer, the window
    unrolled, the row vectorised, relu and bias fused; nothing else took the convolution."""
    g = depthwise_graph(c, hw, hw, (k, k), (stride, stride), (k // 2, k // 2))
    text = assert_scheduled_by_the_rule(g).script()
    assert "T.parallel" in text and "T.vectorized" in text and "T.unroll" in text
    assert 'scope="local"' in text  # the plane and the row sums are thread-local
    assert not [n for n in kernels(g) if "im2col" in n or "matmul" in n]


@pytest.mark.parametrize(
    "target,tools",
    [
        ("arm", ("aarch64-linux-gnu-g++", "qemu-aarch64", "aarch64-sysroot", "aarch64-tvm-runtime")),
        ("wasm", ("node", "wasm-ld")),
    ],
)
def test_depthwise_on_arm_and_wasm(target, tools):
    """The aarch64 build (NEON: 4 lanes, 32 registers, run under qemu-aarch64) and the wasm32 one (4 lanes,
    run in Node) take the same kernel: 5x5 stride 2 and 7x7, against the interpreter."""
    need(*tools)
    for k, stride in ((5, 2), (7, 1)):
        g = depthwise_graph(6, 11, 13, (k, k), (stride, stride), (k // 2, k // 2))
        assert [n for n in tb.BACKEND.kernels(g, target).get_global_vars() if CONV_BLOCK in n.name_hint]
        xs = rand(1, 6, 11, 13)
        got = tb.build(g, target).run([xs])[0]
        np.testing.assert_allclose(got, interpret(g, [xs])[0], rtol=1e-4, atol=1e-4)


def test_depthwise_rows_are_whole_vectors():
    """The row is computed in whole vectors (extra columns dropped), a narrow one in the next power of two."""
    assert padded_width(56, 16) == 64 and padded_width(112, 16) == 112 and padded_width(7, 16) == 8
    assert padded_width(14, 16) == 16 and padded_width(28, 4) == 28 and padded_width(3, 4) == 4


def test_depthwise_with_a_symbolic_batch():
    """A dynamic batch: the kernel runs batch x channels in parallel; the same numbers for batch 1 and 3."""
    g = Graph("dw")
    x = g.add_input("x", TensorType(("b", 6, 10, 10)))
    g.outputs = [g.op("conv2d", x, g.add_constant(rand(6, 1, 3, 3), "w"), padding=[1, 1], groups=6)]
    assert_scheduled_by_the_rule(g)
    art = tb.build(g, "cpu")
    for n in (1, 3):
        xs = rand(n, 6, 10, 10)
        np.testing.assert_allclose(art.run([xs])[0], interpret(g, [xs])[0], rtol=1e-5, atol=1e-5)


def test_grouped_convolution_keeps_the_matmul_path():
    """Groups with more than one channel each (ResNeXt) are not depthwise: im2col + batched matmul."""
    g = Graph("grouped")
    x = g.add_input("x", TensorType((1, 8, 9, 9)))
    g.outputs = [g.op("conv2d", x, g.add_constant(rand(8, 2, 3, 3), "w"), padding=[1, 1], groups=4)]
    names = kernels(g)
    assert not [n for n in names if CONV_BLOCK in n] and [n for n in names if "im2col" in n]
    xs = rand(1, 8, 9, 9)
    np.testing.assert_allclose(tb.build(g, "cpu").run([xs])[0], interpret(g, [xs])[0], rtol=1e-5, atol=1e-5)


CONV1D = [
    (80, 384, 3, 1, 1, 1, 1, 200),  # Whisper's first stem conv (fewer frames)
    (24, 24, 3, 2, 1, 1, 1, 61),  # Whisper's second: stride 2, odd length
    (8, 12, 5, 1, 2, 2, 1, 33),  # dilation 2
    (8, 8, 3, 1, 0, 1, 4, 20),  # grouped, no padding
    (6, 6, 7, 1, 3, 1, 6, 40),  # depthwise conv1d: the depthwise kernel with a 1 x 7 window
    (6, 12, 3, 2, 1, 1, 6, 40),  # depthwise with multiplier 2, stride 2
]


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,groups,frames", CONV1D)
def test_conv1d_matches_eager(cin, cout, k, stride, padding, dilation, groups, frames):
    """torch's Conv1d (imported as a height-1 conv2d) with stride, padding, dilation and groups, followed by
    GELU as in Whisper's stem: same numbers as eager PyTorch; a depthwise one takes the depthwise kernel."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(cin, cout, k, stride, padding, dilation, groups)
    model = torch.nn.Sequential(conv, torch.nn.GELU()).eval()
    x = torch.randn(1, cin, frames)
    cm = nnforge.compile(model, (x,), backend="tvm", check=False, progress=False, cache=False, min_block_size=1)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(cm.run([x.numpy()])[0], want, rtol=1e-4, atol=1e-4)
    if groups == cin:
        assert_scheduled_by_the_rule(nnforge.import_model(model, (x,)))


def test_conv1d_matmul_gets_the_matmul_schedule():
    """A height-1 convolution's im2col matmul is register-blocked by CPUMatmul: with the unit output row in
    its column index (y * OW + x, y always 0) trait detection refused it and it ran as naive loops."""
    g = nnforge.import_model(torch.nn.Conv1d(16, 32, 3, padding=1).eval(), (torch.randn(1, 16, 50),))
    (name,) = [n for n in kernels(g, "none") if "conv2d_mm" in n]
    with TARGET:
        assert CPUMatmul().apply(kernels(g, "none")[name], TARGET, False) is not None
    text = kernels(g)[name].script()
    assert "T.parallel" in text and "T.vectorized" in text
