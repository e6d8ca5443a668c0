"""The typed jobs the CLI hands the library: built from serve's flags, checked when built."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from toolkit.errors import UsageError
from toolkit.field.jobs import (BrokerSettings, DemoJob, GuardLimits, RoundSettings,
                          ScaleOutSettings, ServeJob)


def _serve_job(*flags: str) -> ServeJob:
    from toolkit.cli.field_cmds import serve_job
    from toolkit.cli.main import build_parser

    return serve_job(build_parser().parse_args(
        ["serve", "--job", "j1", "--checkpoint", "m.safetensors", "--state-dir", "s", *flags]))


def test_serve_flags_become_a_typed_job():
    job = _serve_job("--rounds", "3", "--lr", "0.1", "--broker", "mqtt://h:1883",
                     "--workers", "2", "--norm-bound", "inf", "--json", "r/out.json",
                     "--strategy", "signsgd", "--codec", "sign", "--sign-decoder", "mv")
    assert job.rounds == RoundSettings(rounds=3, lr=0.1)
    assert job.guard.norm_bound == math.inf
    assert job.broker == BrokerSettings("mqtt://h:1883")
    assert job.scale_out == ScaleOutSettings(2)
    assert (job.checkpoint, job.state_dir, job.report) == \
        (Path("m.safetensors"), Path("s"), Path("r/out.json"))
    assert job.strategy_options.decoder == "mv"  # the strategy's typed options ride along
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.strategy = "fedavg"


def test_serve_defaults_are_the_jobs_defaults():
    job = _serve_job()
    assert job == ServeJob("j1", Path("m.safetensors"), Path("s"))


@pytest.mark.parametrize("build, message", [
    (lambda: RoundSettings(rounds=0), "--rounds: expected >= 1, got 0"),
    (lambda: RoundSettings(round_timeout=0.0), "--round-timeout: expected > 0, got 0.0"),
    (lambda: RoundSettings(lr=-1.0), "--lr: expected > 0, got -1.0"),
    (lambda: GuardLimits(max_samples=0), "--max-samples: expected >= 1, got 0"),
    (lambda: GuardLimits(norm_bound=0.5), "--norm-bound: expected a factor >= 1"),
    (lambda: ScaleOutSettings(0), "--workers: expected >= 1, got 0"),
    (lambda: BrokerSettings(credentials="a.json"), "--credentials needs --broker"),
    (lambda: ServeJob("j", Path("m"), Path("s"), scale_out=ScaleOutSettings(2)),
     "--workers needs --broker"),
    (lambda: DemoJob(devices=1), "--devices: expected >= 2, got 1"),
])
def test_a_bad_value_is_a_one_line_usage_error(build, message):
    with pytest.raises(UsageError, match=message.replace("+", r"\+")):
        build()


def test_a_bad_job_id_is_refused():
    with pytest.raises(Exception, match="job id"):
        ServeJob("a/b", Path("m"), Path("s"))
