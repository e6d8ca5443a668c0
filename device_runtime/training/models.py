"""Model definitions a device trains: width-scalable staged CNNs and user modules.

A model is a chain of *stages* (``model.stages``, run in order). The first
stage owns input normalization, so exported graphs take raw float32 features;
the last stage is the classifier. Split points are the boundaries between
stages, and every channel count scales with ``width``.

A user model is any ``nn.Module`` built by a ``module:callable`` factory; give
it a ``stages`` ``nn.ModuleList`` run in order to make it splittable. The
``ModelConfig`` travels in checkpoints, artifacts and the job plan, so the
server and every device build the same model; since those are data, a custom
config is built only with the factory in the caller's ``LocalModels`` allowlist
(``device_runtime.local_models``), checked before its module is imported.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from device_runtime.errors import ModelBuildError
from device_runtime.local_models import NO_CUSTOM, LocalModels
from device_runtime.splitmix_variants import has_bases

# Base channel counts at width 1, per architecture.
ARCHS = {
    "cnn1d": {"dims": 1, "channels": (32, 64, 128, 128), "kernels": (5, 3, 3, 3),
              "strides": (1, 2, 2, 2)},
    "cnn2d": {"dims": 2, "channels": (16, 32, 64), "kernels": (3, 3, 3), "strides": (1, 2, 2)},
    # Weights heavy next to activations (as VGG's classifier is): 1.4M parameters, most
    # in a bias-free hidden layer, so that 1-bit codecs pay little for full-precision
    # BN and biases, and a split after the convs sends 1,280 values per sample.
    "cnn-wide": {"dims": 1, "channels": (64, 128, 128), "kernels": (5, 5, 5),
                 "strides": (1, 2, 2), "hidden": 1024},
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved in every checkpoint and artifact."""

    arch: str  # a key of ARCHS, or "custom"
    input_shape: tuple[int, ...]  # one sample, as the dataset returns it
    num_classes: int
    width: float = 1.0
    norm_mean: float = 0.0
    norm_std: float = 1.0
    factory: str | None = None  # "package.module:callable" for arch "custom" (allowlisted)
    kwargs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ModelBuildError(f"model config: unknown field {sorted(unknown)[0]!r}")
        d = dict(d)
        d["input_shape"] = tuple(d.get("input_shape", ()))
        try:
            return cls(**d)
        except TypeError as e:
            raise ModelBuildError(f"model config: {e}") from None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def __hash__(self) -> int:  # kwargs is a dict; hash the JSON form
        return hash(json.dumps(self.to_json(), sort_keys=True))


class Normalize(nn.Module):
    """Raw features -> standardized, reshaped to (N, 1, *sample) for the convs."""

    def __init__(self, mean: float, std: float, sample_shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("inv_std", torch.tensor(1.0 / std, dtype=torch.float32))
        self.sample_shape = tuple(sample_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) * self.inv_std).reshape(-1, 1, *self.sample_shape)


class Classifier(nn.Module):
    """Flatten + linear; never pruned (its outputs are the classes)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


class Hidden(nn.Module):
    """Flatten + bias-free linear + ReLU: a wide fully connected stage."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.fc = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(torch.flatten(x, 1)))


class StagedNet(nn.Module):
    """A model that is a chain of stages; split points are stage boundaries."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    @property
    def classifier(self) -> nn.Linear:
        return self.stages[-1].fc


def _conv_block(dims: int, cin: int, cout: int, k: int, s: int) -> list[nn.Module]:
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    bn = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    return [conv(cin, cout, k, stride=s, padding=k // 2, bias=False), bn(cout), nn.ReLU()]


def _out_len(n: int, k: int, s: int) -> int:
    return (n + 2 * (k // 2) - k) // s + 1


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def build_cnn(cfg: ModelConfig) -> StagedNet:
    spec = ARCHS[cfg.arch]
    dims = spec["dims"]
    if len(cfg.input_shape) != dims:
        raise ModelBuildError(f"model {cfg.arch}: expects {dims}-D samples, got shape "
                         f"{cfg.input_shape}")
    stages: list[nn.Module] = []
    cin, size = 1, list(cfg.input_shape)
    channels = _channels(cfg, spec)
    for i, (cout, k, s) in enumerate(zip(channels, spec["kernels"], spec["strides"])):
        layers = _conv_block(dims, cin, cout, k, s)
        if i == 0:
            layers.insert(0, Normalize(cfg.norm_mean, cfg.norm_std, cfg.input_shape))
        stages.append(nn.Sequential(*layers))
        cin, size = cout, [_out_len(n, k, s) for n in size]
    flat = cin
    for n in size:
        flat *= n
    if "hidden" in spec:
        hidden = int(cfg.kwargs.get("hidden") or scaled(spec["hidden"], cfg.width))
        stages.append(Hidden(flat, hidden))
        flat = hidden
    stages.append(Classifier(flat, cfg.num_classes))
    return StagedNet(stages)


def _channels(cfg: ModelConfig, spec: dict) -> list[int]:
    """Per conv: ``kwargs["channels"]`` (a pruned model's counts) or the arch's, scaled."""
    given = cfg.kwargs.get("channels")
    if given is None:
        return [scaled(c, cfg.width) for c in spec["channels"]]
    if not isinstance(given, list) or len(given) != len(spec["channels"]) or \
            any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in given):
        raise ModelBuildError(f"model {cfg.arch} kwargs.channels: expected "
                              f"{len(spec['channels'])} positive ints, got {given!r}")
    return list(given)


def build_model(cfg: ModelConfig, allowed: LocalModels = NO_CUSTOM) -> nn.Module:
    """A fresh (untrained) model for ``cfg``: a zoo architecture, or a custom factory
    that ``allowed`` names with exactly ``cfg.kwargs`` (else ModelNotAllowedError)."""
    if cfg.arch in ARCHS:
        return build_cnn(cfg)
    if cfg.arch == "custom":
        return _build_custom(cfg, allowed)
    if has_bases(cfg.arch):
        from device_runtime.training.splitmix import build_splitmix

        return build_splitmix(cfg, ARCHS, build_cnn)
    raise ModelBuildError(f"unknown model arch {cfg.arch!r}; valid: {', '.join(ARCHS)}, "
                          "custom, splitmix")


def _build_custom(cfg: ModelConfig, allowed: LocalModels) -> nn.Module:
    allowed.check(cfg.arch, cfg.factory, cfg.kwargs)  # before any import: data names no code
    kwargs = allowed.kwargs_for(cfg.factory)  # the operator's, equal to the config's
    mod_name, _, fn_name = cfg.factory.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ModelBuildError(f"model factory {cfg.factory!r} cannot be imported: {e}") from None
    try:
        model = fn(input_shape=cfg.input_shape, num_classes=cfg.num_classes, **kwargs)
    except Exception as e:  # user code: report it, do not crash
        raise ModelBuildError(f"model factory {cfg.factory!r} failed: "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelBuildError(f"model factory {cfg.factory!r} returned {type(model).__name__}, "
                         "not an nn.Module")
    return model
