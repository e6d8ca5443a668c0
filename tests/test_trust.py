"""End-to-end authenticity, piece by piece: signed frames, what a device acts on and
what the aggregator accepts. Each attack here worked before messages were signed
(issue 20): a forged or replayed message is refused with its reason and changes
nothing. The same attacks on the wire, against real processes: test_trust_field.py."""
from __future__ import annotations

import json

import numpy as np
import pytest

from broker_server.trust import ServerTrust
from device_runtime import chunking, messages, wire
from device_runtime.agent import DeviceAgent
from device_runtime.chunk_auth import ChunkVerifier
from device_runtime.errors import WireError
from device_runtime.keys import Signer
from device_runtime.topics import Topics
from device_runtime.transport.memory import MemoryHub, MemoryTransport
from testkit.timing import scaled
from tests.keys import KEYS, agent_options, trust

JOB = "trust"
TOPICS = Topics(JOB)
W = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}


def _frame(**kw) -> wire.Frame:
    return wire.Frame("model", JOB, 1, "server", "fp32", dict(W), **kw)


# --- the frame -------------------------------------------------------------------------


def test_a_signed_frame_verifies_and_any_change_is_refused():
    signer = KEYS.server
    data = wire.encode(_frame(nonce="n1", to="d0"), signer=signer)
    got = wire.decode(data, wire.Expect(nonce="n1", to="d0"), key=signer.public)
    assert (got.nonce, got.to, got.key) == ("n1", "d0", signer.key_id)
    np.testing.assert_array_equal(got.tensors["w"], W["w"])
    assert wire.content_sha(data) == wire.peek_header(data)["sha256"]

    header_flip = bytearray(data)
    header_flip[data.index(b'"round":1') + 8] = ord("2")  # the round, re-bound by hand
    with pytest.raises(WireError, match="signature: expected a valid signature"):
        wire.decode(bytes(header_flip), key=signer.public)
    body_flip = bytearray(data)
    body_flip[-1] ^= 1
    with pytest.raises(WireError, match="header.sha256: expected the body's sha256"):
        wire.decode(bytes(body_flip), key=signer.public)
    with pytest.raises(WireError, match="signed by another key"):
        wire.decode(data, key=Signer.generate().public)
    with pytest.raises(WireError, match="expected a signed frame"):
        wire.decode(wire.encode(_frame()), key=signer.public)
    with pytest.raises(WireError, match="header.auth.nonce: expected 'n2'"):
        wire.decode(data, wire.Expect(nonce="n2"), key=signer.public)
    with pytest.raises(WireError, match="frame.nonce, frame.to: expected empty"):
        wire.encode(_frame(nonce="n1"))  # a binding means nothing without a signature


def test_every_chunk_of_a_signed_frame_is_signed_and_a_forged_one_is_refused_unheld():
    big = wire.encode(wire.Frame("update", JOB, 1, "d0", "fp32",
                                 {"w": np.ones(40_000, np.float32)}, nonce="t1"),
                      signer=KEYS.device("d0"))
    parts = chunking.split(big, 16_384, "c1", KEYS.device("d0"))
    assert len(parts) > 5
    for part in parts:
        header = wire.verify(part, KEYS.get("d0"), wire.Expect(nonce="t1"))
        assert header["chunk"]["id"] == "c1"
    t = trust(JOB)
    t.open_tasks["d0"] = (1, "t1")
    gate = t.gate(TOPICS)
    forged = chunking.split(wire.encode(wire.Frame("update", JOB, 1, "d0", "fp32",
                                                   {"w": np.ones(40_000, np.float32)})),
                            16_384, "c2")
    hub = MemoryHub()
    rx, tx = MemoryTransport(hub, "agg"), MemoryTransport(hub, "rogue", max_payload=16_384)
    rx.connect(), tx.connect()
    rx.gate, got, refused = gate, [], []
    rx.on_error = lambda topic, why: refused.append(why)
    rx.subscribe(TOPICS.update(), lambda topic, payload: got.append(payload))
    for i, part in enumerate(forged):
        tx._publish_raw(f"{TOPICS.update(1, 'd0')}/_c/{i}", part, False)
    hub.drain()
    assert got == [] and len(refused) == len(forged)
    assert "expected a signed frame" in refused[0]
    assert rx._reassembler.held_bytes == 0  # nothing held for a forged chunk
    tx.signer = KEYS.device("d0")
    tx.publish(TOPICS.update(1, "d0"), big)
    hub.drain()
    assert got == [big]


def test_a_chunked_message_costs_one_signature_check_and_no_forged_chunk_passes():
    """Chunk 0 names the digest of every other chunk: in order, the others are checked
    by a hash; out of order, or not the named bytes, by their own signature."""
    key = KEYS.device("d0")
    big = wire.encode(wire.Frame("update", JOB, 1, "d0", "fp32",
                                 {"w": np.arange(40_000, dtype=np.float32)}, nonce="t1"),
                      signer=key)
    parts = chunking.split(big, 16_384, "c1", key)
    assert len(wire.peek_header(parts[0])["chunk"]["parts"]) == len(parts) - 1
    assert all(len(p) <= 16_384 for p in parts)
    topic, expect = TOPICS.update(1, "d0"), wire.Expect(job=JOB)

    v = ChunkVerifier()
    for p in parts:
        v.verify(topic, p, KEYS.get("d0"), expect)
    assert (v.signatures, v.hashed) == (1, len(parts) - 1)
    v = ChunkVerifier()
    for p in reversed(parts):  # chunk 0 last: nothing to shortcut with
        v.verify(topic, p, KEYS.get("d0"), expect)
    assert (v.signatures, v.hashed) == (len(parts), 0)

    v = ChunkVerifier()
    v.verify(topic, parts[0], KEYS.get("d0"), expect)
    rogue = chunking.split(wire.encode(wire.Frame("update", JOB, 1, "d0", "fp32",
                                                  {"w": np.zeros(40_000, np.float32)},
                                                  nonce="t1"), signer=Signer.generate()),
                           16_384, "c1")  # the same chunk id, unsigned
    for p in rogue[1:3]:
        with pytest.raises(WireError, match="expected a signed frame"):
            v.verify(topic, p, KEYS.get("d0"), expect)
    other = chunking.split(big, 16_384, "c1", Signer.generate())  # same id, another key
    with pytest.raises(WireError, match="signed by another key"):
        v.verify(topic, other[2], KEYS.get("d0"), expect)
    with pytest.raises(WireError, match="header.job: expected 'other'"):  # still checked
        v.verify(topic, parts[1], KEYS.get("d0"), wire.Expect(job="other"))
    v.verify(TOPICS.update(1, "d1"), parts[1], KEYS.get("d0"), expect)  # another topic:
    assert v.signatures == 2  # its own signature check

    live = chunking.split(big, 16_384, "c9", key, sign_all=False)  # published live: in order
    assert [wire.peek_header(p)["v"] for p in live] == [2] + [1] * (len(live) - 1)
    v = ChunkVerifier()
    with pytest.raises(WireError, match="expected a signed frame"):  # before its chunk 0
        v.verify(topic, live[1], KEYS.get("d0"), expect)
    for p in live:
        v.verify(topic, p, KEYS.get("d0"), expect)
    assert (v.signatures, v.hashed) == (1, len(live) - 1)
    tampered = bytearray(live[2])
    tampered[-1] ^= 1  # the body: its header's sha256 no longer matches (reassembler's
    v.verify(topic, bytes(tampered), KEYS.get("d0"), expect)  # decode refuses it next)
    with pytest.raises(WireError, match="header.sha256"):
        chunking.Reassembler().add(bytes(tampered), topic)
    reheaded = bytearray(live[2])
    reheaded[reheaded.index(b'"round":1') + 8] = ord("2")
    with pytest.raises(WireError, match="expected a signed frame"):
        v.verify(topic, bytes(reheaded), KEYS.get("d0"), expect)

    bad = wire.peek_header(parts[0])["chunk"]
    for chunk in ({**bad, "parts": bad["parts"][:-1]}, {**bad, "index": 1},
                  {**bad, "parts": ["X" * 32] * len(bad["parts"])}):
        frame = wire.Frame("chunk", JOB, 1, "d0", "fp32", {"data": np.zeros(4, np.uint8)},
                           chunk=chunk, nonce="t1")
        with pytest.raises(WireError, match="header.chunk.parts: expected, in chunk 0 only"):
            wire.verify(wire.encode(frame, signer=key), KEYS.get("d0"))


def test_the_chunk_digests_remembered_are_bounded():
    key = KEYS.device("d0")
    v = ChunkVerifier(max_messages=2)
    messages_ = []
    for k in range(3):
        big = wire.encode(wire.Frame("update", JOB, 1, "d0", "fp32",
                                     {"w": np.full(20_000, k, np.float32)}), signer=key)
        messages_.append(chunking.split(big, 16_384, f"c{k}", key))
        v.verify(TOPICS.update(1, "d0"), messages_[-1][0], KEYS.get("d0"), wire.Expect())
    assert len(v._known) == 2 and v._digests == 2 * (len(messages_[0]) - 1)
    v.verify(TOPICS.update(1, "d0"), messages_[0][1], KEYS.get("d0"), wire.Expect())
    assert (v.signatures, v.hashed) == (4, 0)  # forgotten: checked by its signature
    v.verify(TOPICS.update(1, "d0"), messages_[2][1], KEYS.get("d0"), wire.Expect())
    assert v.hashed == 1


# --- the device ------------------------------------------------------------------------


def _agent() -> tuple[DeviceAgent, ServerTrust]:
    t = MemoryTransport(MemoryHub(), "d0")
    t.connect()
    agent = DeviceAgent(t, agent_options(JOB, "d0", "rpi4"), np.zeros((4, 40), np.float32),
                        np.zeros(4, np.int64))
    server = trust(JOB)
    agent._handle(TOPICS.plan, server.seal(_plan(server), nonce=server.session))
    assert agent.plan is not None
    return agent, server


def _plan(server: ServerTrust, issued: float = 100.0) -> messages.Plan:
    return messages.Plan(JOB, "fedavg", "fp32", 3, {}, 1, 30.0, session=server.session,
                         issued=issued)


def test_a_device_obeys_only_a_stop_signed_for_the_plans_session():
    agent, server = _agent()
    stop = messages.Control("stop", "forged")
    unsigned = json.dumps({"action": "stop"}).encode()  # what stopped every device before
    other = messages.seal(stop, JOB, "server", Signer.generate(), nonce=server.session)
    earlier_run = server.seal(stop, nonce="an-earlier-session")
    other_job = messages.seal(stop, "other", "server", KEYS.server, nonce=server.session)
    for payload in (unsigned, other, earlier_run, other_job):
        agent._handle(TOPICS.control, payload)
        assert not agent.stopped
    agent._handle(TOPICS.control, server.seal(stop, nonce=server.session))
    assert agent.stopped


def test_a_device_acts_only_on_its_own_fresh_task(monkeypatch):
    agent, server = _agent()
    worked = []
    monkeypatch.setattr(agent, "_work", lambda task: worked.append(task.round))

    def task(r, device="d0", session=server.session, to="d0"):
        t = messages.Task(round=r, device=device, variant="full", model_sha256="0" * 64,
                          deadline=1e12, epochs=1, batch_size=8, lr=0.1, seed=0, codec="fp32",
                          nonce=server.nonce(r, device), session=session)
        return server.seal(t, r, t.nonce, to)
    custom = messages.Task(round=2, device="d0", variant="full", model_sha256="0" * 64,
                           deadline=1e12, epochs=1, batch_size=8, lr=0.1, seed=0, codec="fp32",
                           model={"arch": "custom", "factory": "torch.hub:load"},
                           nonce="x", session=server.session)
    forged = [
        (TOPICS.task(2, "d0"), messages.dump(custom)),  # the remote-code task, unsigned
        (TOPICS.task(2, "d0"), messages.seal(custom, JOB, "server", Signer.generate(), 2, "x",
                                             "d0")),
        (TOPICS.task(2, "d0"), task(2, to="d1")),  # d1's task, on d0's topic
        (TOPICS.task(3, "d0"), task(2)),  # round 2's task, on round 3's topic
        (TOPICS.task(2, "d0"), task(2, session="an-earlier-session")),
    ]
    for topic, payload in forged:
        agent._handle(topic, payload)
    assert worked == []
    agent._handle(TOPICS.task(2, "d0"), task(2))
    agent._handle(TOPICS.task(1, "d0"), task(1))  # older than one it took: replayed
    assert worked == [2]


def test_a_device_follows_the_newest_plan_only():
    agent, server = _agent()
    old = trust(JOB)
    agent._handle(TOPICS.plan, old.seal(_plan(old, issued=50.0), nonce=old.session))
    assert agent.plan.session == server.session  # an older plan, replayed: refused
    agent._handle(TOPICS.plan, old.seal(_plan(old, issued=150.0), nonce=old.session))
    assert agent.plan.session == old.session  # a newer run of the job


# --- the aggregator --------------------------------------------------------------------


def test_the_aggregator_takes_a_status_only_from_the_devices_own_key_and_never_an_old_one():
    t = trust(JOB)
    st = messages.Status("d0", "online", "rpi4", 40, ts=10.0)
    assert t.status("d0", messages.seal(st, JOB, "d0", KEYS.device("d0"))).samples == 40
    with pytest.raises(WireError, match="signed by another key"):
        t.status("d0", messages.seal(st, JOB, "d0", KEYS.device("d1")))
    with pytest.raises(WireError,
                       match="expected one with a key in the fleet.s registry, got .no-such."):
        t.status("no-such", messages.seal(messages.Status("no-such", "online"), JOB,
                                          "no-such", Signer.generate()))
    older = messages.Status("d0", "online", "rpi4", 10**15, ts=9.0)
    with pytest.raises(WireError, match="replayed"):
        t.status("d0", messages.seal(older, JOB, "d0", KEYS.device("d0")))
    with pytest.raises(WireError, match="frame magic"):  # the JSON every status used to be
        t.status("d0", messages.dump(st))


def test_a_recorded_update_cannot_be_replayed_into_another_round_or_task():
    t = trust(JOB)
    sent = wire.encode(wire.Frame("update", JOB, 1, "d0", "fp32", dict(W),
                                  nonce=t.nonce(1, "d0")), signer=KEYS.device("d0"))
    expect = wire.Expect(kind="update", job=JOB, round=1, nonce=t.nonce(1, "d0"))
    assert t.update(sent, expect, "d0").device == "d0"
    rewrapped = sent.replace(b'"round":1', b'"round":2')  # the replay that used to work
    with pytest.raises(WireError, match="signature"):
        t.update(rewrapped, wire.Expect(kind="update", job=JOB, round=2), "d0")
    with pytest.raises(WireError, match="header.auth.nonce"):  # same round, a later run
        t.update(sent, wire.Expect(kind="update", job=JOB, round=1,
                                   nonce=trust(JOB).nonce(1, "d0")), "d0")
    with pytest.raises(WireError, match="signed by another key"):  # as if it were d1's
        t.update(sent, expect, "d1")


# --- a lost update ---------------------------------------------------------------------


class _LosesFirstUpdate(MemoryTransport):
    """A device's link that loses its first update (what a flooded broker did)."""

    lost = 0

    def _publish_raw(self, topic: str, payload: bytes, retain: bool) -> None:
        if "/update/" in topic and not self.lost:
            self.lost += 1
            return
        super()._publish_raw(topic, payload, retain)


def test_a_lost_update_is_asked_for_again_with_the_same_nonce(tmp_path):
    """Past the deadline without a quorum, the aggregator re-sends the task to the
    assigned device that did not report; the device answers with the update it sent."""
    import threading

    from broker_server.service import Aggregator, ServeOptions
    from device_runtime.training.local import weights_of
    from device_runtime.training.models import ModelConfig, build_model
    from tests.keys import will

    cfg = ModelConfig("cnn1d", (40,), 10, width=0.25)
    hub = MemoryHub()
    agg_t = MemoryTransport(hub, "agg")
    agg_t.connect()
    agg = Aggregator(agg_t, ServeOptions(JOB, tmp_path / "state", rounds=1, min_devices=2,
                                         round_timeout=scaled(2.0), epochs=1),
                     cfg.to_json(), weights_of(build_model(cfg)),
                     trust=trust(JOB, tmp_path / "state"))
    rng = np.random.default_rng(0)
    agents = []
    for k, cls in enumerate((MemoryTransport, _LosesFirstUpdate)):
        t = cls(hub, f"d{k}", will=will(TOPICS, f"d{k}"))
        t.connect()
        agents.append(DeviceAgent(t, agent_options(JOB, f"d{k}", "rpi4"),
                                  rng.normal(size=(32, 40)).astype(np.float32),
                                  rng.integers(0, 10, 32)))
        threading.Thread(target=agents[-1].run, daemon=True).start()
    report = agg.run()
    assert agents[1].t.lost == 1 and agents[1].rounds_done == 1  # trained once
    assert report["rounds"][0]["accepted"] == ["d0", "d1"]
