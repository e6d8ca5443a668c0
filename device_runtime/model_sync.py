"""The model a device trains from: fetched whole, or rebuilt from the one it holds.

With the coded downlink (broker_server/downlink.py) a task names two frames:
the round's full model frame (``model_sha256``) and a sync frame, the coded
change from the model of the round before (``base_sha256``). A device that
holds that base fetches only the sync frame, decodes it against the held
weights with the same codec code as the aggregator, and re-encodes the model
frame; its body's sha256 must equal ``model_sha256``, so a device never trains from a
model the aggregator did not publish. Anything else (no base, a bad sync frame,
a digest that differs) falls back to fetching the full frame.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from device_runtime import codecs, wire
from device_runtime.codecs import CodecContext
from device_runtime.errors import WireError

if TYPE_CHECKING:
    from device_runtime.keys import Signer

SYNC_KIND = "sync"


def model_frame(job: str, round_: int, weights: dict[str, np.ndarray],
                signer: Signer | None = None) -> bytes:
    """The model frame both ends build for ``weights`` (the aggregator's signed): the
    sha256 of its body, which the header names, names the model."""
    return wire.encode(wire.Frame("model", job, round_, "server", "fp32", weights),
                       signer=signer)


def sync_context(round_: int, seed: int, held: dict[str, np.ndarray]) -> CodecContext:
    # ``device`` seeds int8's stochastic rounding: the server is the sender here.
    return CodecContext(round=round_, seed=seed, reference=held, device="server")


def rebuild(job: str, round_: int, held_frame: bytes, sync: bytes, model_sha256: str) -> bytes:
    """The round's model frame from the held model frame and the sync frame
    (WireError when the sync frame is malformed or the result is not that model)."""
    held = wire.decode(held_frame, wire.Expect(kind="model", job=job)).tensors
    head = wire.decode(sync, wire.Expect(kind=SYNC_KIND, job=job, round=round_))
    codec = codecs.get(head.codec)
    shapes = {k: tuple(v.shape) for k, v in held.items()}
    frame = wire.decode(sync, wire.Expect(kind=SYNC_KIND, job=job, round=round_,
                                          codec=head.codec, tensors=codec.change_spec(shapes)))
    seed = frame.meta.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise WireError(f"sync frame meta.seed: expected an int, got {seed!r}")
    weights = codec.decode_change(frame.tensors, frame.params, sync_context(round_, seed, held))
    out = model_frame(job, round_, {k: weights[k] for k in held})
    digest = wire.content_sha(out)
    if digest != model_sha256:
        raise WireError(f"sync frame of round {round_}: the rebuilt model's sha256 is "
                        f"{digest[:12]}.., expected {model_sha256[:12]}..")
    return out


class _Rebuilt:
    """The model frames last rebuilt in this process, by (job, round, held model's
    sha256, sync frame's sha256, the model's sha256; the frame's header names the job
    and round, the sha256 only its body): devices simulated in one process all rebuild
    the same model from the same change (ten cnn-wide devices: 240 ms of CPU a round),
    a device of its own keeps one. Every key names content already checked against its
    sha256, and a frame is kept only after its own sha256 matched the task's."""

    def __init__(self, size: int = 2):
        self.size, self.lock = size, threading.Lock()
        self.items: OrderedDict[tuple[str, int, str, str, str], bytes] = OrderedDict()

    def get(self, job: str, round_: int, held: tuple[str, bytes], sync: bytes,
            sync_sha256: str, model_sha256: str) -> bytes:
        key = (job, round_, held[0], sync_sha256, model_sha256)
        with self.lock:  # one thread rebuilds, the others wait and take its frame
            frame = self.items.get(key)
            if frame is None:
                frame = rebuild(job, round_, held[1], sync, model_sha256)
                self.items[key] = frame
                while len(self.items) > self.size:
                    self.items.popitem(last=False)
            return frame


REBUILT = _Rebuilt()
