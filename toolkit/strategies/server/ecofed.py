"""EcoFed: devices run a frozen, pre-trained head in onnxruntime and send quantized
activations; the server trains the tail on replay buffers (docs/ALGORITHMS.md, section 2).

The head (stages before the split point) comes from pre-training on the server's
public split and never changes; it reaches devices once per job as the asset
``head`` (ONNX bytes, checked against torch before it is published). In a send
round (every ``period`` rounds, from round 1) every device runs it on all its
samples and sends the activations (``act8``/``act4``) with their labels; the
server keeps the latest per device (its replay buffer). Every round, send round
or not, the server trains one tail per device on that device's buffer
(``iterations`` SGD steps from the global tail) and averages the tails with
equal weights, or with ``shared_tail`` trains one tail over all buffers in turn;
the global model is the frozen head and that tail.

Needs torch, so it lives in the toolkit; its spec (options, flags, setup, the
pre-training) is ``toolkit/strategies/ecofed.py``.
The replay buffers are kept with every checkpoint as the devices coded them
(``Strategy.kept``), so an aggregator restarted between send rounds trains on them.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from broker_server.strategies import Assignment, DeviceInfo, Strategy, Update
from broker_server.strategies.base import TrainsAlone, Weights
from broker_server.strategies.folds import DecodeAll
from device_runtime.errors import WireError
from device_runtime.training.local import load_weights, weights_of
from device_runtime.local_models import NO_CUSTOM, LocalModels
from device_runtime.training.models import ModelConfig, build_model
from device_runtime.training.split import parse_head_variant, stage_of
from device_runtime.wire import TensorSpec
from toolkit.strategies.options import EcoFedOptions
from toolkit.strategies.server.flops import counted, shape_key

ACT_CODECS = ("act8", "act4")


@dataclass(frozen=True)
class EcoFedSetup:
    """``split_after`` is the frozen depth (the latest cut): every replay buffer holds
    activations there. A profile with an earlier cut (``cuts``) runs the shorter head
    of ``heads`` and the server runs the frozen stages in between."""

    config: ModelConfig
    split_after: int
    head_onnx: bytes
    act_shape: tuple[int, ...]  # one sample's activation at the cut
    options: EcoFedOptions = EcoFedOptions()
    cuts: dict[str, int] = field(default_factory=dict)  # profile -> cut (default: the one)
    heads: dict[int, tuple[bytes, tuple[int, ...]]] = field(default_factory=dict)
    allowed: LocalModels = NO_CUSTOM  # the operator's custom factories (the config's)

    def cut_of(self, profile: str) -> int:
        return self.cuts.get(profile, self.split_after)

    def head(self, cut: int) -> tuple[bytes, tuple[int, ...]]:
        """(ONNX, activation shape) of the head ending at ``cut``."""
        return (self.head_onnx, self.act_shape) if cut == self.split_after else self.heads[cut]


def export_head(model: nn.Module, cfg: ModelConfig, after: int, probe: np.ndarray,
                opset: int = 17) -> tuple[bytes, tuple[int, ...]]:
    """The head as ONNX bytes (checked against torch on ``probe``) and its output shape."""
    from device_runtime.session import run
    from exporters.onnx_fp32 import export_fp32
    from toolkit.model.checkpoint import example_input
    from toolkit.model.zoo import split

    import onnxruntime as ort

    head, _ = split(model, after)
    head.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_fp32(head, example_input(cfg, 2), Path(tmp) / "head.onnx", opset,
                           "x", "act", {"fedge.role": "head", "fedge.split_after": after})
        data = path.read_bytes()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = run(sess, np.ascontiguousarray(probe, np.float32))
    with torch.no_grad():
        want = head(torch.from_numpy(np.ascontiguousarray(probe, np.float32))).numpy()
    err = float(np.abs(got - want).max())
    if err > 1e-4 * max(1.0, float(np.abs(want).max())):
        raise ValueError(f"ecofed head: onnxruntime differs from torch by {err:.3g}")
    return data, tuple(want.shape[1:])


def tail_names(weights: Weights, after: int) -> list[str]:
    """The global tensors the server trains: those of stages ``after`` and later."""
    return [k for k in weights if stage_of(k) >= after]


def train_tail(model: nn.Module, after: int, acts: np.ndarray, labels: np.ndarray,
               opts: EcoFedOptions, seed: int) -> None:
    """``iterations`` SGD steps on the tail of ``model`` (in place) from random batches."""
    tail = nn.Sequential(*model.stages[after:])
    sgd = torch.optim.SGD(tail.parameters(), lr=opts.lr, momentum=opts.momentum)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(acts), torch.from_numpy(labels)
    tail.train()
    batch = min(opts.batch_size, len(xt))
    key = shape_key("train", tail, (batch, *xt.shape[1:]))

    def step(idx: torch.Tensor) -> None:
        loss = nn.functional.cross_entropy(tail(xt[idx]), yt[idx])
        sgd.zero_grad()
        loss.backward()
        sgd.step()

    for _ in range(opts.iterations):
        idx = torch.randint(0, len(xt), (batch,), generator=gen)
        counted(key, lambda: step(idx))
    tail.eval()


class EcoFed(Strategy, TrainsAlone):
    name = "ecofed"

    def __init__(self, epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
                 options: EcoFedSetup | None = None):
        if not isinstance(options, EcoFedSetup):
            raise ValueError("ecofed: options must be an EcoFedSetup (config, split point, "
                             "head ONNX)")
        options.options.check()
        self.setup, self.opts = options, options.options
        self.model = build_model(options.config, options.allowed)
        self.replay: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # device -> buffer
        # device -> (its cut, its buffer as sent: codec, tensors, params)
        self.coded: dict[str, tuple[int, tuple[str, Weights, dict]]] = {}

    def sends(self, round_: int) -> bool:
        return (round_ - 1) % self.opts.period == 0

    def assets(self) -> dict[str, Weights]:
        cuts = {self.setup.split_after, *self.setup.cuts.values()}
        return {head_asset(c): {"onnx": np.frombuffer(self.setup.head(c)[0], np.uint8).copy()}
                for c in sorted(cuts)}

    def variants(self, global_weights: Weights) -> dict[str, Weights]:
        return {}  # a device needs no weights: its head is the asset

    def variant(self, global_weights: Weights, name: str) -> Weights:
        parse_head_variant(name)
        return {}

    def needs_updates(self, round_: int) -> bool:
        return self.sends(round_)

    def assign(self, round_: int, devices: list[DeviceInfo]) -> dict[str, Assignment]:
        if not self.sends(round_):
            return {}
        out = {}
        for d in devices:
            c = self.setup.cut_of(d.profile)
            out[d.id] = Assignment(f"head-{c}", 1, self.opts.batch_size, self.opts.lr,
                                   uplink="acts", assets=(head_asset(c),))
        return out

    def update_shapes(self, variant: str, model_shapes: dict, samples: int) -> dict:
        return {"acts": (samples, *self.setup.head(parse_head_variant(variant))[1]),
                "labels": TensorSpec("int64", (samples,))}

    @torch.no_grad()
    def bridge(self, acts: np.ndarray, cut: int) -> np.ndarray:
        """Activations at ``cut`` carried to the frozen depth by the frozen stages between."""
        if cut == self.setup.split_after:
            return acts
        between = nn.Sequential(*self.model.stages[cut:self.setup.split_after]).eval()
        return counted(shape_key("infer", between, acts.shape), lambda: np.concatenate(
            [between(torch.from_numpy(acts[i:i + 512])).numpy()
             for i in range(0, len(acts), 512)]).astype(np.float32))

    def fold(self, round_: int, global_weights: Weights, codec, ctx):
        if codec.name not in ACT_CODECS:
            raise ValueError(f"ecofed: expected codec {' or '.join(ACT_CODECS)}, got "
                             f"{codec.name}")
        load_weights(self.model, global_weights)  # the frozen stages, for bridge()
        return ActivationFold(self, round_, global_weights, codec, ctx)

    def aggregate(self, round_: int, global_weights: Weights, updates: list[Update]) -> Weights:
        load_weights(self.model, global_weights)  # the frozen stages, for _reload
        for u in updates:
            self.replay[u.device] = (u.weights["acts"], u.weights["labels"])
            if u.raw is not None:
                self.coded[u.device] = (parse_head_variant(u.meta["variant"]), u.raw)
        self._reload()
        if not self.replay:
            return global_weights
        after, tails = self.setup.split_after, []
        names = tail_names(global_weights, after)
        for k, dev in enumerate(sorted(self.replay)):
            if not self.opts.shared_tail or k == 0:
                load_weights(self.model, global_weights)
            acts, labels = self.replay[dev]
            train_tail(self.model, after, acts, labels, self.opts, seed=round_ * 7919 + k)
            if not self.opts.shared_tail:
                tails.append(weights_of(self.model))
        if self.opts.shared_tail:
            tails = [weights_of(self.model)]
        out = dict(global_weights)
        for name in names:  # equal weights, as the paper averages the tails
            out[name] = np.mean([t[name] for t in tails], axis=0).astype(np.float32)
        return out


    def kept(self) -> dict[str, tuple[str, Weights, dict]]:
        """The replay buffers, as the devices coded them (1 or half a byte per value)."""
        return {f"replay-{c}-{d}": coded for d, (c, coded) in sorted(self.coded.items())}

    def load_kept(self, kept: dict[str, tuple[str, Weights, dict]]) -> None:
        """Decoded (and carried to the frozen depth) in the next ``aggregate``."""
        for key, coded in kept.items():
            kind, cut, device = (key.split("-", 2) + ["", ""])[:3]
            if kind == "replay" and cut.isdigit():
                self.coded[device] = (int(cut), coded)

    def _reload(self) -> None:
        from device_runtime import codecs
        from device_runtime.codecs import CodecContext

        for device, (cut, (codec, tensors, params)) in self.coded.items():
            if device not in self.replay:
                w = codecs.get(codec).decode(tensors, params, CodecContext())
                self.replay[device] = (self.bridge(w["acts"], cut), w["labels"])


class ActivationFold(DecodeAll):
    """Decodes a device's activations and checks its labels before accepting them."""

    def add(self, device: str, samples: int, tensors: Weights, params: dict,
            variant: str = "full") -> None:
        w = self.codec.decode(tensors, params, self.ctx)
        acts, labels = w["acts"], w["labels"]
        classes = self.strategy.setup.config.num_classes
        if len(labels) != samples or len(acts) != samples:
            raise WireError(f"labels: expected {samples} (meta.samples), got {len(labels)} "
                            f"labels and {len(acts)} activations")
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise WireError(f"labels: expected classes 0..{classes - 1}, got "
                            f"{int(labels.min())}..{int(labels.max())}")
        acts = self.strategy.bridge(acts, parse_head_variant(variant))
        self.updates[device] = Update(device, self.round, {"acts": acts, "labels": labels},
                                      samples, {"variant": variant},
                                      raw=(self.codec.name, tensors, params))


def head_asset(cut: int) -> str:
    return f"head-{cut}"

