"""The model zoo, server side: naming models, splitting them, finding their classifier.

The definitions themselves live in ``device_runtime.training.models`` because
devices that train locally build the same models from the job's config.
"""
from __future__ import annotations

from torch import nn

from device_runtime.training.models import (  # noqa: F401  (re-exported)
    ARCHS,
    Classifier,
    ModelConfig,
    Normalize,
    StagedNet,
    build_model,
    scaled,
)
from device_runtime.local_models import NO_CUSTOM, LocalModels
from toolkit.errors import ModelError, UnknownModelError


def resolve_arch(name: str, input_shape: tuple[int, ...]) -> str:
    """A ``--model`` argument: a zoo name, ``cnn`` (by input rank) or ``module:callable``."""
    if ":" in name:
        return "custom"
    if name == "cnn":
        if len(input_shape) == 1:
            return "cnn1d"
        if len(input_shape) == 2:
            return "cnn2d"
        raise ModelError(f"model cnn: no zoo CNN for samples of shape {input_shape}")
    check_name(name)
    return name


def check_name(name: str) -> None:
    """A one-line UnknownModelError for a ``--model`` that is neither a zoo name, ``cnn``
    nor ``module:callable``: checked before a command loads its data, which can take
    seconds."""
    if ":" not in name and name != "cnn" and name not in ARCHS:
        raise UnknownModelError(f"unknown model {name!r}; valid: cnn, {', '.join(ARCHS)} "
                                "or package.module:callable")


def named_locally(name: str) -> LocalModels:
    """The allowlist a ``--model`` argument implies: the factory it names (with no
    kwargs, as ``make_config`` gives it) for a command that makes the config itself."""
    return LocalModels.parse([name], flag="--model") if ":" in name else NO_CUSTOM


def make_config(name: str, input_shape: tuple[int, ...], num_classes: int,
                width: float = 1.0, norm_mean: float = 0.0, norm_std: float = 1.0,
                **kwargs) -> ModelConfig:
    arch = resolve_arch(name, tuple(input_shape))
    if not width > 0:
        raise ModelError(f"width: expected > 0, got {width}")
    return ModelConfig(arch, tuple(input_shape), num_classes, width, float(norm_mean),
                       float(norm_std), name if arch == "custom" else None, dict(kwargs))


def stages_of(model: nn.Module) -> list[nn.Module] | None:
    """The model's stages if it is splittable, else None."""
    stages = getattr(model, "stages", None)
    return list(stages) if isinstance(stages, nn.ModuleList) and len(stages) >= 2 else None


def classifier_of(model: nn.Module) -> nn.Module | None:
    """The output layer (kept whole by pruning): the last Linear in the model."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


def split(model: nn.Module, after: int) -> tuple[nn.Module, nn.Module]:
    """(head, tail) sharing the model's modules: head = stages[:after]."""
    stages = stages_of(model)
    if stages is None:
        raise ModelError("model has no 'stages' ModuleList, so it cannot be split")
    if not 1 <= after < len(stages):
        raise ModelError(f"split point: expected 1..{len(stages) - 1}, got {after}")
    head, tail = nn.Sequential(*stages[:after]), nn.Sequential(*stages[after:])
    head.training = tail.training = model.training  # containers only; children keep theirs
    return head, tail
