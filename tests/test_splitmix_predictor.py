"""SplitMix bases on the device: exported one artifact per base, all loaded once, the
size chosen at inference by number, latency or memory, and `fedge infer --bases`."""
from __future__ import annotations

import numpy as np
import pytest

from device_runtime.errors import EXIT_USAGE, BudgetError
from device_runtime.predictor import Predictor
from device_runtime.session import run
from tests.conftest import assert_one_line_error, run_fedge

# Trains and exports a SplitMix ensemble (12 s): CI, not the quick loop.
pytestmark = pytest.mark.slow

DEVICE = "jetson-orin-nano"
M = 4


@pytest.fixture(scope="module")
def bases_export(tmp_path_factory, mnist1d):
    """A 4-base SplitMix ensemble (cnn1d at width 1/4), briefly trained, exported."""
    import torch

    from device_runtime.training.local import LocalTrainOptions
    from device_runtime.training.splitmix import train_bases
    from toolkit.model import checkpoint, datasets, zoo
    from toolkit.planning.fleet import ExportOptions, export_fleet
    from toolkit.planning.profiles import ProfileCatalogue
    from toolkit.strategies.server.splitmix import splitmix_config

    ds = mnist1d
    cfg = splitmix_config(zoo.make_config("cnn", ds.sample_shape, 10, 1.0,
                                          float(np.mean(ds.x_train)), float(np.std(ds.x_train))),
                          1 / M)
    torch.manual_seed(0)
    model = zoo.build_model(cfg)
    train_bases(model, ds.x_train, ds.y_train, LocalTrainOptions(epochs=2, lr=0.05))
    ck = checkpoint.Checkpoint(cfg, model, dataset=datasets.DatasetSpec("mnist1d"))
    path = tmp_path_factory.mktemp("sm") / "sm.safetensors"
    checkpoint.save(ck, path)
    out = tmp_path_factory.mktemp("smexport") / "fleet"
    profiles = [ProfileCatalogue.load().get(DEVICE)]
    # int8 bases are exported the same way; their parity is not this test's subject.
    return export_fleet(checkpoint.load(path), profiles, out, ds, ExportOptions(int8=False))


@pytest.fixture(scope="module")
def bases(bases_export) -> Predictor:
    return Predictor.from_manifest(bases_export, DEVICE)


def test_every_base_is_its_own_artifact_and_all_are_loaded(bases):
    assert [a.role for a in bases.artifacts] == ["base"] * M
    assert [a.index for a in bases.artifacts] == list(range(M))
    assert bases.active == M and len(bases.base_ms) == M and len(bases.base_mb) == M


def test_k_bases_output_the_mean_of_those_bases_logits(bases, mnist1d):
    x = mnist1d.x_test[:64]
    each = [run(s, x) for s in bases.sessions]
    accs = []
    for k in range(1, M + 1):
        assert bases.set_budget(bases=k) == k
        np.testing.assert_allclose(bases.predict_logits(x), np.mean(each[:k], axis=0),
                                   rtol=1e-5, atol=1e-5)
        accs.append(float((bases.predict(mnist1d.x_test) == mnist1d.y_test).mean()))
    assert accs[-1] >= accs[0]


def test_latency_and_memory_budgets_pick_the_most_bases_that_fit(bases):
    ms, mb = np.cumsum(bases.base_ms), np.cumsum(bases.base_mb)
    assert bases.set_budget(ms=float(ms[1]) * 1.0001) == 2
    assert bases.set_budget(ms=1e9) == M
    assert bases.set_budget(mb=float(mb[2]) * 1.0001) == 3
    assert bases.set_budget(mb=float(mb[0])) == 1


@pytest.mark.parametrize("kwargs,match", [
    ({"bases": 0}, r"bases: expected an int in 1\.\.4"),
    ({"bases": -1}, r"bases: expected an int in 1\.\.4"),
    ({"bases": M + 1}, r"bases: expected an int in 1\.\.4 \(device jetson-orin-nano holds 4"),
    ({"ms": -5.0}, "ms: expected a positive number"),
    ({"ms": 0}, "ms: expected a positive number"),
    ({"mb": float("nan")}, "mb: expected a positive number"),
    ({"ms": 1e-9}, "ms: 1e-09 is below what the smallest model needs"),
    ({}, "budget: expected exactly one of bases, ms, mb, got none"),
    ({"bases": 2, "ms": 3.0}, "budget: expected exactly one of bases, ms, mb, got bases, ms")])
def test_bad_budgets_are_refused_and_change_nothing(bases, kwargs, match):
    bases.set_budget(bases=3)
    with pytest.raises(BudgetError, match=match):
        bases.set_budget(**kwargs)
    assert bases.active == 3


def test_fedge_infer_takes_a_number_of_bases(bases_export, mnist1d, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, mnist1d.x_test[:50])
    code, out, err = run_fedge("infer", "--manifest", str(bases_export), "--device", DEVICE,
                               "--input", str(x), "--bases", "2", "--no-verify")
    assert code == 0, err
    assert "2 of 4 bases" in out
    code, _, err = run_fedge("infer", "--manifest", str(bases_export), "--device", DEVICE,
                             "--input", str(x), "--bases", "9", "--no-verify")
    assert_one_line_error(code, err, EXIT_USAGE, "bases: expected an int in 1..4")
