"""The coded downlink: each round's model sent as a coded change against the one devices hold.

Without it (``--downlink fp32``) every device fetches the whole fp32 model every
round, and with a 1-bit uplink codec that download is ~95% of the traffic. With
a downlink codec the aggregator keeps ``held``, the model the devices hold, next
to its own model (the last round's aggregate: what it evaluates, checkpoints and
exports). Each round it codes the change from ``held`` to its own model with the
downlink codec (relative to ``held``, as an uplink update is coded relative to
the global model), publishes that sync frame, and advances ``held`` by exactly
what the frame decodes to: ``held' = decode(encode(model; held); held)``. A
device holding ``held`` applies the same decode and, by construction, gets the
bytes the aggregator got; it checks that by the sha256 of the re-encoded model
frame's body (the frames the aggregator publishes are signed; the one a device
rebuilds is not, and the signed header is what names the body). Devices
train from ``held`` and their updates are relative to it, so the round is
folded against ``held``; the fold's result is the aggregator's new model. The
coding error is not carried into the next change (error feedback):
local training from ``held`` already corrects toward the data, and adding the
error again counted it twice (docs/strategies.md, "Coded downlink", has the measurements).

A device that does not hold the base (new, restarted, or away last round)
fetches the full model frame of ``held``, which is published retained as before.

Everything here is a pure function of its inputs (sign and fedmrn codes are
deterministic; int8's stochastic rounding is seeded by the round), so a
restarted aggregator recomputes the same frames.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from broker_server.errors import BrokerServerError
from device_runtime.errors import EXIT_USAGE
from device_runtime import codecs, wire
from device_runtime.codecs import CodecContext
from device_runtime.codecs.base import Weights
from device_runtime.model_sync import SYNC_KIND, model_frame, sync_context
from device_runtime.keys import Signer
HELD_KEY = "_downlink_held"  # the state store's kept-tensors entry for ``held``


def downlink_codecs() -> list[str]:
    """Names valid for ``--downlink``: fp32 (no coding) and every relative codec."""
    return ["fp32"] + sorted(n for n in codecs.CODECS.names()
                             if n != "fp32" and getattr(codecs.get(n), "relative", False))


class DownlinkError(BrokerServerError):
    exit_code = EXIT_USAGE


def check_downlink(name: str, strategy: str | None = None) -> str:
    """``name`` if it is a valid downlink codec (for ``strategy``, when given)."""
    valid = downlink_codecs()
    if name not in valid:
        raise DownlinkError(f"--downlink: expected one of {', '.join(valid)}, got {name!r}")
    if strategy is not None and name != "fp32":
        from broker_server.strategies import factory

        if not getattr(factory(strategy), "coded_downlink", False):
            raise DownlinkError(f"--downlink {name}: strategy {strategy} sends devices more "
                                "than one full model; use --downlink fp32")
    return name


def code_change(codec_name: str, target: Weights, held: Weights, ctx: CodecContext
                ) -> tuple[Weights, dict, Weights]:
    """(wire tensors, params, new held): ``target - held`` coded, and held advanced by
    exactly what those tensors decode to."""
    codec = codecs.get(codec_name)
    tensors, params = codec.encode_change(target, ctx)
    decoded = codec.decode_change(tensors, params, ctx)
    # In held's order: the device rebuilds the frame in the order of the one it holds.
    return tensors, params, {k: decoded[k] for k in held}


@dataclass
class RoundModel:
    """What one round publishes for the full model."""

    weights: Weights  # what devices train from this round (``held``)
    frame: bytes  # its full model frame
    sync: bytes | None = None  # the change from the previous round's held model
    base_sha256: str = ""  # body sha256 of that previous model frame


class Downlink:
    """Keeps ``held`` and produces each round's frames (see the module docstring)."""

    def __init__(self, codec_name: str, job: str, signer: Signer | None = None):
        self.codec, self.job = check_downlink(codec_name), job
        self.signer = signer  # the aggregator's: every frame it publishes is signed
        self.held: Weights | None = None
        self.held_round = 0  # the round whose model ``held`` is
        self.held_sha = ""  # body sha256 of held's model frame (of round held_round)
        self._ahead: _Ahead | None = None  # the next round's frames, being computed

    @property
    def coded(self) -> bool:
        return self.codec != "fp32"

    def restore(self, held: Weights | None, round_: int) -> None:
        """After a restart: the held model of the last closed round (None: none)."""
        if held is not None:
            self._hold(RoundModel(held, model_frame(self.job, round_, held, self.signer)), round_)

    def advance(self, x: Weights, round_: int, seed: int) -> RoundModel:
        """The round's model: ``x`` itself when uncoded or nothing is held, else held
        advanced by the coded change toward ``x``. ``seed`` is the previous round's task
        seed: the change is that round's aggregate, and a FedMRN aggregate is a sum of
        masks over that round's noise. Taken from ``prepare`` when it was asked for the
        same."""
        ahead, self._ahead = self._ahead, None
        rm = ahead.result((x, round_, seed)) if ahead is not None else None
        return self._hold(rm or self._compute(x, round_, seed), round_)

    def prepare(self, x: Weights, round_: int, seed: int) -> None:
        """Start computing ``advance(x, round_, seed)`` on a thread of its own, while the
        caller closes the round before (its evaluation: the coding, LZMA2 and the
        frames' sha256 release the GIL, and the devices wait for both)."""
        self._ahead = _Ahead(self._compute, x, round_, seed)

    def _compute(self, x: Weights, round_: int, seed: int) -> RoundModel:
        """The round's model frames (a pure function of ``x`` and what is held)."""
        if not self.coded or self.held is None or self.held_round != round_ - 1:
            return RoundModel(x, model_frame(self.job, round_, x, self.signer))
        base = self.held_sha
        tensors, params, held = code_change(self.codec, x, self.held,
                                            sync_context(round_, seed, self.held))
        sync = wire.encode(wire.Frame(SYNC_KIND, self.job, round_, "server", self.codec,
                                      tensors, params, {"base": base, "seed": seed}),
                           signer=self.signer)
        frame = model_frame(self.job, round_, held, self.signer)
        return RoundModel(held, frame, sync, base)

    def _hold(self, rm: RoundModel, round_: int) -> RoundModel:
        self.held, self.held_round = rm.weights, round_
        # The base of the next change; uncoded, there is none to name.
        self.held_sha = wire.content_sha(rm.frame) if self.coded else ""
        return rm


class _Ahead:
    """``compute(x, round_, seed)`` running on a thread; ``result`` gives it for the
    same arguments (the same ``x`` object), None for others (its error is raised)."""

    def __init__(self, compute, x: Weights, round_: int, seed: int):
        self.args, self.out, self.error = (x, round_, seed), None, None
        self.thread = threading.Thread(target=self._run, args=(compute,), daemon=True,
                                       name="downlink-ahead")
        self.thread.start()

    def _run(self, compute) -> None:
        try:
            self.out = compute(*self.args)
        except BaseException as e:  # raised in the aggregator's thread by result()
            self.error = e

    def result(self, args: tuple) -> RoundModel | None:
        self.thread.join()
        same = args[0] is self.args[0] and args[1:] == self.args[1:]
        if same and self.error is not None:
            raise self.error
        return self.out if same else None


def recount_fetch(rs, device: str, meta: dict, variant: str) -> None:
    """An accepted update says how its device got the model ("sync" or "full"); the
    aggregator counted what it expected when it sent the task. The device knew better
    what it held: correct the round's (a ``records.RoundState``) downlink bytes."""
    via, counted = meta.get("via"), rs.via.get(device)
    if rs.sync is not None and counted and via in ("sync", "full") and via != counted:
        sizes = {"sync": len(rs.sync), "full": rs.model_bytes.get(variant, 0)}
        rs.downlink_bytes += sizes[via] - sizes[counted]
        rs.via[device] = via
