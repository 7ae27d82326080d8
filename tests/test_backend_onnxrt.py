"""ONNX Runtime backend: every registry op lowered, run by ORT and compared with the interpreter."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from nnforge.backends.base import get_backend
from nnforge.backends.onnxrt import OnnxRuntimeArtifact, OnnxRuntimeBackend, to_onnx
from nnforge.errors import BundleError, NnforgeError, UnsupportedOpError
from nnforge.ir import REGISTRY, Graph, Node, TensorType, Value, interpret
from nnforge.targets import get_target

CPU = get_target("cpu")


class B:
    """A tiny graph builder: b.x(...) adds a fed input, b.c(...) a constant, b.op(...) a node."""

    def __init__(self):
        self.g = Graph("case")
        self.feeds: list[np.ndarray] = []
        self.rng = np.random.default_rng(0)

    def x(self, *shape, dtype="float32", lo=-2.0, hi=2.0, name="x", value=None) -> Value:
        arr = self._array(shape, dtype, lo, hi) if value is None else np.asarray(value)
        self.feeds.append(arr)
        return self.g.add_input(name, TensorType.of(arr))

    def c(self, *shape, dtype="float32", lo=-2.0, hi=2.0, value=None) -> Value:
        return self.g.add_constant(self._array(shape, dtype, lo, hi) if value is None else np.asarray(value))

    def _array(self, shape, dtype, lo, hi):
        if dtype == "bool":
            return self.rng.random(shape) > 0.5
        if np.issubdtype(np.dtype(dtype), np.integer):
            return self.rng.integers(int(lo), int(hi), shape).astype(dtype)
        return self.rng.uniform(lo, hi, shape).astype(dtype)

    def op(self, name, *ins, **attrs) -> Value:
        return self.g.op(name, *ins, **attrs)


def _grid(b, *shape):
    """Small integer-valued floats so comparisons hit ties."""
    return b.x(*shape, value=b.rng.integers(-2, 3, shape).astype("float32"))


# op name -> list of cases; each case builds a graph with B and returns its output value(s)
CASES = {
    "add": [
        lambda b: b.op("add", b.x(2, 3), b.x(3, name="y")),
        lambda b: b.op("add", b.x(2, 3, dtype="int64", lo=-5, hi=5), b.c(1, 3, dtype="int64")),
    ],
    "sub": [lambda b: b.op("sub", b.x(2, 1, 4), b.x(3, 4, name="y"))],
    "mul": [lambda b: b.op("mul", b.x(2, 3), b.c(value=np.float32(1.5)))],
    "div": [
        lambda b: b.op("div", b.x(2, 3), b.x(2, 3, lo=0.5, hi=2.0, name="y")),
        lambda b: b.op(
            "div", b.x(3, 4, dtype="int64", lo=-9, hi=9), b.x(4, dtype="int64", value=np.array([2, -3, 4, 7]))
        ),
        lambda b: b.op(
            "div",
            b.x(3, 4, dtype="int32", lo=-9, hi=9),
            b.x(4, dtype="int32", value=np.array([2, -3, 4, 7], np.int32)),
            rounding="trunc",
        ),
    ],
    "maximum": [lambda b: b.op("maximum", b.x(2, 3), b.x(1, 3, name="y"))],
    "minimum": [lambda b: b.op("minimum", b.x(2, 3), b.x(2, 3, name="y"))],
    "pow": [lambda b: b.op("pow", b.x(2, 3, lo=0.1, hi=2.0), b.x(2, 3, name="y"))],
    "eq": [lambda b: b.op("eq", _grid(b, 3, 4), _grid(b, 3, 4))],
    "ne": [lambda b: b.op("ne", _grid(b, 3, 4), _grid(b, 4))],
    "isnan": [lambda b: b.op("isnan", b.x(3, 4, value=np.array([1.0, np.nan, np.inf, -0.0] * 3).reshape(3, 4)))],
    "lt": [lambda b: b.op("lt", _grid(b, 3, 4), _grid(b, 3, 4))],
    "le": [lambda b: b.op("le", _grid(b, 3, 4), _grid(b, 3, 4))],
    "gt": [lambda b: b.op("gt", _grid(b, 3, 4), _grid(b, 3, 4))],
    "ge": [lambda b: b.op("ge", _grid(b, 3, 4), _grid(b, 3, 4))],
    "logical_and": [lambda b: b.op("logical_and", b.x(3, 4, dtype="bool"), b.x(3, 4, dtype="bool", name="y"))],
    "logical_or": [lambda b: b.op("logical_or", b.x(3, 4, dtype="bool"), b.x(4, dtype="bool", name="y"))],
    "logical_not": [lambda b: b.op("logical_not", b.x(3, 4, dtype="bool"))],
    "where": [lambda b: b.op("where", b.x(3, 4, dtype="bool", name="c"), b.x(3, 4), b.c(value=np.float32(-1)))],
    "exp": [lambda b: b.op("exp", b.x(2, 5))],
    "log": [lambda b: b.op("log", b.x(2, 5, lo=0.1, hi=3))],
    "sqrt": [lambda b: b.op("sqrt", b.x(2, 5, lo=0.1, hi=3))],
    "rsqrt": [lambda b: b.op("rsqrt", b.x(2, 5, lo=0.1, hi=3))],
    "reciprocal": [lambda b: b.op("reciprocal", b.x(2, 5, lo=0.5, hi=3))],
    "tanh": [lambda b: b.op("tanh", b.x(2, 5))],
    "sigmoid": [lambda b: b.op("sigmoid", b.x(2, 5))],
    "erf": [lambda b: b.op("erf", b.x(2, 5))],
    "sin": [lambda b: b.op("sin", b.x(2, 5))],
    "cos": [lambda b: b.op("cos", b.x(2, 5))],
    "silu": [lambda b: b.op("silu", b.x(2, 5))],
    "floor": [lambda b: b.op("floor", b.x(2, 5))],
    "ceil": [lambda b: b.op("ceil", b.x(2, 5))],
    "neg": [lambda b: b.op("neg", b.x(2, 5)), lambda b: b.op("neg", b.x(2, 5, dtype="int64", lo=-9, hi=9))],
    "abs": [lambda b: b.op("abs", b.x(2, 5))],
    "relu": [lambda b: b.op("relu", b.x(2, 5))],
    "gelu": [lambda b: b.op("gelu", b.x(2, 5)), lambda b: b.op("gelu", b.x(2, 5), approximate="tanh")],
    "clamp": [
        lambda b: b.op("clamp", b.x(2, 5), min=-0.5, max=1.0),
        lambda b: b.op("clamp", b.x(2, 5), min=0.0),
        lambda b: b.op("clamp", b.x(2, 5, dtype="int64", lo=-9, hi=9), max=3),
    ],
    "cast": [
        lambda b: b.op("cast", b.x(2, 5, lo=-9, hi=9), dtype="int32"),
        lambda b: b.op("cast", b.x(2, 5), dtype="bool"),
        lambda b: b.op("cast", b.x(2, 5, dtype="int64", lo=-9, hi=9), dtype="float32"),
    ],
    "reduce_sum": [
        lambda b: b.op("reduce_sum", b.x(2, 3, 4), axes=[1]),
        lambda b: b.op("reduce_sum", b.x(2, 3, 4), axes=[0, -1], keepdims=True),
    ],
    "reduce_mean": [
        lambda b: b.op("reduce_mean", b.x(2, 3, 4)),
        lambda b: b.op("reduce_mean", b.x(2, 3, 4), axes=[2], keepdims=True),
    ],
    "reduce_max": [lambda b: b.op("reduce_max", b.x(2, 3, 4), axes=[1])],
    "reduce_min": [lambda b: b.op("reduce_min", b.x(2, 3, 4), axes=[-1], keepdims=True)],
    "argmax": [
        lambda b: b.op("argmax", b.x(2, 3, 4), axis=1),
        lambda b: b.op("argmax", _grid(b, 3, 5), axis=-1, keepdims=True),
    ],
    "softmax": [lambda b: b.op("softmax", b.x(2, 3, 4)), lambda b: b.op("softmax", b.x(2, 3, 4), axis=1)],
    "log_softmax": [lambda b: b.op("log_softmax", b.x(2, 3, 4), axis=-1)],
    "layer_norm": [
        lambda b: b.op("layer_norm", b.x(2, 3, 8), b.c(8), b.c(8), eps=1e-6),
        lambda b: b.op("layer_norm", b.x(2, 3, 8)),
        lambda b: b.op("layer_norm", b.x(2, 3, 4), b.c(3, 4), naxes=2),
    ],
    "rms_norm": [lambda b: b.op("rms_norm", b.x(2, 3, 8), b.c(8)), lambda b: b.op("rms_norm", b.x(2, 3, 8))],
    "batch_norm": [
        lambda b: b.op("batch_norm", b.x(2, 3, 4, 4), b.c(3), b.c(3, lo=0.5, hi=1.5), b.c(3), b.c(3)),
        lambda b: b.op("batch_norm", b.x(2, 3, 5), b.c(3), b.c(3, lo=0.5, hi=1.5), eps=1e-3),
    ],
    "matmul": [
        lambda b: b.op("matmul", b.x(2, 3, 4), b.x(4, 5, name="y")),
        lambda b: b.op("matmul", b.x(2, 1, 3, 4), b.x(5, 4, 2, name="y")),
    ],
    "linear": [
        lambda b: b.op("linear", b.x(4, 6), b.c(5, 6), b.c(5)),
        lambda b: b.op("linear", b.x(2, 3, 6), b.c(5, 6), b.c(5)),
        lambda b: b.op("linear", b.x(2, 3, 6), b.c(5, 6)),
        lambda b: b.op("linear", b.x(2, 3, 6), b.x(5, 6, name="w")),
    ],
    "linear_act": [
        lambda b, act=act: b.op("linear_act", b.x(2, 3, 6), b.c(5, 6), b.c(5), act=act)
        for act in ("none", "relu", "gelu", "gelu_tanh", "silu")
    ]
    + [lambda b: b.op("linear_act", b.x(4, 6), b.c(5, 6), act="gelu")],
    "conv2d": [
        lambda b: b.op("conv2d", b.x(2, 3, 8, 8), b.c(4, 3, 3, 3), b.c(4), stride=[2, 2], padding=[1, 1]),
        lambda b: b.op("conv2d", b.x(1, 4, 7, 9), b.c(4, 2, 3, 2), groups=2, dilation=[2, 1], padding=[2, 0]),
    ],
    "max_pool2d": [
        lambda b: b.op("max_pool2d", b.x(2, 3, 8, 8), kernel=[3, 3], stride=[2, 2], padding=[1, 1]),
        lambda b: b.op("max_pool2d", b.x(1, 2, 7, 7), kernel=[2, 2], stride=[2, 2], ceil_mode=True),
        lambda b: b.op("max_pool2d", b.x(1, 2, 9, 9), kernel=[2, 2], stride=[1, 1], dilation=[2, 2]),
        # ceil_mode where the last window would start in the padding: the IR drops it, ONNX keeps it
        lambda b: b.op("max_pool2d", b.x(1, 2, 5, 6), kernel=[3, 3], stride=[3, 3], padding=[1, 1], ceil_mode=True),
        # after relu: MaxPool plus a convolution-only NaN probe (ORT keeps it in NCHWc)
        lambda b: b.op("max_pool2d", b.op("relu", b.x(1, 3, 9, 9)), kernel=[3, 3], stride=[2, 2], padding=[1, 1]),
    ],
    "avg_pool2d": [
        lambda b: b.op("avg_pool2d", b.x(2, 3, 8, 8), kernel=[2, 2], stride=[2, 2]),
        lambda b: b.op("avg_pool2d", b.x(1, 2, 7, 7), kernel=[3, 3], stride=[2, 2], padding=[1, 1]),
        lambda b: b.op(
            "avg_pool2d", b.x(1, 2, 7, 7), kernel=[3, 3], stride=[2, 2], padding=[1, 1], count_include_pad=False
        ),
        lambda b: b.op("avg_pool2d", b.x(1, 2, 8, 8), kernel=[3, 3], stride=[2, 2], padding=[1, 1], ceil_mode=True),
        lambda b: b.op(
            "avg_pool2d",
            b.x(1, 2, 5, 6),
            kernel=[3, 3],
            stride=[3, 3],
            padding=[1, 1],
            ceil_mode=True,
            count_include_pad=False,
        ),
    ],
    "adaptive_avg_pool2d": [
        lambda b: b.op("adaptive_avg_pool2d", b.x(2, 3, 5, 7), output_size=[1, 1]),
        lambda b: b.op("adaptive_avg_pool2d", b.x(2, 3, 8, 6), output_size=[2, 3]),
    ],
    "sdpa": [
        lambda b: b.op("sdpa", b.x(2, 2, 5, 4, name="q"), b.x(2, 2, 5, 4, name="k"), b.x(2, 2, 5, 4, name="v")),
        lambda b: b.op(
            "sdpa", b.x(2, 2, 5, 4, name="q"), b.x(2, 2, 5, 4, name="k"), b.x(2, 2, 5, 4, name="v"), is_causal=True
        ),
        lambda b: b.op(
            "sdpa", b.x(2, 3, 4, name="q"), b.x(2, 6, 4, name="k"), b.x(2, 6, 3, name="v"), is_causal=True, scale=0.3
        ),
        lambda b: b.op(
            "sdpa",
            b.x(2, 5, 4, name="q"),
            b.x(2, 5, 4, name="k"),
            b.x(2, 5, 4, name="v"),
            b.x(2, 1, 5, name="m", value=np.arange(5)[None, None, :].repeat(2, 0) < np.array([5, 3])[:, None, None]),
        ),
        lambda b: b.op(
            "sdpa", b.x(2, 5, 4, name="q"), b.x(2, 5, 4, name="k"), b.x(2, 5, 4, name="v"), b.x(5, 5, name="m")
        ),
    ],
    "attention": [
        lambda b: b.op(
            "attention", b.x(2, 5, 8, name="q"), b.x(2, 5, 8, name="k"), b.x(2, 5, 8, name="v"), num_heads=2
        ),
        lambda b: b.op(
            "attention",
            b.x(2, 5, 8, name="q"),
            b.x(2, 5, 8, name="k"),
            b.x(2, 5, 8, name="v"),
            num_heads=4,
            is_causal=True,
        ),
        lambda b: b.op(
            "attention",
            b.x(2, 3, 8, name="q"),
            b.x(2, 6, 8, name="k"),
            b.x(2, 6, 4, name="v"),
            b.x(2, 1, 1, 6, name="m", value=np.arange(6)[None, None, None, :] < np.array([6, 4])[:, None, None, None]),
            num_heads=2,
            scale=0.25,
        ),
        lambda b: b.op(
            "attention",
            b.x(1, 4, 6, name="q"),
            b.x(1, 4, 6, name="k"),
            b.x(1, 4, 6, name="v"),
            b.x(4, 4, name="m"),
            num_heads=3,
        ),
    ],
    "reshape": [
        lambda b: b.op("reshape", b.x(2, 3, 4), shape=[6, -1]),
        lambda b: b.op("reshape", b.x(2, 3, 4), shape=[4, 3, 2]),
    ],
    "permute": [lambda b: b.op("permute", b.x(2, 3, 4), perm=[2, 0, 1])],
    "expand": [
        lambda b: b.op("expand", b.x(3, 1), shape=[2, 3, 4]),
        lambda b: b.op("expand", b.x(1, 3, 1), shape=[2, -1, 5]),
    ],
    "concat": [lambda b: b.op("concat", b.x(2, 3), b.x(2, 1, name="y"), b.c(2, 2), axis=1)],
    "slice": [
        lambda b: b.op("slice", b.x(5, 6), axis=1, start=1, end=5, step=2),
        lambda b: b.op("slice", b.x(5, 6), axis=0, start=-3),
        lambda b: b.op("slice", b.x(5, 6), axis=-1, start=2, end=-1),
    ],
    "gather": [
        lambda b: b.op("gather", b.c(10, 4), b.x(2, 3, dtype="int64", lo=0, hi=10)),
        lambda b: b.op("gather", b.x(3, 5), b.c(value=np.array([4, -1, 0], np.int32)), axis=1),
        lambda b: b.op("gather", b.x(2, 3, 4), b.c(value=np.int64(0)), axis=1),
    ],
    "squeeze": [lambda b: b.op("squeeze", b.x(2, 1, 3, 1), axes=[1, -1])],
    "unsqueeze": [lambda b: b.op("unsqueeze", b.x(2, 3), axes=[0, -1])],
    "full_like": [
        lambda b: b.op("full_like", b.x(2, 3), value=2.5),
        lambda b: b.op("full_like", b.x(2, 3), value=1, dtype="int64"),
        lambda b: b.op("full_like", b.x(2, 3), value=1, dtype="bool"),
    ],
    "arange": [
        lambda b: b.op("add", b.op("arange", end=5), b.x(2, 1, dtype="int64", lo=0, hi=5)),
        lambda b: b.op("mul", b.op("arange", start=1, end=10, step=3, dtype="float32"), b.x(3)),
        lambda b: b.op("add", b.op("arange", end=4, dtype="int32"), b.x(4, dtype="int32", lo=0, hi=5)),
    ],
    # indexing, scans, selection (nnforge/ops/indexing.py)
    "index": [
        lambda b: b.op(
            "index",
            b.x(4, 5, 6),
            b.c(value=np.array([0, -1, 2])),
            b.x(2, 1, dtype="int64", lo=-6, hi=6, name="j"),
            axes=[0, 2],
        ),
        lambda b: b.op(
            "index", b.x(4, 5, 6, 3), b.c(value=np.array([[0, 1]])), b.c(value=np.array([1, -4], np.int32)), axes=[1, 2]
        ),
    ],
    "gather_elements": [
        lambda b: b.op("gather_elements", b.x(3, 4), b.x(2, 4, dtype="int64", lo=0, hi=3, name="i"), axis=0)
    ],
    "scatter_elements": [
        lambda b: b.op("scatter_elements", b.x(3, 4), b.c(value=np.array([[0, 2, 1, 0]])), b.x(1, 4, name="u")),
        lambda b: b.op(
            "scatter_elements",
            b.x(3, 4),
            b.c(value=np.array([[0, 1], [1, 1], [3, 0]])),
            b.x(3, 2, name="u"),
            axis=1,
            reduction="add",
        ),
    ],
    "cumsum": [
        lambda b: b.op("cumsum", b.x(3, 4), axis=1),
        lambda b: b.op("cumsum", b.x(3, 4, dtype="int64", lo=-5, hi=5), axis=0),
    ],
    "topk": [
        lambda b: b.g.add_node("topk", [b.x(3, 7)], {"k": 3}).outputs,
        lambda b: b.g.add_node("topk", [b.x(6, 3)], {"k": 6, "axis": 0, "largest": False}).outputs,  # a sort
    ],
    # padding, resizing, group norm, hard activations
    "pad": [
        lambda b: b.op("pad", b.x(1, 2, 4, 5), pads=[0, 0, 1, 2, 0, 0, 2, -1], value=0.5),
        lambda b: b.op("pad", b.x(2, 6), pads=[0, -1, 0, -2]),
    ],
    "upsample2d": [
        lambda b: b.op("upsample2d", b.x(1, 2, 4, 5), size=[8, 10]),
        lambda b: b.op("upsample2d", b.x(1, 2, 4, 5), size=[6, 7], mode="linear"),
        lambda b: b.op("upsample2d", b.x(1, 2, 4, 5), size=[7, 9], mode="linear", align_corners=True),
    ],
    "group_norm": [
        lambda b: b.op("group_norm", b.x(2, 6, 3, 4), b.c(6), b.c(6), num_groups=3),
        lambda b: b.op("group_norm", b.x(2, 6, 5), num_groups=2, eps=1e-3),
    ],
    "hardswish": [lambda b: b.op("hardswish", b.x(3, 9, lo=-5, hi=5))],
    "hardsigmoid": [lambda b: b.op("hardsigmoid", b.x(3, 9, lo=-5, hi=5))],
}


# elementwise_region (nnforge/ops/region.py): each step through its own lowering
CASES["elementwise_region"] = [
    lambda b: b.op(
        "elementwise_region",
        b.x(2, 3, 8),
        b.c(8),
        b.x(3, 1, name="y"),
        body=[["mul", [0, 1], {}], ["add", [3, 2], {}], ["relu", [4], {}], ["gelu", [5], {"approximate": "none"}]],
    ),
    lambda b: b.op(
        "elementwise_region",
        b.x(4, 5, dtype="int64", lo=-9, hi=9),
        b.c(value=np.int64(2)),
        body=[["div", [0, 1], {}], ["cast", [2], {"dtype": "float32"}], ["exp", [3], {}]],
    ),
]


# token ops (nnforge/ops/tokens.py): two outputs each for merge and prune (tokens, sizes)
CASES.update(
    {
        "token_merge": [
            lambda b: b.g.add_node("token_merge", [b.x(2, 9, 4), b.x(2, 9, 3, name="m")], {"r": 3}).outputs,
            lambda b: (
                b.g.add_node(
                    "token_merge",
                    [
                        b.x(2, 8, 4),
                        b.x(2, 8, 4, name="m"),
                        b.x(2, 8, value=np.array([[1, 2, 1, 1, 0, 1, 0, 0]] * 2, np.float32), name="s"),
                    ],
                    {"r": 2, "protect_first": 1},
                ).outputs
            ),
        ],
        "token_prune": [
            lambda b: (
                b.g.add_node(
                    "token_prune",
                    [b.x(2, 7, 4), b.x(2, 7, lo=0, hi=1, name="s")],
                    {"keep": 4, "protect_first": 1, "protect_last": 1},
                ).outputs
            ),
            lambda b: (
                b.g.add_node(
                    "token_prune", [b.x(2, 7, 4), b.x(2, 7, lo=0, hi=1, name="s")], {"keep": 3, "fuse_dropped": True}
                ).outputs
            ),
        ],
        "attention_scores": [
            lambda b: b.op("attention_scores", b.x(2, 5, 8), b.x(2, 5, 8, name="k"), num_heads=2),
            lambda b: b.op(
                "attention_scores", b.x(2, 5, 8), b.x(2, 5, 8, name="k"), num_heads=2, is_causal=True, query="mean"
            ),
            lambda b: b.op(
                "attention_scores",
                b.x(2, 5, 8),
                b.x(2, 5, 8, name="k"),
                b.x(2, 1, 1, 5, dtype="bool", name="mask"),
                num_heads=4,
                query="last",
            ),
        ],
    }
)


# low-bit and sparse ops (nnforge/ops/lowbit.py)
def _qweight(b, n, k, bits, group, zeros=True):
    """Random codes as the quantize passes store them: int8 [n, k] or packed uint8 [n, k/2], scales, zeros."""
    from nnforge.ops.lowbit import pack_int4

    codes = b.rng.integers(-127, 128, (n, k)).astype(np.int8) if bits == 8 else pack_int4(b.rng.integers(0, 16, (n, k)))
    scales = b.rng.uniform(0.01, 0.1, (n, k // group)).astype(np.float32)
    z = b.c(value=b.rng.integers(0, 16, (n, k // group)).astype(np.uint8)) if bits == 4 and zeros else None
    return b.c(value=codes), b.c(value=scales), z


def _kept(b):
    """An ONNX node the IR has no op for (Hardmax), as the ONNX frontend keeps it."""
    from onnx import TensorProto, helper

    from nnforge.frontend.onnx import import_onnx

    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 4]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"], axis=1)], "kept", vi[:1], vi[1:])
    node = import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])).nodes[0]
    return b.op("onnx_node", b.x(3, 4), **node.attrs)


CASES["onnx_node"] = [_kept]

# ToMe for diffusion (nnforge/ops/merge.py): merged tokens and slots; a 5x6 grid leaves the last cells short
CASES["grid_merge"] = [
    lambda b: b.g.add_node("grid_merge", [b.x(2, 30, 4)], {"r": 11, "grid": [5, 6]}).outputs,
    lambda b: b.g.add_node("grid_merge", [b.x(1, 16, 3)], {"r": 0, "grid": [4, 4], "stride": [1, 2]}).outputs,
]


def _decode_inputs(b, s, seqlens, total, h=4, kv=2, d=16, cap=12):
    """q, k, v, the caches, seqlens_k, total_len and RoPE tables of a cached_attention step (tests/test_llm.py
    covers prefill, padded batches and draft chunks on every backend)."""
    batch = len(seqlens)
    angles = np.arange(cap)[:, None] / 10000 ** (np.arange(0, d, 2) / d)
    return (
        [b.x(batch, s, h * d, name="q"), b.x(batch, s, kv * d, name="k"), b.x(batch, s, kv * d, name="v")]
        + [b.x(batch, kv, cap, d, name="past_k"), b.x(batch, kv, cap, d, name="past_v")]
        + [b.x(value=np.array(seqlens, np.int32), name="seqlens_k"), b.x(value=np.array(total, np.int32), name="total")]
        + [b.c(value=np.cos(angles).astype(np.float32)), b.c(value=np.sin(angles).astype(np.float32))]
    )


def _cached_attention(b, s, seqlens, total):
    node = b.g.add_node("cached_attention", _decode_inputs(b, s, seqlens, total), {"num_heads": 4, "kv_num_heads": 2})
    return node.outputs[0]  # the cache past the filled slots is the runtime's (test_llm.py checks the filled ones)


def _attention_mass(b, s, seqlens, total, window):
    q, _, _, past_k, _, sl, tl, cos, sin = _decode_inputs(b, s, seqlens, total)
    attrs = {"num_heads": 4, "kv_num_heads": 2, "window": window}
    return b.g.add_node("attention_mass", [q, past_k, sl, tl, cos, sin], attrs).output


CASES["cached_attention"] = [
    lambda b: _cached_attention(b, 4, [3], 4),  # a prompt into an empty cache
    lambda b: _cached_attention(b, 1, [6, 2], 7),  # one decode step per sequence at its own length
]
CASES["attention_mass"] = [lambda b: _attention_mass(b, 3, [8], 9, 0), lambda b: _attention_mass(b, 4, [3], 4, 2)]


def _csr(b, n, k):
    from nnforge.ops.lowbit import csr_from_dense

    w = np.where(b.rng.random((n, k)) < 0.3, b.rng.uniform(-1, 1, (n, k)), 0).astype(np.float32)
    return [b.c(value=a) for a in csr_from_dense(w)]


CASES.update(
    {
        "qlinear": [
            lambda b: b.op(
                "qlinear", b.x(2, 3, 64), *_qweight(b, 8, 64, 8, 64), b.c(8), bits=8, group_size=64, act="relu"
            ),
            lambda b: b.op(
                "qlinear", b.x(2, 3, 64), *_qweight(b, 8, 64, 4, 16), b.c(8), bits=4, group_size=16, act="gelu"
            ),
            lambda b: b.op("qlinear", b.x(5, 64), *_qweight(b, 8, 64, 4, 32, zeros=False), bits=4, group_size=32),
            lambda b: b.op(
                "qlinear", b.x(2, 3, 64), *_qweight(b, 8, 64, 8, 64), b.c(8), bits=8, group_size=64, act_quant="dynamic"
            ),
            lambda b: b.op(
                "qlinear",
                b.x(2, 3, 64),
                *_qweight(b, 8, 64, 8, 64),
                b.c(8),
                bits=8,
                group_size=64,
                act="gelu",
                act_quant="dynamic_tensor",
            ),
            lambda b: b.op(
                "qlinear",
                b.x(2, 3, 64),
                *_qweight(b, 8, 64, 8, 64),
                bits=8,
                group_size=64,
                act_quant="static",
                x_scale=0.02,
                x_zero_point=100,
            ),
        ],
        "qconv2d": [
            lambda b: b.op(
                "qconv2d",
                b.x(1, 4, 6, 6),
                *_qweight(b, 8, 36, 4, 36),
                b.c(8),
                bits=4,
                group_size=36,
                kernel=[3, 3],
                padding=[1, 1],
            ),
            lambda b: b.op(
                "qconv2d",
                b.x(1, 4, 6, 6),
                *_qweight(b, 8, 16, 8, 16),
                bits=8,
                group_size=16,
                kernel=[2, 2],
                stride=[2, 2],
            ),
        ],
        "qgather": [
            lambda b: b.op(
                "qgather", *_qweight(b, 10, 16, 8, 16), b.x(2, 3, dtype="int64", lo=0, hi=10), bits=8, group_size=16
            ),
            lambda b: b.op(
                "qgather", *_qweight(b, 10, 16, 4, 8), b.x(4, dtype="int64", lo=0, hi=10), bits=4, group_size=8
            ),
        ],
        "sparse_linear": [
            lambda b: b.op("sparse_linear", b.x(2, 3, 24), *_csr(b, 6, 24), b.c(6), in_features=24, act="relu"),
            lambda b: b.op("sparse_linear", b.x(4, 24), *_csr(b, 6, 24), in_features=24),
        ],
    }
)


def _compare(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        if w.dtype.kind in "biu":
            np.testing.assert_array_equal(g, w)
        else:
            scale = max(1.0, float(np.nanmax(np.abs(w))) if w.size else 1.0)
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale)


def _build(b: B, out) -> OnnxRuntimeArtifact:
    b.g.outputs = list(out) if isinstance(out, (list, tuple)) else [out]
    return OnnxRuntimeBackend().build(b.g, CPU)


def test_every_registry_op_has_a_lowering_and_a_case():
    lowered = {op for op, d in REGISTRY.items() if "onnxrt" in d.impls}
    unsupported = {op for op, d in REGISTRY.items() if "onnxrt" in d.unsupported}
    missing = sorted(op for op in REGISTRY if op not in lowered and op not in unsupported)
    assert not missing, f"ops without an ONNX lowering (add one, or declare opdef.not_on('onnxrt', why)): {missing}"
    untested = sorted(op for op in REGISTRY if op in lowered and op not in CASES)
    assert not untested, f"lowered ops without a test case in CASES: {untested}"


@pytest.mark.parametrize("op,k", [(op, k) for op, cases in CASES.items() for k in range(len(cases))])
def test_op_matches_interpreter(op, k):
    b = B()
    out = CASES[op][k](b)
    art = _build(b, out)
    assert op in {n.op for n in b.g.nodes}
    _compare(art.run(b.feeds), interpret(b.g, b.feeds))


# lowerings the ONNX frontend cannot read back: asymmetric pads (ceil_mode pools) have no IR form
_NO_ROUND_TRIP = {("max_pool2d", 3), ("avg_pool2d", 4)}
# token merging/pruning lower to TopK and Gather/ScatterElements, which have no IR form to import back to
_NO_ROUND_TRIP |= {(op, k) for op in ("token_merge", "token_prune", "grid_merge") for k in range(len(CASES[op]))}
# low-bit ops lower to MatMulNBits / integer matmuls / bit unpacking, which the ONNX frontend does not import
_NO_ROUND_TRIP |= {(op, k) for op in ("qlinear", "qconv2d", "qgather", "sparse_linear") for k in range(len(CASES[op]))}
# the decoder's ops lower to ORT's GroupQueryAttention and a decomposition: no ONNX op reads back as them
_NO_ROUND_TRIP |= {(op, k) for op in ("cached_attention", "attention_mass") for k in range(len(CASES[op]))}


@pytest.mark.parametrize(
    "op,k", [(op, k) for op, cases in CASES.items() for k in range(len(cases)) if (op, k) not in _NO_ROUND_TRIP]
)
def test_op_round_trips_through_the_onnx_frontend(op, k):
    """IR -> to_onnx -> import_onnx -> IR computes the same (checks both directions on every lowering)."""
    from nnforge.frontend.onnx import import_onnx

    b = B()
    out = CASES[op][k](b)
    b.g.outputs = list(out) if isinstance(out, (list, tuple)) else [out]
    back = import_onnx(to_onnx(b.g))
    _compare(interpret(back, b.feeds), interpret(b.g, b.feeds))


def test_model_is_valid_onnx_with_dim_params():
    g = Graph("sym")
    x = g.add_input("x", TensorType(("batch", "seq", 8)))
    g.outputs = [g.op("reshape", x, shape=["batch*seq", 8])]
    model = to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim[:2]] == ["batch", "seq"]
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch*seq"
    assert {o.version for o in model.opset_import} == {20}
    # one Shape per symbol, however many uses
    assert sum(n.op_type == "Shape" for n in model.graph.node) == 2


def _symbolic_graph() -> Graph:
    """A small attention block on f32[batch, seq, 8] using symbols in reshape/expand/slice/arange attributes."""
    rng = np.random.default_rng(1)
    c = lambda *s: g.add_constant(rng.standard_normal(s).astype("float32") * 0.3)
    g = Graph("symbolic")
    x = g.add_input("x", TensorType(("batch", "seq", 8)))
    pos = g.op("gather", c(32, 8), g.op("arange", end="seq"))
    h = g.op("add", x, pos)
    qkv = g.op("linear", h, c(24, 8), c(24))
    heads = []
    for i in range(3):
        part = g.op("slice", qkv, axis=2, start=8 * i, end=8 * (i + 1))
        heads.append(g.op("permute", g.op("reshape", part, shape=["batch", "seq", 2, 4]), perm=[0, 2, 1, 3]))
    att = g.op("sdpa", *heads, is_causal=True)
    y = g.op("reshape", g.op("permute", att, perm=[0, 2, 1, 3]), shape=["batch*seq", 8])
    y = g.op("reshape", g.op("linear", y, c(8, 8)), shape=["batch", "seq", 8])
    first = g.op("slice", y, axis=1, start=0, end="seq - 1")  # all but the last position
    bias = g.op("expand", g.op("reshape", c(8), shape=[1, 1, 8]), shape=["batch", "seq - 1", 8])
    g.outputs = [g.op("add", first, bias), g.op("full_like", x, value=0.5)]
    return g


def test_symbolic_shapes_run_at_two_sizes():
    g = _symbolic_graph()
    art = OnnxRuntimeBackend().build(g, CPU)
    rng = np.random.default_rng(2)
    for shape in [(2, 5, 8), (3, 11, 8)]:
        x = rng.standard_normal(shape).astype("float32")
        got = art.run([x])
        assert got[0].shape == (shape[0], shape[1] - 1, 8)
        _compare(got, interpret(g, [x]))


def test_symbol_expressions_in_attributes():
    g = Graph("expr")
    x = g.add_input("x", TensorType(("n", 6)))
    y = g.op("reshape", g.op("concat", x, x, axis=0), shape=["2*n", 3, 2])
    g.outputs = [g.op("slice", y, axis=0, start=1, end="(2*n)//3 + n % 2")]
    art = OnnxRuntimeBackend().build(g, CPU)
    for n in (4, 7):
        xs = np.arange(n * 6, dtype="float32").reshape(n, 6)
        _compare(art.run([xs]), interpret(g, [xs]))


def test_supports_lists_unsupported_nodes():
    g = Graph("bad")
    x = g.add_input("x", TensorType((1, 3, 7, 7)))
    pooled = g.op("adaptive_avg_pool2d", x, output_size=[3, 2])
    fake = Value("fake_out", TensorType((1, 3, 3, 2)))
    g.nodes.append(Node("no_such_op", [pooled], [fake], source="model.py:12"))
    g.outputs = [fake]
    bad = OnnxRuntimeBackend().supports(g, CPU)
    assert [(u.op, u.node) for u in bad] == [("adaptive_avg_pool2d", pooled.name), ("no_such_op", "fake_out")]
    assert "not divisible" in bad[0].reason and bad[1].source == "model.py:12"
    with pytest.raises(UnsupportedOpError) as e:
        to_onnx(g)
    assert "adaptive_avg_pool2d" in str(e.value) and "no_such_op" in str(e.value)


def test_ceil_mode_pool_onnx_cannot_match_is_reported():
    g = Graph("pool")
    x = g.add_input("x", TensorType((1, 2, 5, 5)))
    g.outputs = [g.op("avg_pool2d", x, kernel=[3, 3], stride=[3, 3], padding=[1, 1], ceil_mode=True)]
    (u,) = OnnxRuntimeBackend().supports(g, CPU)
    assert u.op == "avg_pool2d" and "count_include_pad" in u.reason


def _mlp() -> tuple[Graph, list[np.ndarray]]:
    b = B()
    x = b.g.add_input("x", TensorType(("batch", 6)))
    h = b.op("relu", b.op("linear", x, b.c(16, 6), b.c(16)))
    b.g.outputs = [b.op("softmax", b.op("linear", h, b.c(3, 16), b.c(3)))]
    return b.g, [b.rng.standard_normal((4, 6)).astype("float32")]


def test_save_and_load_round_trip(tmp_path):
    g, feeds = _mlp()
    art = get_backend("onnxrt").build(g, CPU, {"threads": 1})
    assert art.save_files(tmp_path) == ["model.onnx"]
    onnx.checker.check_model(onnx.load(tmp_path / "model.onnx"))
    back = OnnxRuntimeArtifact.load_files(tmp_path, g, CPU, {})
    np.testing.assert_array_equal(back.run(feeds)[0], art.run(feeds)[0])
    with pytest.raises(BundleError, match="model.onnx"):
        OnnxRuntimeArtifact.load_files(tmp_path / "missing", g, CPU, {})


def test_bad_inputs_get_clear_errors():
    g, feeds = _mlp()
    art = OnnxRuntimeBackend().build(g, CPU)
    with pytest.raises(NnforgeError, match="dtype"):
        art.run([feeds[0].astype("float64")])
    with pytest.raises(NnforgeError, match="expected 1 input"):
        art.run([])
    with pytest.raises(NnforgeError, match="opt_level"):
        OnnxRuntimeBackend().build(g, CPU, {"opt_level": "fastest"})


def test_graph_output_that_is_an_input_or_repeated():
    g = Graph("passthrough")
    x = g.add_input("x", TensorType((2, 3)))
    y = g.op("exp", x)
    g.outputs = [x, y, y]
    art = OnnxRuntimeBackend().build(g, CPU)
    xs = np.ones((2, 3), "float32")
    _compare(art.run([xs]), interpret(g, [xs]))


def test_wasm_builds_standard_onnx_and_runs_in_node(tmp_path):
    from toolchains import need

    g, feeds = _mlp()
    art = OnnxRuntimeBackend().build(g, get_target("wasm"))
    assert art.save_files(tmp_path) == ["model.onnx"]
    assert {o.domain for o in onnx.load(str(tmp_path / "model.onnx")).opset_import} == {""}  # no contrib ops
    need("node", "onnxruntime-web")
    for got, want in zip(art.run(feeds), interpret(g, feeds)):  # runs its bundle in Node
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cuda_without_gpu_provider_is_a_clear_error():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    g, _ = _mlp()
    with pytest.raises(NnforgeError, match="onnxruntime-gpu"):
        OnnxRuntimeBackend().build(g, get_target("cuda"))


def test_arm_target_is_refused():
    g, _ = _mlp()
    with pytest.raises(NnforgeError, match="arm"):
        OnnxRuntimeBackend().build(g, get_target("arm"))
    assert OnnxRuntimeBackend().supports(g, get_target("arm"))


# ---------------------------------------------------------------------------------------
# whole models: torch -> IR (torch frontend) -> ONNX Runtime, against eager PyTorch
# ---------------------------------------------------------------------------------------


def _resized_inputs(zm) -> tuple:
    """The zoo inputs at batch 3 (and sequence 11): the built session must take other sizes too."""
    import torch

    gen = torch.Generator().manual_seed(3)
    if zm.family in ("mlp", "cnn", "vit"):
        return (torch.randn((3,) + tuple(zm.inputs[0].shape[1:]), generator=gen),)
    ids = torch.randint(0, 100, (3, 11), generator=gen)
    mask = torch.ones(3, 11, dtype=torch.int64)
    mask[1, 6:] = 0
    return (ids,) if zm.family == "gpt" else (ids, mask)


@pytest.mark.parametrize("family", ["mlp", "cnn", "vit", "bert", "gpt"])
def test_zoo_family_from_torch_runs_on_onnxruntime(family):
    import torch

    import nnforge.frontend.torch as frontend
    from nnforge.models import zoo

    zm = zoo.build(family, "tiny")
    g = frontend.import_torch(zm.model, zm.inputs, zm.dynamic_shapes)
    art = OnnxRuntimeBackend().build(g, CPU)
    for inputs in (zm.inputs, _resized_inputs(zm)):
        with torch.no_grad():
            want = zm.model(*inputs).numpy()
        got = art.run([t.numpy() for t in inputs])[0]
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, float(np.max(np.abs(want))))


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive", "per_key_shared"])
def test_attention_uses_ort_fused_kernel_on_cpu(mask_kind):
    """On cpu the fused attention op lowers to com.microsoft MultiHeadAttention and still matches the interpreter.
    A float bias per key (ToMe's log token sizes; "additive" -1e4 padding) rides in one more head dim of q and k
    instead of a bias expanded over the queries."""
    from nnforge.backends.onnxrt import OnnxRuntimeBackend
    from nnforge.targets import get_target

    rng = np.random.default_rng(5)
    g = Graph("mha")
    q = g.add_input("q", TensorType(("batch", "seq", 32)))
    k = g.add_input("k", TensorType(("batch", "seq", 32)))
    v = g.add_input("v", TensorType(("batch", "seq", 32)))
    inputs = [rng.standard_normal((2, 6, 32)).astype(np.float32) for _ in range(3)]
    args = [q, k, v]
    if mask_kind in ("bool", "additive"):
        m = g.add_input("m", TensorType(("batch", 1, 1, "seq"), "bool" if mask_kind == "bool" else "float32"))
        args.append(m)
        keep = rng.random((2, 1, 1, 6)) > 0.3
        keep[..., 0] = True
        inputs.append(keep if mask_kind == "bool" else np.where(keep, 0.0, -1e4).astype(np.float32))
    if mask_kind == "per_key_shared":  # one row of log sizes for the whole batch
        args.append(g.add_input("m", TensorType((1, 1, 1, "seq"))))
        inputs.append(np.log(rng.integers(1, 6, (1, 1, 1, 6))).astype(np.float32))
    g.outputs = [g.op("attention", *args, num_heads=4, is_causal=mask_kind == "causal")]
    art = OnnxRuntimeBackend().build(g, get_target("cpu"))
    nodes = onnx.load_from_string(art.model_bytes).graph.node
    ops = {n.op_type for n in nodes}
    assert "MultiHeadAttention" in ops and "Softmax" not in ops
    (mha,) = [n for n in nodes if n.op_type == "MultiHeadAttention"]
    assert (len(mha.input) == 3) == (mask_kind != "bool"), list(mha.input)  # only the bool mask is a bias
    np.testing.assert_allclose(art.run(inputs)[0], interpret(g, inputs)[0], rtol=1e-4, atol=1e-5)


def test_pretransposed_weights_are_shipped_once():
    g = Graph("lin")
    x = g.add_input("x", TensorType(("batch", 8)))
    w = g.add_constant(np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32), "w")
    g.outputs = [g.op("linear", x, w)]
    model = to_onnx(g)
    assert len(model.graph.initializer) == 1  # the [in, out] copy only, not the original too


@pytest.mark.parametrize("after_relu", [True, False])
def test_max_pool_propagates_nan_and_inf_like_the_interpreter(after_relu):
    """ORT's MaxPool skips NaN and turns an all -Inf window finite; both lowerings keep the IR's answer."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 10, 10)).astype(np.float32)
    x[0, 0, 1, 1] = x[0, 1, 4, 7] = x[1, 2, 9, 9] = np.nan  # NaN at window edges, centres and the corner
    x[0, 2, 2, 3] = x[1, 0, 6, 0] = np.inf
    x[1, 1, 0:3, 0:3] = -np.inf  # an all -Inf window (relu turns it into zeros)
    g = Graph("pool")
    inp = g.add_input("x", TensorType.of(x))
    src = g.op("relu", inp) if after_relu else inp
    g.outputs = [g.op("max_pool2d", src, kernel=[3, 3], stride=[2, 2], padding=[1, 1])]
    art = OnnxRuntimeBackend().build(g, CPU)
    ops = [n.op_type for n in onnx.load_from_string(art.model_bytes).graph.node]
    assert ("IsNaN" not in ops and ops.count("Conv") == 2) if after_relu else "IsNaN" in ops
    got, want = art.run([x])[0], interpret(g, [x])[0]
    assert np.isnan(want).sum() >= 3 and np.isinf(want).any()
    np.testing.assert_array_equal(got, want)  # NaN positions and infinities included


@pytest.mark.parametrize("shared", [False, True])
def test_attention_on_one_qkv_projection_lowers_to_ort_attention(shared):
    """linear -> three slices -> attention becomes ORT's Attention (projection inside) unless a slice is read elsewhere."""
    rng = np.random.default_rng(6)
    g = Graph("qkv")
    x = g.add_input("x", TensorType(("batch", "seq", 16)))
    qkv = g.op(
        "linear",
        x,
        g.add_constant(rng.standard_normal((48, 16)).astype(np.float32) * 0.3),
        g.add_constant(rng.standard_normal(48).astype(np.float32)),
    )
    q, k, v = (g.op("slice", qkv, axis=-1, start=16 * i, end=16 * (i + 1)) for i in range(3))
    g.outputs = [g.op("attention", q, k, v, num_heads=4)] + ([g.op("exp", k)] if shared else [])
    art = OnnxRuntimeBackend().build(g, CPU)
    ops = [n.op_type for n in onnx.load_from_string(art.model_bytes).graph.node]
    assert ("MultiHeadAttention" in ops and "Attention" not in ops) if shared else ops == ["Attention"]
    feed = [rng.standard_normal((2, 7, 16)).astype(np.float32)]
    for got, want in zip(art.run(feed), interpret(g, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "op,shape,axes,keepdims",
    [
        ("reduce_mean", ("b", 5, 4, 16), [2], False),
        ("reduce_sum", ("b", 3, 2, 7), [1, -2], True),
        ("reduce_mean", (3, 4, "s"), [0], True),
    ],
)
def test_sums_over_a_few_outer_elements_are_split_and_summed(op, shape, axes, keepdims):
    """A sum or mean over at most 8 elements of outer axes (ToMe's keys averaged over heads) is Split + Sum,
    not ONNX Runtime's slow middle-axis reduction; same numbers as the interpreter, an inf stays where it is."""
    g = Graph("few")
    x = g.add_input("x", TensorType(shape))
    g.outputs = [g.op(op, x, axes=axes, keepdims=keepdims)]
    ops = {n.op_type for n in to_onnx(g).graph.node}
    assert "Sum" in ops and not ops & {"ReduceMean", "ReduceSum"}, ops
    a = np.random.default_rng(1).standard_normal([2 if d in ("b", "s") else d for d in shape]).astype(np.float32)
    a.flat[5] = np.inf
    got, want = get_backend("onnxrt").build(g, get_target("cpu")).run([a])[0], interpret(g, [a])[0]
    assert np.isinf(want).sum() == 1 and not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_per_key_bias_rides_in_a_head_dim_on_cpu_only():
    """The extra head dim (17 here) would take CUDA's attention off its fused kernels (multiples of 8): for
    cuda the per-key bias stays a bias input of MultiHeadAttention."""
    g = Graph("mha")
    q, k, v = (g.add_input(n, TensorType(("batch", "seq", 64))) for n in "qkv")
    m = g.add_input("m", TensorType(("batch", 1, 1, "seq")))
    g.outputs = [g.op("attention", q, k, v, m, num_heads=4)]
    for device, inputs in (("cpu", 3), ("cuda", 6)):
        (mha,) = [n for n in to_onnx(g, contrib=True, device=device).graph.node if n.op_type == "MultiHeadAttention"]
        assert len(mha.input) == inputs, (device, list(mha.input))
