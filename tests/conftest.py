"""Shared fixtures: real MNIST-1D, a real trained checkpoint, a real fleet export.

Helpers shared with bench/ (brokers, field processes, the time scale) live in testkit/.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import ROOT
from testkit.timing import scaled

EXPORT_JOB = "j1"  # the job fleet_export is made for: devices running another refuse it
# every kind of artifact (pruned, split head/tail, opset 15, ORT format); rpi5 would add
# only another pruned fp32/int8 pair, at a sixth of the fixture's time
FLEET_PROFILES = ("rpi3b", "rpi4", "jetson-nano", "jetson-orin-nano", "android-mid")


def pytest_report_header(config) -> str:
    """The time scale in the header, so a slow run's limits can be read off its log."""
    from testkit.timing import ENV, time_scale

    return f"fedge: time limits x{time_scale():.2f} ({ENV} or the load average per CPU)"


@pytest.fixture(scope="session", autouse=True)
def fedge_home(tmp_path_factory):
    """FEDGE_HOME in a temp folder for the whole session, so that no test writes a key
    to the real home; subprocesses (run_fedge, field helpers) inherit it."""
    home = tmp_path_factory.mktemp("fedge-home")
    old = os.environ.get("FEDGE_HOME")
    os.environ["FEDGE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("FEDGE_HOME", None)
    else:
        os.environ["FEDGE_HOME"] = old


@pytest.fixture(scope="session", autouse=True)
def strategy_rules():
    """Every strategy's rule known to the aggregator by name, as ``fedge serve`` makes it
    (tests build ``broker_server`` aggregators directly)."""
    from toolkit import strategies

    strategies.register_rules()


@pytest.fixture(scope="session")
def export_key(fedge_home):
    """The session's default signing key (``toolkit.deploy.signing.SigningKey``)."""
    from toolkit.deploy.signing import ensure_key

    return ensure_key()


@pytest.fixture
def mosquitto(tmp_path):
    """A real Mosquitto on a free port, for one test."""
    from testkit.brokers import Mosquitto

    m = Mosquitto(tmp_path / "mosq").start()
    yield m
    m.stop()


@pytest.fixture(scope="session")
def mnist1d():
    from toolkit.model.datasets import load_mnist1d

    return load_mnist1d()


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory, mnist1d):
    """A cnn1d trained on MNIST-1D (short schedule: 6 epochs, 0.974 test accuracy; 15
    gave 0.979 at 2.5x the time, which every test that exports waited for)."""
    import numpy as np
    import torch

    from toolkit.model import checkpoint, datasets, train, zoo

    ds = mnist1d
    cfg = zoo.make_config("cnn", ds.sample_shape, 10, 1.0, float(np.mean(ds.x_train)),
                          float(np.std(ds.x_train)))
    torch.manual_seed(0)
    model = zoo.build_model(cfg)
    train.train(model, ds.x_train, ds.y_train, train.TrainOptions(epochs=6, seed=0))
    acc = train.accuracy(model, ds.x_test, ds.y_test)
    path = tmp_path_factory.mktemp("ckpt") / "cnn.safetensors"
    checkpoint.save(checkpoint.Checkpoint(cfg, model, dataset=datasets.DatasetSpec("mnist1d"),
                                          metrics={"test_accuracy": acc}), path)
    return path


@pytest.fixture(scope="session")
def fleet_export(tmp_path_factory, trained_ckpt, mnist1d, export_key):
    """The built-in profiles the tests read (FLEET_PROFILES) exported from the trained
    checkpoint for job EXPORT_JOB (version 1), signed by export_key."""
    from toolkit.model import checkpoint
    from toolkit.planning.fleet import ExportOptions, export_fleet
    from toolkit.planning.profiles import ProfileCatalogue

    out = tmp_path_factory.mktemp("export") / "fleet"
    profiles = ProfileCatalogue.load().select(",".join(FLEET_PROFILES))
    return export_fleet(checkpoint.load(trained_ckpt), profiles, out, mnist1d,
                        ExportOptions(finetune_epochs=3, signing_key=export_key.path,
                                      job=EXPORT_JOB))


def run_fedge(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run the real ``fedge`` entry point in a subprocess (exit code, stdout, stderr)."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    p = subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True,
                       text=True, cwd=cwd or ROOT, env=full_env, timeout=scaled(600))
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(code: int, stderr: str, expected_code: int, *needles: str):
    """A user mistake: the expected exit code, one line on stderr, no traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == expected_code, (code, stderr)
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
