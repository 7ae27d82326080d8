"""nnforge.check: eager, the interpreter and both CPU backends agree on all five families."""

import pytest

import nnforge
from nnforge.models import zoo


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_differential_check_on_every_family(family):
    zm = zoo.build(family, "tiny")
    report = nnforge.check(zm.model, zm.inputs, targets=["cpu"], dynamic_shapes=zm.dynamic_shapes)
    runners = [r.runner for r in report.rows]
    assert runners == ["eager torch", "interpreter (imported)", "interpreter (O2)", "onnxrt on cpu", "tvm on cpu"]
    assert report.ok, str(report)
    assert all(not r.failure for r in report.rows)
    text = str(report)
    assert "tvm on cpu" in text and "ok" in text


def test_check_reports_a_failing_runner_instead_of_aborting():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here, so the cuda runner does not fail")
    zm = zoo.build("mlp", "tiny")
    report = nnforge.check(zm.model, zm.inputs, targets=["cuda"], backends=["onnxrt"])
    row = report.rows[-1]
    assert row.runner == "onnxrt on cuda" and row.failure  # no onnxruntime-gpu / GPU here
    assert not report.ok and "failed:" in str(report)
