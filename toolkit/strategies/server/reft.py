"""REFT: each device trains the global model pruned to its compute; the server distils
the ensemble of returned client models into the global model (docs/ALGORITHMS.md, section 3).

Each round the global (student) model is pruned anew for every profile of the fleet
(structured channel pruning to the planner's MAC budget); a device gets its profile's
pruned weights and, in its task, the pruned model's config (the zoo architecture with
the surviving channel counts), so it builds the same shapes without torch-pruning.
The server then treats the returned client models as a teacher ensemble (their
softmax at temperature T, weighted by samples) and trains the student on its public
split with the KL loss (times T^2, as in FedDF).

The strategy needs torch and the pruner, so it lives in the toolkit; its spec
(options, flags, setup) is ``toolkit/strategies/reft.py``, and the aggregator
service itself stays torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from broker_server.strategies import Assignment, DeviceInfo, Strategy, Update
from broker_server.strategies.base import Weights
from device_runtime.training.local import (
    load_weights,
    minibatches,
    predict_logits,
    weights_of,
)
from device_runtime.training.models import ModelConfig, build_model
from toolkit.model.checkpoint import example_input
from toolkit.model.pruning import PruneRecord, count_macs, prune_to_macs, replay
from toolkit.strategies.options import REFTOptions
from toolkit.strategies.server.flops import counted, shape_key


LOGIT_CODECS = ("fp32", "fp16", "int8")  # the codecs that code any tensor as it is


@dataclass(frozen=True)
class REFTSetup:
    """What the server knows: the global config, its public split, and per profile the
    MAC fraction the planner allows (``toolkit.planning.plan.plan_fleet``)."""

    config: ModelConfig
    public_x: np.ndarray
    fractions: dict  # profile -> fraction of the full model's MACs
    options: REFTOptions = REFTOptions()


def pruned_config(cfg: ModelConfig, model: nn.Module) -> ModelConfig:
    """The zoo config that rebuilds ``model`` (a pruned zoo CNN): its channel counts."""
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    kwargs = dict(cfg.kwargs, channels=[m.out_channels for m in convs])
    hidden = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    if hidden:
        kwargs["hidden"] = hidden[0].out_features
    return cfg.replace(kwargs=kwargs)


def index_map(cfg: ModelConfig, record: PruneRecord, example: torch.Tensor
              ) -> dict[str, np.ndarray]:
    """Per tensor of the pruned model, the flat index in the full model's tensor of each
    entry: replay the pruning on a model whose entries hold their own indices."""
    model = build_model(cfg)
    if max(t.numel() for t in model.state_dict().values()) > 1 << 24:
        raise ValueError("index_map: a tensor has more entries than float32 counts exactly")
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape))
    replay(model, record, example)
    return {k: np.rint(v).astype(np.int64) for k, v in weights_of(model).items()}


def scatter_average(global_weights: Weights, updates: list[tuple[Weights, dict, float]]
                    ) -> Weights:
    """Each global entry: the sample-weighted mean over the updates that hold it (an
    update's ``index`` maps its entries to flat global indices); others keep theirs."""
    out = {}
    for k, g in global_weights.items():
        sums = np.zeros(g.size, np.float64)
        mass = np.zeros(g.size, np.float64)
        for w, index, n in updates:  # a kept entry has one place: indices are distinct
            idx = index[k].ravel()
            sums[idx] += w[k].astype(np.float64).ravel() * n
            mass[idx] += n
        flat = np.where(mass > 0, sums / np.maximum(mass, 1e-300), g.ravel())
        out[k] = flat.reshape(g.shape).astype(np.float32)
    return out


def soft_targets(teachers: list[tuple[np.ndarray, float]], t: float) -> torch.Tensor:
    """The ensemble's target: the sample-weighted mean of softmax(logits / T)."""
    total = sum(w for _, w in teachers)
    return sum(w / total * torch.softmax(torch.from_numpy(np.asarray(z, np.float32)) / t, dim=1)
               for z, w in teachers)


def distill(student: nn.Module, teachers: list[tuple[nn.Module, float]], x: np.ndarray,
            opts: REFTOptions, seed: int = 0) -> None:
    """Train ``student`` towards the weighted mean of the teachers' softened outputs."""
    target = soft_targets([(predict_logits(m, x), w) for m, w in teachers], opts.temperature)
    distill_to(student, target, x, opts, seed)


def distill_to(student: nn.Module, target: torch.Tensor, x: np.ndarray, opts: REFTOptions,
               seed: int = 0) -> None:
    """KL(target || softmax(student / T)) * T^2 on ``x``, by SGD with momentum."""
    t = opts.temperature
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    opt = torch.optim.SGD(student.parameters(), lr=opts.distill_lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)

    def step(idx: torch.Tensor) -> None:
        log_p = torch.log_softmax(student(xt[idx]) / t, dim=1)
        loss = nn.functional.kl_div(log_p, target[idx], reduction="batchmean") * t * t
        opt.zero_grad()
        loss.backward()
        opt.step()

    student.train()
    for _ in range(opts.distill_epochs):
        for idx in minibatches(len(xt), opts.distill_batch, gen):
            counted(shape_key("train", student, (len(idx), *xt.shape[1:])),
                    lambda idx=idx: step(idx))
    student.eval()


class REFT(Strategy):
    name = "reft"

    def __init__(self, epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
                 options: REFTSetup | None = None):
        if not isinstance(options, REFTSetup):
            raise ValueError("reft: options must be a REFTSetup (config, public split, "
                             "MAC fractions per profile)")
        if options.options.uplink not in ("weights", "logits"):
            raise ValueError(f"reft uplink: expected 'weights' or 'logits', got "
                             f"{options.options.uplink!r}")
        self.logits = options.options.uplink == "logits"
        self.setup, self.epochs, self.batch_size, self.lr = options, epochs, batch_size, lr
        self.example = example_input(options.config)
        self.student = build_model(options.config)
        self.full_macs, _ = count_macs(self.student, self.example)
        self.pruned: dict[str, tuple[ModelConfig, Weights, int]] = {}  # profile -> variant
        self.index: dict[str, dict[str, np.ndarray]] = {}  # profile -> index_map
        # profile -> the pruning first chosen (one-shot; a restarted aggregator chooses
        # again, on the weights it resumes from)
        self.records: dict[str, PruneRecord] = {}
        self.round = 0

    def _prune_all(self, global_weights: Weights) -> None:
        load_weights(self.student, global_weights)
        self.pruned = {}
        for profile, frac in self.setup.fractions.items():
            model, rec = self._pruned(profile, frac)
            if self.setup.options.average_first and not self.logits:
                self.index[profile] = index_map(self.setup.config, rec, self.example)
            macs, _ = count_macs(model, self.example)
            self.pruned[profile] = (pruned_config(self.setup.config, model), weights_of(model),
                                    macs)

    def _pruned(self, profile: str, frac: float) -> tuple[nn.Module, PruneRecord]:
        """The student pruned to ``frac`` of its MACs: anew, or (one-shot) along the
        channels chosen the first time, replayed on the current weights."""
        rec = self.records.get(profile) if self.setup.options.one_shot else None
        if rec is None:
            model, rec = prune_to_macs(self.student, self.example, int(self.full_macs * frac))
            self.records[profile] = rec
            return model, rec
        model = build_model(self.setup.config)
        load_weights(model, weights_of(self.student))
        replay(model, rec, self.example)
        return model, rec

    def variants(self, global_weights: Weights) -> dict[str, Weights]:
        self._prune_all(global_weights)  # anew every round, from the new global model
        return {f"reft-{p}": w for p, (_, w, _) in self.pruned.items()}

    def macs_of(self, profile: str) -> int:
        return self.pruned[profile][2] if profile in self.pruned else self.full_macs

    def assign(self, round_: int, devices: list[DeviceInfo]) -> dict[str, Assignment]:
        out = {}
        for d in devices:
            if d.profile not in self.pruned:
                raise ValueError(f"reft: no MAC budget for profile {d.profile!r}; known: "
                                 f"{', '.join(sorted(self.pruned))}")
            cfg = self.pruned[d.profile][0]
            sends = {"uplink": "logits", "assets": ("public",)} if self.logits else {}
            out[d.id] = Assignment(f"reft-{d.profile}", self.epochs, self.batch_size, self.lr,
                                   model=cfg.to_json(), **sends)
        return out

    def assets(self) -> dict[str, Weights]:
        if not self.logits:
            return {}
        return {"public": {"x": np.ascontiguousarray(self.setup.public_x, np.float32)}}

    def update_shapes(self, variant: str, model_shapes: dict, samples: int) -> dict:
        if not self.logits:
            return model_shapes
        return {"logits": (len(self.setup.public_x), self.setup.config.num_classes)}

    def fold(self, round_: int, global_weights: Weights, codec, ctx):
        from dataclasses import replace

        from broker_server.strategies.folds import DecodeAll

        if self.logits and codec.name not in LOGIT_CODECS:
            raise ValueError(f"reft uplink logits: expected codec {', '.join(LOGIT_CODECS)}, "
                             f"got {codec.name} (it codes model updates)")
        # Logits have no reference model: both ends code them as they are.
        return DecodeAll(self, round_, global_weights, codec,
                         replace(ctx, reference=None) if self.logits else ctx)

    def aggregate(self, round_: int, global_weights: Weights, updates: list[Update]) -> Weights:
        by_variant = {f"reft-{p}": cfg for p, (cfg, _, _) in self.pruned.items()}
        teachers, placed = [], []
        for u in updates:
            if self.logits:
                teachers.append((u.weights["logits"], float(u.samples)))
                continue
            m = build_model(by_variant[u.meta["variant"]])
            load_weights(m, u.weights)
            x = self.setup.public_x
            teachers.append((counted(shape_key("infer", m, x.shape),
                                     lambda: predict_logits(m, x)), float(u.samples)))
            index = self.index.get(u.meta["variant"].removeprefix("reft-"))
            if index is not None:
                placed.append((u.weights, index, float(u.samples)))
        if placed:
            global_weights = scatter_average(global_weights, placed)
        load_weights(self.student, global_weights)
        target = soft_targets(teachers, self.setup.options.temperature)
        distill_to(self.student, target, self.setup.public_x, self.setup.options, seed=round_)
        return weights_of(self.student)

