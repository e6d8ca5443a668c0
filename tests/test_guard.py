"""The aggregator's floor (broker_server/guard.py): bounded sample weights and bounded
change norms, as pure functions and through the aggregator's state; and the state dir's
damage named, not fatal (broker_server/state.py)."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from broker_server import guard
from broker_server.guard import GuardError, UpdateGuard, change_of, change_rms, norm_bound, \
    refusal, rms, sample_weight
from broker_server.state import ServerState, StateStore
from device_runtime import codecs, wire
from device_runtime.codecs import CodecContext


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(0, 0.1, (8, 4, 3)).astype(np.float32),
            "conv.bias": rng.normal(0, 0.1, 8).astype(np.float32),
            "bn.running_var": np.ones(8, np.float32),
            "fc.weight": rng.normal(0, 0.1, (10, 8)).astype(np.float32)}


def _trained(ref: dict, scale: float, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, scale, v.shape)).astype(np.float32) for k, v in ref.items()}


def test_sample_weight_is_the_least_of_claim_registration_and_cap():
    assert sample_weight(10**15, 400, 10**6) == 400
    assert sample_weight(300, 400, 10**6) == 300
    assert sample_weight(10**15, None, 10**6) == 10**6  # never registered: the job's cap
    assert sample_weight(10**15, 10**15, 5000) == 5000


def test_rms_is_exact_and_does_not_overflow_on_float32_extremes():
    assert rms({"a": np.array([3.0, 4.0], np.float32)}) == pytest.approx(math.sqrt(12.5))
    big = {"w": np.full(1000, 3e38, np.float32)}
    assert math.isfinite(rms(big)) and rms(big) == pytest.approx(3e38, rel=1e-6)
    assert rms({}) == 0.0


def test_change_rms_measures_only_the_reference_tensors():
    ref = _model()
    assert change_rms(ref, ref) == 0.0
    assert change_rms({k: np.zeros_like(v) for k, v in ref.items()}, ref) == \
        pytest.approx(rms(ref))
    assert change_rms({"logits": np.zeros((4, 10), np.float32)}, ref) is None
    assert change_rms({"fc.weight": np.zeros((3, 3), np.float32)}, ref) is None


def test_change_rms_of_a_whole_model_is_the_per_tensor_one_whatever_the_round():
    """A whole model's change is measured as one vector against the reference's values,
    made once per reference: the same figure as per tensor, and a new round's reference
    (or one whose tensors were replaced) is measured against its own values."""
    ref = _model()
    new = _trained(ref, 0.01)
    per_tensor = math.sqrt(sum(float(((new[k].astype(np.float64) - ref[k]) ** 2).sum())
                               for k in ref) / sum(v.size for v in ref.values()))
    assert change_rms(new, ref) == pytest.approx(per_tensor, rel=1e-12)
    assert change_rms(new, ref) == pytest.approx(per_tensor, rel=1e-12)  # cached: same
    moved = {k: v + 1.0 for k, v in ref.items()}
    assert change_rms(moved, moved) == 0.0 and change_rms(ref, moved) == pytest.approx(1.0)
    ref[next(iter(ref))] = ref[next(iter(ref))] + 2.0  # a tensor replaced in that dict
    assert change_rms(new, ref) != pytest.approx(per_tensor, rel=1e-6)


def test_the_flat_references_kept_are_few_and_bounded_in_bytes(monkeypatch):
    monkeypatch.setattr(guard, "_FLAT", {})
    refs = [{k: v + i for k, v in _model().items()} for i in range(6)]
    for ref in refs:
        change_rms(ref, ref)
    assert len(guard._FLAT) == guard.FLAT_KEPT  # the newest: a round's variants
    monkeypatch.setattr(guard, "FLAT_BYTES", 1)  # a model too big to keep two of
    change_rms(refs[0], refs[0])
    assert list(guard._FLAT) == [id(refs[0])]


def test_bound_is_factor_times_median_or_the_cold_bound_before_one_exists():
    bound, why = norm_bound([1.0, 2.0, 100.0], 8.0, 0.5)
    assert bound == 16.0 and "median" in why
    bound, why = norm_bound([1.0, 2.0], 8.0, 0.5)  # too few norms: the reference weights
    assert bound == guard.COLD_FACTOR * 0.5 and "no median" in why
    assert norm_bound([], 8.0, 0.0)[0] == guard.COLD_FLOOR  # a zero model still moves
    assert norm_bound([1.0] * 5, math.inf, 0.5)[0] == math.inf


def test_refusal_names_non_finite_and_oversize_changes():
    assert refusal(1.0, 2.0, "x") is None
    assert "finite" in refusal(math.nan, 2.0, "x")
    assert "finite" in refusal(math.inf, math.inf, "x")
    assert "exceeds the bound" in refusal(3.0, 2.0, "8 x the median")


@pytest.mark.parametrize("codec_name", ["fp32", "fp16", "int8", "sign", "signmix"])
def test_change_of_each_codec_is_the_update_against_the_reference(codec_name):
    codec, ref = codecs.get(codec_name), _model()
    new = _trained(ref, 0.01)
    ctx = CodecContext(1, 7, ref, "d0")
    tensors, params = codec.encode(new, ctx)
    change = change_of(codec, tensors, params, ctx)
    exact = change_rms(new, ref)
    # sign keeps one magnitude per tensor: the same order, not the same value
    assert rms(change) == pytest.approx(exact, rel=0.6 if "sign" in codec_name else 0.02)


def test_fedmrn_change_is_its_full_precision_part():
    codec, ref = codecs.get("fedmrn"), _model()
    ctx = CodecContext(1, 7, ref, "d0")
    tensors, params = codec.encode(_trained(ref, 0.01), ctx)
    base = rms(change_of(codec, tensors, params, ctx))
    tensors["dense"] = np.full_like(tensors["dense"], 1e30)
    assert rms(change_of(codec, tensors, params, ctx)) > 1e29 > base * 1e20


def _guard(**kw) -> UpdateGuard:
    return UpdateGuard(**{"factor": 4.0, "max_samples": 10**6, **kw})


def _measure(g: UpdateGuard, ref: dict, weights: dict, device: str = "d") -> float | None:
    codec = codecs.get("fp32")
    ctx = CodecContext(1, 7, ref, device)
    tensors, params = codec.encode(weights, ctx)
    return g.measure(device, codec, tensors, params, ctx)


def test_guard_refuses_a_blown_up_update_at_once_and_a_large_one_once_a_median_exists():
    ref, g = _model(), _guard()
    with pytest.raises(GuardError, match="no median yet"):
        _measure(g, ref, {k: np.full_like(v, 1e30) for k, v in ref.items()})
    for k in range(3):
        g.accept(f"h{k}", _measure(g, ref, _trained(ref, 0.01, k), f"h{k}"))
    assert len(g.references()) == 3
    with pytest.raises(GuardError, match="median"):
        _measure(g, ref, _trained(ref, 0.2))  # 20 x the honest change: within the cold bound
    assert _measure(g, ref, _trained(ref, 0.02)) is not None  # 2 x: accepted


def test_guard_keeps_the_last_round_as_reference_and_ignores_zero_changes():
    ref, g = _model(), _guard()
    for k in range(3):
        g.accept(f"h{k}", _measure(g, ref, _trained(ref, 0.01, k), f"h{k}"))
    g.accept("idle", _measure(g, ref, ref, "idle"))  # trained nothing
    previous = g.close()
    assert len(previous) == 3 and g.current == {}
    with pytest.raises(GuardError, match="median"):  # round 2, before any update of it
        _measure(g, ref, _trained(ref, 0.2))
    restored = _guard(previous=list(previous))  # what state.json gives a restarted server
    with pytest.raises(GuardError, match="median"):
        _measure(restored, ref, _trained(ref, 0.2))


def test_registration_is_the_first_count_and_never_raised():
    g = _guard()
    assert g.register([("d0", 400)]) is True
    assert g.register([("d0", 10**15), ("d1", 50)]) is True  # d1 new; d0 kept
    assert g.register([("d0", 10**15)]) is False
    assert g.registered == {"d0": 400, "d1": 50}
    assert g.weight("d0", 10**15) == 400 and g.weight("ghost", 10**15) == 10**6


def test_registration_and_norms_survive_a_restart(tmp_path):
    store = StateStore(tmp_path, "job")
    st, _ = store.load()
    g = UpdateGuard(registered=st.registered)
    g.register([("d0", 400)])
    store.save_registered(st)
    assert StateStore(tmp_path, "job").load()[0].registered == {"d0": 400}  # before round 1
    st.completed, st.norms = 1, [0.1, 0.2, 0.3]
    store.save_round(st, _model())
    again, _ = StateStore(tmp_path, "job").load()
    assert again.registered == {"d0": 400} and again.norms == [0.1, 0.2, 0.3]


# --- the state dir's damage (issue 20, item 8) -------------------------------------
def _update(job: str, round_: int, device: str) -> bytes:
    return wire.encode(wire.Frame("update", job, round_, device, "fp32", _model(),
                                  meta={"samples": 10}))


def test_saved_updates_that_are_damaged_or_of_another_round_are_named_and_skipped(tmp_path):
    store = StateStore(tmp_path, "job")
    store.save_update(2, "good", _update("job", 2, "good"))
    store.save_update(2, "torn", _update("job", 2, "torn")[:100])
    store.save_update(2, "stale", _update("job", 1, "stale"))  # header: round 1
    store.save_update(2, "other", _update("job", 2, "someone"))
    saved, bad = store.accepted_updates(2)
    assert list(saved) == ["good"]
    reasons = dict(bad)
    assert set(reasons) == {"torn", "stale", "other"}
    assert "round-2.log" in reasons["torn"] and "'torn'" in reasons["torn"]
    assert "round" in reasons["stale"] and "round-2.log" in reasons["stale"]


def test_a_record_torn_by_a_crash_is_named_and_cut_off_before_the_next_append(tmp_path):
    """A SIGKILL in the middle of an append leaves a partial record at the log's end.
    The restarted aggregator names it (its device is asked again) and appends after the
    last whole record: appended behind the torn one, a later update would be unreadable."""
    store = StateStore(tmp_path, "job")
    store.save_update(2, "a", _update("job", 2, "a"))
    store.save_update(2, "b", _update("job", 2, "b"))
    log = tmp_path / "round-2.log"
    with open(log, "r+b") as f:
        f.truncate(log.stat().st_size - 50)
    again = StateStore(tmp_path, "job")  # the restart
    saved, bad = again.accepted_updates(2)
    assert list(saved) == ["a"] and [d for d, _ in bad] == ["b"]
    assert "torn at byte" in bad[0][1] and "round-2.log" in bad[0][1]
    again.save_update(2, "b", _update("job", 2, "b"))  # its device answered again
    saved, bad = StateStore(tmp_path, "job").accepted_updates(2)
    assert sorted(saved) == ["a", "b"] and bad == []


def test_a_failed_append_leaves_no_partial_record(tmp_path, monkeypatch):
    """A full disk mid-append: the error reaches the caller and the log is cut back, so
    the next update appended is read (a partial record would hide it)."""
    import errno

    from broker_server import update_log

    store = StateStore(tmp_path, "job")
    store.save_update(2, "a", _update("job", 2, "a"))
    real = update_log.os.pwritev

    def full(fd, parts, at):
        update_log.os.pwrite(fd, b"".join(parts)[:1000], at)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(update_log.os, "pwritev", full)
    with pytest.raises(OSError, match="No space"):
        store.save_update(2, "b", _update("job", 2, "b"))
    monkeypatch.setattr(update_log.os, "pwritev", real)
    store.save_update(2, "c", _update("job", 2, "c"))
    saved, bad = StateStore(tmp_path, "job").accepted_updates(2)
    assert sorted(saved) == ["a", "c"] and bad == []


def test_updates_saved_one_file_each_by_an_older_fedge_are_read(tmp_path):
    """A state dir left mid-round by a fedge that kept round-<r>/<id>.fdg: its updates
    still count after the upgrade, and the folder goes when the round closes."""
    (tmp_path / "round-2").mkdir()
    (tmp_path / "round-2" / "old.fdg").write_bytes(_update("job", 2, "old"))
    store = StateStore(tmp_path, "job")
    store.save_update(2, "new", _update("job", 2, "new"))
    saved, bad = store.accepted_updates(2)
    assert sorted(saved) == ["new", "old"] and bad == []
    st = ServerState("job", completed=2)
    store.save_round(st, _model())
    assert store.flush(30)
    assert not (tmp_path / "round-2").exists() and not (tmp_path / "round-2.log").exists()


def test_a_stray_entry_in_the_state_dir_is_ignored_with_one_warning(tmp_path, caplog):
    store = StateStore(tmp_path, "job")
    (tmp_path / "round-old").mkdir()
    (tmp_path / "round-1").mkdir()
    st = ServerState("job")
    with caplog.at_level(logging.WARNING, "fedge.server"):
        for r in (1, 2):
            st.completed = r
            store.save_round(st, _model())
    warnings = [r for r in caplog.records if "round-old" in r.getMessage()]
    assert len(warnings) == 1 and store.flush(30)  # the closed round's folder: removed
    assert (tmp_path / "round-old").is_dir() and not (tmp_path / "round-1").exists()


@pytest.mark.parametrize("codec_name", ["fp32", "fp16", "int8", "sign", "signmix", "fedmrn"])
def test_a_finite_payload_that_blows_the_model_up_is_refused_for_every_codec(codec_name):
    """NaN and Inf on the wire are the wire decoder's to refuse (tests/test_wire.py); a
    finite payload that decodes to huge or non-finite weights (1e30 floats; int8's or
    sign's scale at 1e38) is refused by the codec or by the guard."""
    from device_runtime.errors import WireError

    codec, ref = codecs.get(codec_name), _model()
    ctx = CodecContext(1, 7, ref, "d0")
    tensors, params = codec.encode(_trained(ref, 0.01), ctx)
    params = {k: dict(p, scale=1e38) if "scale" in p else p for k, p in params.items()}
    tensors = {k: np.full_like(v, min(1e30, float(np.finfo(v.dtype).max))) if v.dtype.kind == "f"
               else v for k, v in tensors.items()}
    with pytest.raises(WireError):
        _guard().measure("d0", codec, tensors, params, ctx)


def test_guard_state_that_is_not_the_jobs_or_not_numbers_is_refused_naming_the_file(tmp_path):
    from broker_server.errors import BrokerServerError

    store = StateStore(tmp_path, "job")
    st, _ = store.load()
    st.completed, st.norms = 1, [0.1, "x"]
    store.save_round(st, _model())
    with pytest.raises(BrokerServerError, match="state.json is unreadable: norms"):
        store.load()
    st.norms = [0.1]
    store.save_round(st, _model())
    (tmp_path / "registered.json").write_text('{"job": "other", "devices": {"d0": 1}}')
    with pytest.raises(BrokerServerError, match="registered.json belongs to job 'other'"):
        store.load()


def test_saved_updates_are_fsynced_together_when_the_burst_is_handled(tmp_path, monkeypatch):
    """An accepted update is appended to its round's log at once and fsynced with the
    rest of its burst (``sync_updates``, which the aggregator calls once its queue is
    empty, hands them to the syncer's thread): the log and its folder synced by
    ``flush``, once each."""
    import os

    from broker_server import state

    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(state.os, "fsync", lambda fd: (synced.append(
        os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    store = StateStore(tmp_path, "job")
    for d in ("a", "b", "c"):
        store.save_update(3, d, _update("job", 3, d))
    assert synced == [] and sorted(store.accepted_updates(3)[0]) == ["a", "b", "c"]
    store.sync_updates()
    assert store.flush(30)
    assert sorted(synced) == sorted([str(tmp_path / "round-3.log"), str(tmp_path)])
    synced.clear()
    store.sync_updates()  # nothing new: nothing to sync
    assert store.flush(30) and synced == []


def test_the_aggregator_does_not_wait_for_the_disk(tmp_path, monkeypatch):
    """``sync_updates`` returns while the disk is still committing (the fsyncs run on the
    syncer's thread); ``flush`` waits for them. Before, the aggregator's thread waited
    for two fsyncs per update."""
    import os
    import threading

    from broker_server import syncer

    disk = threading.Event()
    real = os.fsync
    monkeypatch.setattr(syncer.os, "fsync", lambda fd: (disk.wait(60), real(fd))[1])
    store = StateStore(tmp_path, "job")
    store.save_update(2, "a", _update("job", 2, "a"))
    store.sync_updates()  # would block here until the disk answers
    assert not store.flush(timeout=0.2)  # the commit is still in flight
    disk.set()
    assert store.flush(timeout=60)
