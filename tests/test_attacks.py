"""toolkit.sim.attacks: each attack does what it says, and each is contained by the rule
meant for it (broker_server.robust) on synthetic updates: 20 honest updates around a
true change, 4 attackers; the rule's aggregate stays within a small distance of the
honest mean while FedAvg's does not."""
import numpy as np
import pytest

from broker_server.robust import clipping, rules
from toolkit.errors import UsageError
from toolkit.sim import attacks

SHAPES = {"w": (10, 8), "b": (20,)}
SIGMA, HONEST, BAD = 0.2, 20, 4


def flat(w: dict) -> np.ndarray:
    return np.concatenate([np.asarray(w[k], np.float64).ravel() for k in SHAPES])


def round_(seed: int = 0):
    """(rng, reference, true change, 24 honest updates: reference + change + noise)."""
    rng = np.random.default_rng(seed)
    ref = {k: rng.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()}
    mu = {k: rng.normal(0, 1, s) for k, s in SHAPES.items()}
    ups = [{k: (ref[k] + mu[k] + rng.normal(0, SIGMA, s)).astype(np.float32)
            for k, s in SHAPES.items()} for _ in range(HONEST + BAD)]
    return rng, ref, mu, ups


def distances(poisoned: list[dict], honest: list[dict], **aggregates) -> dict:
    """||aggregate - honest mean|| per named aggregate of ``poisoned``, with the honest
    spread (mean distance of an honest update to the honest mean) as the scale."""
    hm = flat(rules.mean(honest))
    out = {name: float(np.linalg.norm(flat(fn(poisoned)) - hm)) for name, fn in aggregates.items()}
    out["fedavg"] = float(np.linalg.norm(flat(rules.mean(poisoned)) - hm))
    out["spread"] = float(np.mean([np.linalg.norm(flat(u) - hm) for u in honest]))
    return out


def contained(d: dict, rule: str) -> None:
    assert d[rule] < 0.4 * d["spread"], d  # small: under half an honest update's spread
    assert d["fedavg"] > d["spread"] > 2.5 * d[rule], d


def test_model_replacement_replaces_fedavg_and_median_contains_it():
    _, ref, mu, ups = round_(1)
    target = {k: ref[k] - 3 * mu[k] for k in SHAPES}
    one = attacks.model_replacement(ref, target, attacks.replacement_boost(len(ups)))
    cancel = [one] + [ref] * (len(ups) - 1)  # honest changes that cancel: the model is target
    assert np.allclose(flat(rules.mean(cancel)), flat(target), atol=1e-4)
    p = attacks.poison("replace", ups, ref, BAD, np.random.default_rng(0), target=target)
    d = distances(p, ups[BAD:], median=rules.median,
                  clip=lambda u: clipping.clipped_mean(u, ref, quantile=0.5))
    contained(d, "median")
    assert d["clip"] < 0.05 * d["fedavg"]  # clipping cuts a boosted update to honest size


def test_sign_flip_reverses_the_change_and_trimmed_mean_contains_it():
    rng, ref, _, ups = round_(2)
    flipped = attacks.sign_flip(ref, ups[0], scale=2.0)
    assert np.allclose(flat(flipped) - flat(ref), -2 * (flat(ups[0]) - flat(ref)), atol=1e-5)
    p = attacks.poison("signflip", ups, ref, BAD, rng)
    contained(distances(p, ups[BAD:], trimmed=lambda u: rules.trimmed_mean(u, 0.2)), "trimmed")


def test_large_norm_noise_and_krum_drops_it():
    rng, ref, _, ups = round_(3)
    bad = attacks.large_norm_noise(ref, 10.0, rng)
    assert np.std(flat(bad) - flat(ref)) == pytest.approx(10.0, rel=0.2)
    p = attacks.poison("noise", ups, ref, BAD, rng)
    assert set(rules.krum_select(p, BAD, HONEST)) == set(range(BAD, HONEST + BAD))
    contained(distances(p, ups[BAD:], krum=lambda u: rules.multi_krum(u, BAD, HONEST)), "krum")


def test_little_is_enough_stays_within_the_honest_spread():
    rng, ref, _, ups = round_(4)
    n = HONEST + BAD
    z = attacks.lie_z(n, BAD)
    s = n // 2 + 1 - BAD  # Baruch et al.: s = floor(n/2 + 1) - f, z = Phi^-1((n - s) / n)
    assert z == pytest.approx(0.3186, abs=1e-3) and (n - s) / n == pytest.approx(0.625)
    p = attacks.poison("lie", ups, ref, BAD, rng)
    x = np.stack([flat(u) for u in ups])
    assert np.allclose(flat(p[0]), x.mean(0) + z * x.std(0), atol=1e-5)
    assert all(flat(p[i]).tolist() == flat(p[0]).tolist() for i in range(BAD))
    # its premise: Krum, picking the most central update, picks an attacker
    assert rules.krum_select(p, BAD)[0] < BAD
    # no rule removes it; each bounds it to about z honest std's per coordinate
    bound = z * SIGMA * np.sqrt(x.shape[1])
    d = distances(p, ups[BAD:], median=rules.median,
                  trimmed=lambda u: rules.trimmed_mean(u, 0.2))
    assert d["median"] < 1.2 * bound and d["trimmed"] < bound and d["fedavg"] < bound, d


def test_label_flip():
    x, y = np.arange(12.0).reshape(6, 2), np.array([0, 1, 2, 3, 4, 9])
    fx, fy = attacks.label_flip(x, y, 10)
    assert fx is x and fy.tolist() == [9, 8, 7, 6, 5, 0] and fy.dtype == y.dtype
    _, my = attacks.label_flip(x, y, 10, mapping={1: 7, 9: 1})
    assert my.tolist() == [0, 7, 2, 3, 4, 1] and y.tolist() == [0, 1, 2, 3, 4, 9]


def local_step(w: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float = 0.5) -> dict:
    """One softmax-regression gradient step: the honest training a device runs."""
    logits = x @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return {"w": (w - lr * x.T @ p / len(y)).astype(np.float32)}


def test_label_flipped_devices_are_contained_by_the_median():
    rng = np.random.default_rng(5)
    classes, dim = 4, 6
    centres = rng.normal(0, 2, (classes, dim))
    w0 = np.zeros((dim, classes))
    ups = []
    for i in range(HONEST + BAD):
        y = rng.integers(0, classes, 200)
        x = centres[y] + rng.normal(0, 1, (200, dim))
        if i < BAD:
            x, y = attacks.label_flip(x, y, classes)
        ups.append(local_step(w0, x, y))
    hm = flat_w(rules.mean(ups[BAD:]))
    dist = lambda w: float(np.linalg.norm(flat_w(w) - hm))
    contained({"median": dist(rules.median(ups)), "fedavg": dist(rules.mean(ups)),
               "spread": float(np.mean([dist(u) for u in ups[BAD:]]))}, "median")


class SoftmaxRoot:
    """Root data the server holds, drawn like the honest devices' (zeno's loss)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def loss(self, w: dict) -> float:
        z = self.x @ np.asarray(w["w"], np.float64)
        z -= z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(self.y)), self.y]))

    def update(self, w: dict) -> dict:
        return local_step(np.asarray(w["w"], np.float64), self.x, self.y)


@pytest.mark.parametrize("rule", ["zeno", "fltrust"])
@pytest.mark.parametrize("attack", ["labelflip", "signflip"])
def test_label_and_sign_flippers_are_dropped_by_root_data_rules(attack, rule):
    """Both look like honest updates one by one (median and Krum keep some); a step
    along them raises the loss on the server's own data, so zeno drops exactly them,
    and they point away from the server's own training on it, so fltrust gives them
    no trust."""
    from broker_server.robust.options import aggregate, parse_rule

    rng = np.random.default_rng(6)
    classes, dim = 4, 6
    centres = rng.normal(0, 2, (classes, dim))

    def data(n: int):
        y = rng.integers(0, classes, n)
        return centres[y] + rng.normal(0, 1, (n, dim)), y
    w0 = {"w": np.zeros((dim, classes), np.float32)}
    ups = []
    for i in range(HONEST + BAD):
        x, y = data(200)
        if i < BAD and attack == "labelflip":
            x, y = attacks.label_flip(x, y, classes)
        ups.append(local_step(w0["w"], x, y))
    if attack == "signflip":
        ups[:BAD] = [attacks.sign_flip(w0, u) for u in ups[:BAD]]
    name = f"zeno:{BAD}" if rule == "zeno" else rule
    out, info = aggregate(parse_rule(name), ups, w0, root=SoftmaxRoot(*data(100)))
    assert list(info.chosen) == list(range(BAD, HONEST + BAD))
    hm = flat_w(rules.mean(ups[BAD:]))
    dist = lambda w: float(np.linalg.norm(flat_w(w) - hm))
    contained({rule: dist(out), "fedavg": dist(rules.mean(ups)),
               "spread": float(np.mean([dist(u) for u in ups[BAD:]]))}, rule)


def flat_w(w: dict) -> np.ndarray:
    return np.asarray(w["w"], np.float64).ravel()


def test_poison_errors_name_the_choice():
    rng, ref, _, ups = round_(0)
    with pytest.raises(UsageError) as e:
        attacks.poison("backdoor", ups, ref, 2, rng)
    assert "valid: replace, signflip, noise, lie" in str(e.value)
    with pytest.raises(UsageError):
        attacks.poison("noise", ups, ref, 30, rng)
    assert attacks.poison("noise", ups, ref, 0, rng) == ups
