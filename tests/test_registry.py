"""The op registry is complete: every op has its reference, a torch implementation, and for each backend
either a lowering or an explicit reason it does not run there; every op lives in one family module."""

import inspect

import pytest

from nnforge.ir.graph import TensorType
from nnforge.ir.registry import BACKENDS, REGISTRY, OpError, defop


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_op_is_declared_completely_in_its_family_module(name):
    opdef = REGISTRY[name]
    assert callable(opdef.ref) and callable(opdef.infer), name
    assert opdef.doc or opdef.ref.__doc__ or name in {"add", "sub", "mul", "maximum", "minimum"}, name
    for backend in BACKENDS:
        has = backend in opdef.impls
        why = opdef.unsupported.get(backend)
        assert has != bool(why), f"{name} on {backend}: give a lowering or a reason (not both, not neither)"
    # the op's reference and implementations sit side by side in one module under nnforge/ops
    family = inspect.getmodule(opdef.ref).__name__
    assert family.startswith("nnforge.ops."), f"{name} is declared in {family}, not in an op family module"
    for backend, fn in opdef.impls.items():
        assert inspect.getmodule(fn).__name__ == family, f"{name}'s {backend} lowering lives outside {family}"


def test_every_implementation_takes_the_one_signature():
    """fn(cx, *inputs, **attrs): the context first, then the inputs; attributes by keyword."""
    for name, opdef in REGISTRY.items():
        for backend, fn in opdef.impls.items():
            params = list(inspect.signature(fn).parameters.values())
            assert params and params[0].kind == params[0].POSITIONAL_OR_KEYWORD, (name, backend)
            takes = {p.name for p in params}
            has_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
            missing = set(opdef.attrs) - takes
            assert has_kwargs or not missing, (
                f"{name}'s {backend} lowering does not take attribute(s) {sorted(missing)}"
            )


def test_an_op_cannot_be_declared_twice():
    with pytest.raises(OpError, match="declared twice"):
        defop("add", lambda ts, a: [ts[0]], ref=lambda a, b: a + b)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        REGISTRY["add"].implement("cuda-magic", lambda cx, a, b: a)


def test_support_problem_names_the_reason():
    from nnforge.ir import Graph

    g = Graph("g")
    x = g.add_input("x", TensorType(("n", 4)))
    node = g.add_node("layer_norm", [x])
    assert "static" in REGISTRY["layer_norm"].problem("onnxrt", node)  # no weight and a symbolic axis
    assert REGISTRY["layer_norm"].problem("tvm", node) is None
