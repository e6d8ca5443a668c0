"""Same seeds, same figures: a simulation run twice gives the same per-round accuracies,
losses, change norms and bytes, and the same final weights bit for bit, whatever the
clock, the job id's random part, the server's thread budget (for a strategy that trains
nothing on the server) or the order dpfl's batches arrive in
(docs/results/reproducibility.md)."""
from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest
import torch

from toolkit.sim.simulate import SimOptions, run_simulation

SMALL = dict(dataset="mnist1d:1000", devices=3, rounds=2, epochs=1,
             profiles=("rpi4", "jetson-orin-nano"))


def _fingerprint(report: dict, ckpt) -> dict:
    """Every figure a bench reads from a run, and the final weights' digest."""
    from device_runtime.training.local import weights_of

    h = hashlib.sha256()
    for name, w in sorted(weights_of(ckpt.model).items()):
        h.update(name.encode() + w.tobytes())
    keys = ("accuracy", "loss", "device_loss", "change_rms", "uplink_bytes",
            "downlink_bytes", "accepted", "refused", "server_flops", "simulated_elapsed")
    return {"weights": h.hexdigest(),
            "rounds": [{k: r.get(k) for k in keys} for r in report["rounds"]],
            "devices": [(d["id"], d["uplink_bytes"], d["downlink_bytes"])
                        for d in report["devices"]]}


def _run(strategy: str, threads: int, **kw) -> dict:
    report, ckpt = run_simulation(SimOptions(strategy=strategy, threads=threads,
                                             **SMALL, **kw))
    assert report["threads"] == {"server": threads, "device": 1}
    return _fingerprint(report, ckpt)


def test_heterofl_twice_is_bit_identical_whatever_the_server_threads():
    # HeteroFL trains nothing on the server: its figures do not depend on the budget.
    # Before: uplink and downlink bytes differed (the job id's length, the task's
    # deadline and the update's train_seconds were as long as their digits).
    a, b = _run("heterofl", 1), _run("heterofl", 2)
    assert a == b, json.dumps([a, b])[:2000]


def test_reft_twice_at_one_thread_count_is_bit_identical():
    # REFT distils on the server, whose result differs in its last bits with the thread
    # count (the reason benches pin it and record it): same count, same run.
    assert _run("reft", 1) == _run("reft", 1)


def test_dpfl_gives_the_same_run_when_its_batches_arrive_in_another_order(monkeypatch):
    from device_runtime import split_link

    undisturbed = _run("dpfl", 1)
    made = split_link.exchanger

    def slow_first_device(agent, task):
        exchange = made(agent, task)
        if agent.device != "dev-0":
            return exchange

        def late(step, acts, labels):
            time.sleep(0.02)  # dev-0's batches now come last
            return exchange(step, acts, labels)
        return late
    monkeypatch.setattr(split_link, "exchanger", slow_first_device)
    # Before: the server trained the batches as they arrived, so this order changed the
    # server's model, then every gradient sent back (lockstep: device order).
    assert _run("dpfl", 1) == undisturbed


@pytest.mark.slow  # two `fedge simulate` processes: 25 s, the quick loop's longest test
def test_fedge_simulate_seeds_dp_noise_with_its_seed(tmp_path):
    from tests.conftest import run_fedge

    tiny = ("--dataset", "mnist1d:1000", "--devices", "2", "--rounds", "2", "--epochs", "1")
    runs = []
    for i, extra in enumerate([("--clip", "1", "--dp-noise", "0.5")] * 2 +
                              [("--strategy", "heterofl")]):  # no DP: nothing to seed
        code, _, err = run_fedge("simulate", *tiny, *extra, "--json", str(tmp_path / f"{i}"))
        assert code == 0, err
        rep = json.loads((tmp_path / f"{i}").read_text())
        runs.append([(r["accuracy"], r["loss"], r["change_rms"]) for r in rep["rounds"]])
    assert runs[0] == runs[1]  # before: the noise's seed was the OS's


def test_a_pinned_thread_keeps_its_count_whatever_another_thread_sets():
    from device_runtime.threads import pin_torch_threads

    pinned, other_set, seen = threading.Event(), threading.Event(), {}

    def server():
        seen["pinned"] = pin_torch_threads(2)
        pinned.set()
        other_set.wait(10)
        seen["after"] = torch.get_num_threads()

    def agent():  # a simulated device: torch.set_num_threads(1) as it builds its model
        pinned.wait(10)
        torch.set_num_threads(1)
        other_set.set()
    threads = [threading.Thread(target=f) for f in (server, agent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"pinned": 2, "after": 2}  # set alone, without the read-back: 1


def test_clock_values_in_messages_have_a_fixed_length():
    from device_runtime.messages import fixed_seconds, seconds_of, task_deadline

    texts = [fixed_seconds(s) for s in (0.0, 0.00004, 0.25, 2.0318, 99.5, 12345.678, 1e9)]
    assert len({len(t) for t in texts}) == 1 and texts[3] == "00002.0318"
    assert [seconds_of(t) for t in texts[:4]] == [0.0, 0.0, 0.25, 2.0318]
    assert seconds_of(1.5) == 1.5 and seconds_of("x") == seconds_of(None) == 0.0  # older
    assert seconds_of(float("nan")) == seconds_of(True) == seconds_of("1" * 40) == 0.0
    now = 1_700_000_000.25
    assert {len(json.dumps(task_deadline(600, now + d))) for d in (0, 0.125, 0.5)} == {12}
    assert now + 600 <= task_deadline(600, now) < now + 601


def test_bench_results_record_code_and_threads(tmp_path, monkeypatch):
    from bench.common import provenance, use_threads, write_results

    monkeypatch.setenv("FEDGE_THREADS", "3")  # put back after the test
    assert use_threads(1) == 1  # and every simulation in this process takes it
    write_results({"x": 1}, str(tmp_path / "r.json"), None, lambda r: "")
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["code"] and res["threads"]["budget"] == 1 and res["threads"]["FEDGE_THREADS"] == "1"
    joined = provenance([res, {"code": ["a", "b"]}])
    assert joined["code"] == [res["code"], "a", "b"]
    assert joined["threads"] == [res["threads"], "unrecorded"]
