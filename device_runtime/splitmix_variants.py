"""SplitMix's variant names (``bases-0-3``: the model of bases 0 and 3), torch-free: the
aggregator (broker_server/strategies/splitmix.py) names and parses them without the
training code (device_runtime/training/splitmix.py) and its torch."""
from __future__ import annotations

from device_runtime.errors import ModelBuildError


ARCH = "splitmix"  # the model arch (training/models.py) whose variants are sets of bases
# The authors' width tricks and BatchNorm choice, as booleans in the model config's kwargs
# (absent: off): they change how the bases train and what state they hold, so they
# travel with the config to every device and artifact (training/splitmix.py applies them).
TRICKS = ("rescale_init", "rescale_layer", "batch_stats")


def has_bases(arch: str) -> bool:
    """Whether a model of ``arch`` is SplitMix's ensemble of bases: every device gets
    every base, and a variant name picks the bases a model runs."""
    return arch == ARCH


def config_for(cfg, variant: str):
    """The ModelConfig a device builds for ``variant``: SplitMix's names pick bases;
    any other model is the plan's (or the task's) config as it is."""
    if variant == "full" or not has_bases(cfg.arch):
        return cfg
    return cfg.replace(kwargs={**cfg.kwargs, "indices": parse_variant(variant)})


def variant_name(indices: list[int]) -> str:
    """The variant (model topic) of a set of bases, e.g. ``bases-0-3``."""
    return "bases-" + "-".join(str(i) for i in sorted(indices))


def parse_variant(name: str) -> list[int]:
    head, _, rest = name.partition("-")
    try:
        idx = [int(p) for p in rest.split("-")]
    except ValueError:
        idx = []
    if head != "bases" or not idx:
        raise ModelBuildError(f"variant: expected bases-<i>-<j>..., got {name!r}")
    return idx


__all__ = ["ARCH", "TRICKS", "has_bases", "config_for", "variant_name", "parse_variant"]
