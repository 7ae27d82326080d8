"""Accuracy-budgeted search over token merging, pruning and layer skipping."""
from __future__ import annotations

import numpy as np
import pytest

from digits_vit import accuracy, digits_vit
from nnforge.errors import NnforgeError
from nnforge.ir import interpret
from nnforge.passes.budget import (Budget, Setting, build, cosine_quality, default_space, flops, flop_time, plot_pareto,
                                   quality_drop, search, top1_quality)

# a small search space keeps the suite quick; default_space is tested on its own
SPACE = dict(merge_r=[0, 2, 3], prune_keep=[1.0, 0.7], skip=[0, 1])


def _split():
    d = digits_vit()
    calibration = d.batches(d.x_test[:200])  # unseen in training, like the held-out batches, and apart from them
    heldout = d.batches(d.x_test[200:])
    return d, calibration, heldout


def _outputs(graph, batches):
    return [interpret(graph, b)[0] for b in batches]


def test_cosine_budget_is_honoured_on_held_out_data():
    d, cal, held = _split()
    budget = Budget(metric="cosine", max_drop=0.01, **SPACE)
    res = search(d.graph, budget, cal, held, time_fn=flop_time(cal[0]))
    assert not res.setting.lossless and res.speedup > 1.2
    # re-measure independently on the held-out batches
    drop = quality_drop(cosine_quality, _outputs(res.graph, held), _outputs(d.graph, held))
    assert drop == pytest.approx(res.drop) and drop <= 0.01
    assert "held-out drop" in res.report() and str(res.setting) in res.report()
    measured = [c for c in res.candidates if c.evaluated]
    assert measured and all(c.heldout_drop is None or c.seconds is not None for c in res.candidates)


def test_accuracy_budget_with_a_callable_metric():
    d, cal, held = _split()
    labels = d.y_test[200:]

    def acc(outputs, reference):  # quality on real labels (the held-out batches, concatenated in order)
        return accuracy(outputs, labels) if len(outputs) == len(labels) else top1_quality(outputs, reference)

    res = search(d.graph, Budget(metric=acc, max_drop=0.01, **SPACE), cal, held, time_fn=flop_time(cal[0]))
    base = accuracy(np.concatenate(_outputs(d.graph, held)), labels)
    got = accuracy(np.concatenate(_outputs(res.graph, held)), labels)
    assert base - got <= 0.01 and res.speedup >= 1.0


def test_a_zero_budget_keeps_quality_exactly():
    d, cal, held = _split()
    res = search(d.graph, Budget(metric="top1", max_drop=0.0, **SPACE), cal, held, time_fn=flop_time(cal[0]))
    assert res.drop <= 0.0
    ref = np.concatenate(_outputs(d.graph, held)).argmax(-1)
    assert (np.concatenate(_outputs(res.graph, held)).argmax(-1) == ref).all()


def test_lossless_setting_and_flops_shrink():
    d, cal, _ = _split()
    assert Setting().lossless and Setting().passes() == []
    same = build(d.graph, Setting(), cal)
    np.testing.assert_array_equal(interpret(same, cal[0])[0], interpret(d.graph, cal[0])[0])
    base = flops(d.graph, cal[0])
    merged = flops(build(d.graph, Setting(merge_r=3), cal), cal[0])
    skipped = flops(build(d.graph, Setting(skip=1), cal), cal[0])
    assert merged < base and skipped < base
    assert Setting(3, 0.7, 1).dominates(Setting(2, 1.0, 0)) and not Setting(3, 1.0, 0).dominates(Setting(2, 0.7, 0))


def test_default_space_and_pareto_plot(tmp_path):
    d, cal, held = _split()
    rs, keeps, skips = default_space(d.graph, Budget(), cal[0])
    assert rs[0] == 0 and max(rs) * 4 <= 16 and keeps[0] == 1.0 and skips == [0, 1, 2]
    res = search(d.graph, Budget(max_drop=0.02, merge_r=[0, 3], prune_keep=[1.0], skip=[0, 1]), cal, held,
                 time_fn=flop_time(cal[0]), progress=True)
    path = tmp_path / "pareto.png"
    plot_pareto(res, path)
    assert path.stat().st_size > 1000


def test_budget_needs_both_data_sets():
    d, cal, _ = _split()
    with pytest.raises(NnforgeError, match="held-out"):
        search(d.graph, Budget(), cal, [])
    with pytest.raises(NnforgeError, match="metric must be"):
        search(d.graph, Budget(metric="bleu"), cal, cal)
