"""Helpers for the field-loop tests and benches: real `fedge serve` / `fedge device` processes.

The waits here (a device's idle timeout, ``finish``, ``wait_for``) are upper bounds and
are multiplied by ``testkit.timing.time_scale()``; a round timeout is the caller's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from testkit import ROOT
from testkit.timing import scaled


def prepare_job(work: Path, devices: int, seed: int = 0) -> Path:
    """Partition MNIST-1D and write an untrained checkpoint; returns the checkpoint."""
    import numpy as np
    import torch

    from toolkit.model import checkpoint, datasets, zoo
    from toolkit.model.partition import write_partition

    ds = datasets.load_mnist1d()
    write_partition(ds, work / "data", devices, seed, 0.5)
    cfg = zoo.make_config("cnn", ds.sample_shape, 10, 0.5, float(np.mean(ds.x_train)),
                          float(np.std(ds.x_train)))
    torch.manual_seed(seed)
    path = work / "init.safetensors"
    checkpoint.save(checkpoint.Checkpoint(cfg, zoo.build_model(cfg),
                                          dataset=datasets.DatasetSpec("mnist1d")), path)
    fleet_keys(work, devices)
    return path


def fleet_keys(work: Path, devices: int):
    """The keys fedge secure init would issue for dev-0 .. dev-<devices-1> (work/keys)."""
    from toolkit.field.fleet_keys import FleetKeyFiles, write_fleet_keys

    out = work / "keys"
    if (out / "registry.json").exists():
        return FleetKeyFiles(out, out / "server.key", out / "server.pub", out / "registry.json")
    return write_fleet_keys(out, [f"dev-{k}" for k in range(devices)])


def device_keys(work: Path, device: str) -> list[str]:
    """A device's key options (a process given --credentials takes its keys from them)."""
    return ["--key", str(work / "keys" / f"{device}.key"),
            "--trust", str(work / "keys" / "server.pub")]


def server_keys(work: Path) -> list[str]:
    return ["--signing-key", str(work / "keys" / "server.key"),
            "--registry", str(work / "keys" / "registry.json")]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def start_device(url: str, job: str, work: Path, k: int, profile: str = "rpi4",
                 extra: list[str] = (), env: dict | None = None) -> subprocess.Popen:
    """``env``: more environment for the process (e.g. its own FEDGE_HOME)."""
    log = open(work / f"device-{k}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "toolkit", "device", "--broker", url, "--job", job,
         "--id", f"dev-{k}", "--profile", profile, "--data",
         str(work / "data" / f"device-{k}.npz"), "--idle-timeout", f"{scaled(120):g}",
         *([] if {"--key", "--credentials", "--config"} & set(extra)
           else device_keys(work, f"dev-{k}")), *extra],
        stdout=log, stderr=subprocess.STDOUT, env={**_env(), **(env or {})}, cwd=ROOT)


def start_server(url: str, job: str, work: Path, ckpt: Path, rounds: int, min_devices: int,
                 round_timeout: float, extra: list[str] = ()) -> subprocess.Popen:
    log = open(work / "server.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "toolkit", "serve", "--broker", url, "--job", job,
         "--checkpoint", str(ckpt), "--rounds", str(rounds), "--min-devices", str(min_devices),
         "--round-timeout", str(round_timeout), "--state-dir", str(work / "state"),
         "--json", str(work / "report.json"), "--epochs", "1",
         *([] if {"--registry", "--credentials"} & set(extra) else server_keys(work)),
         *extra],
        stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)


def completed_rounds(work: Path) -> int:
    try:
        return json.loads((work / "state" / "state.json").read_text())["completed"]
    except (OSError, ValueError, KeyError):
        return 0


def wait_for(predicate, timeout: float, what: str, step: float = 0.05) -> None:
    """Poll ``predicate`` until true; fail after ``scaled(timeout)`` seconds."""
    deadline = time.time() + scaled(timeout)
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def sigkill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()


def finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[int]:
    """Exit codes, waiting up to ``scaled(timeout)`` for each process, then killing it."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(scaled(timeout)))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes
