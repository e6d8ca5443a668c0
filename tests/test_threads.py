"""Every fedge process sizes its torch and onnxruntime pools from the cores it may use
(affinity, cgroup quota) shared among its siblings; FEDGE_THREADS overrides it."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from device_runtime import threads
from testkit import ROOT

AFFINITY = len(os.sched_getaffinity(0))


def test_a_cgroup_quota_caps_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # v2: 1.5 CPUs
    assert threads.available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.available_cpus(tmp_path) == AFFINITY
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # v1: 1 CPU
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.available_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert threads.available_cpus(v1) == AFFINITY


def test_siblings_share_the_cores_and_the_override_wins():
    assert threads.budget(1, {}) == threads.available_cpus()
    assert threads.budget(9, {}) == max(1, threads.available_cpus() // 9)
    assert threads.budget(9, {"FEDGE_THREADS": "3"}) == 3
    assert threads.budget(1, {"OMP_NUM_THREADS": "1"}) == 1
    env = threads.child_env(9, base={})
    assert env["FEDGE_THREADS"] == env["OMP_NUM_THREADS"] == str(max(1, AFFINITY // 9))
    with pytest.raises(threads.ThreadsError, match="FEDGE_THREADS: expected a whole number"):
        threads.budget(1, {"FEDGE_THREADS": "lots"})


def test_waiting_threads_sleep_unless_the_user_chose_a_policy():
    """OpenMP threads that spin at a barrier while a busy neighbour holds the other
    core made a pre-training 17x slower in wall and CPU time (docs/results/threads.md):
    every fedge process and its children get the passive policy."""
    env: dict[str, str] = {}
    threads.configure(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["KMP_BLOCKTIME"] == "0"
    assert threads.child_env(2, base={})["OMP_WAIT_POLICY"] == "PASSIVE"
    chosen = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.configure(chosen)
    assert chosen["OMP_WAIT_POLICY"] == "ACTIVE"


def _child(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FEDGE_THREADS",
                         "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**base, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)


def test_torch_in_a_fedge_process_gets_its_share_not_every_core():
    code = ("from device_runtime import threads; threads.configure(); import torch; "
            "from device_runtime.session import open_session; "
            "print(torch.get_num_threads())")
    assert _child(code, FEDGE_THREADS="1").stdout.split() == ["1"]
    assert _child(code).stdout.split() == [str(threads.available_cpus())]


def test_a_bad_override_is_a_one_line_usage_error_from_the_cli():
    r = _child("import sys; from toolkit.cli.main import main; sys.exit(main(['profiles']))",
               FEDGE_THREADS="0")
    assert r.returncode == 2
    assert r.stderr.strip() == ("fedge profiles: error: FEDGE_THREADS: expected a whole "
                                "number >= 1, got '0'")


def test_one_blas_thread_only_before_numpy_and_only_if_the_user_did_not_choose():
    code = ("import os; from device_runtime import threads; "
            "print(threads.one_blas_thread(), os.environ.get('OPENBLAS_NUM_THREADS')); "
            "import numpy; print(threads.one_blas_thread())")
    assert _child(code).stdout.split() == ["True", "1", "False"]
    assert _child(code, OPENBLAS_NUM_THREADS="3").stdout.split() == ["False", "3", "False"]
    assert _child(code, GOTO_NUM_THREADS="2").stdout.split() == ["False", "None", "False"]


def test_a_small_known_run_gets_one_onnxruntime_thread(monkeypatch):
    from device_runtime.predictor import SMALL_RUN_MACS, _threads_for

    monkeypatch.delenv("FEDGE_THREADS", raising=False)
    model = SimpleNamespace(macs=370_000)
    assert _threads_for(model, 0, 1) == 1
    assert _threads_for(model, 0, SMALL_RUN_MACS // 370_000) == 1
    assert _threads_for(model, 0, SMALL_RUN_MACS // 370_000 + 1) == 0  # the budget decides
    assert _threads_for(model, 0, None) == 0  # the caller does not know
    assert _threads_for(model, 3, 1) == 3  # the caller chose
    assert _threads_for(SimpleNamespace(macs=0), 0, 1) == 0  # the manifest does not know
    monkeypatch.setenv("FEDGE_THREADS", "2")
    assert _threads_for(model, 0, 1) == 0  # the user chose: the budget gives FEDGE_THREADS
