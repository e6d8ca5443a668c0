"""The robust rules that judge updates by the aggregator's own labelled data (its root
data): zeno (the loss a step along each change removes there) and fltrust (trust by the
cosine to the server's own training on it), each against a direct numpy reference, and
their one-line errors."""
import numpy as np
import pytest

from broker_server.errors import RobustError
from broker_server.robust import rules
from broker_server.robust.options import RobustOptions, aggregate, parse_rule
from broker_server.strategies.aggregate import weighted_average
from tests.test_robust import SHAPES, close, one_line, updates

class QuadraticRoot:
    """Root data of a least-squares task: L(w) = mean((w - target)^2)."""

    def __init__(self, target: dict):
        self.target = target

    def loss(self, w: dict) -> float:
        return float(np.mean(np.concatenate([
            (w[k].astype(np.float64) - self.target[k]).ravel() ** 2 for k in SHAPES])))


def test_zeno_matches_reference():
    ref, target = updates(1, seed=3)[0], updates(1, seed=4)[0]
    ups, samples = updates(7, seed=5), [float(i + 1) for i in range(7)]
    root = QuadraticRoot(target)
    base = root.loss(ref)
    scores = [base - root.loss({k: ref[k] + 0.5 * (u[k] - ref[k]) for k in SHAPES})
              for u in ups]
    keep = sorted(int(i) for i in np.argsort(scores)[2:])  # drop the b = 2 lowest
    out, info = aggregate(parse_rule("zeno:2:0.5"), ups, ref, samples, root=root)
    assert list(info.chosen) == keep and info.rule == "zeno:2:0.5"
    assert close(out, weighted_average([(ups[i], samples[i]) for i in keep]), 1e-5)
    assert parse_rule("zeno:3") == RobustOptions("zeno", f=3, step=0.1)


@pytest.mark.parametrize("opts,devices,words", [
    (RobustOptions("zeno", f=7), 7, "b must be in [0, n - 1] = [0, 6], got 7"),
    (RobustOptions("zeno", f=1, step=0.0), 7, "step must be in (0, 1]"),
])
def test_zeno_bad_choices_are_one_line_errors(opts, devices, words):
    with pytest.raises(RobustError) as e:
        opts.check(devices)
    assert words in one_line(e)


def test_zeno_without_root_data_is_a_one_line_error():
    with pytest.raises(RobustError) as e:
        aggregate(parse_rule("zeno:1"), updates(4), updates(1)[0])
    assert "needs labelled data on the aggregator" in one_line(e)


class StepRoot(QuadraticRoot):
    """... whose local training is one gradient step of size 0.5 towards the target."""

    def update(self, w: dict) -> dict:
        return {k: w[k] + 0.5 * (self.target[k] - w[k]) for k in w}


def fltrust_reference(changes: list[np.ndarray], g0: np.ndarray, stats: np.ndarray,
                      size: str) -> np.ndarray:
    """FLTrust one device at a time: trust = max(0, cos) over the trained columns, each
    change sized (all of it down to the median norm; or its trained columns to |g0|),
    the trust-weighted mean."""
    t = ~stats
    norms = [float(np.sqrt(np.sum(c[t] ** 2))) for c in changes]
    whole = sorted(float(np.sqrt(np.sum(c ** 2))) for c in changes)
    n0 = float(np.sqrt(np.sum(g0[t] ** 2)))
    med = whole[len(whole) // 2] if len(whole) % 2 else \
        (whole[len(whole) // 2 - 1] + whole[len(whole) // 2]) / 2
    out, total = np.zeros_like(g0), 0.0
    for c, nc in zip(changes, norms):
        trust = max(0.0, float(np.dot(c[t], g0[t])) / (nc * n0))
        if size == "server":
            out += trust * np.where(t, c * n0 / nc, c)
        else:
            out += trust * c * min(1.0, med / float(np.sqrt(np.sum(c ** 2))))
        total += trust
    return out / total


@pytest.mark.parametrize("size", ["clip", "server"])
def test_fltrust_matches_reference(size):
    rng = np.random.default_rng(11)
    g0 = rng.normal(size=12)
    changes = [g0 * rng.uniform(0.2, 3) + rng.normal(size=12) for _ in range(6)]
    changes += [-3 * g0, -g0 + 0.1 * rng.normal(size=12)]  # reversed: trust 0
    stats = np.zeros(12, bool)
    stats[-3:] = True
    out, trust = rules.fltrust_rows(np.stack(changes), g0, stats, size)
    assert trust[-2:].tolist() == [0.0, 0.0] and (trust[:6] > 0).all()
    assert np.allclose(out, fltrust_reference(changes, g0, stats, size), atol=1e-12)


def test_fltrust_aggregate_trains_on_the_root_data_and_drops_reversed_changes():
    ref, target = updates(1, seed=3)[0], updates(1, seed=4)[0]
    honest = [{k: ref[k] + (0.3 + 0.1 * i) * (target[k] - ref[k]) for k in SHAPES}
              for i in range(5)]
    reversed_ = [{k: ref[k] - 4 * (target[k] - ref[k]) for k in SHAPES} for _ in range(2)]
    out, info = aggregate(parse_rule("fltrust"), reversed_ + honest, ref,
                          root=StepRoot(target))
    assert info.rule == "fltrust:clip" and list(info.chosen) == [2, 3, 4, 5, 6]
    root = StepRoot(target)
    assert root.loss(out) < root.loss(ref)  # the reversed changes did not walk it back
    with pytest.raises(RobustError) as e:
        aggregate(parse_rule("fltrust"), honest, ref)
    assert "needs labelled data on the aggregator" in one_line(e)
    with pytest.raises(RobustError) as e:
        parse_rule("fltrust:huge").check(5)
    assert "size must be one of clip, server, got 'huge'" in one_line(e)
    with pytest.raises(RobustError) as e:  # a root set the model cannot learn from
        aggregate(parse_rule("fltrust"), honest, ref, root=StepRoot(ref))
    assert "server's own change has norm 0.0" in one_line(e)
