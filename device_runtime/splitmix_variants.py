"""SplitMix's variant names (``bases-0-3``: the model of bases 0 and 3), torch-free: the
aggregator (broker_server/strategies/splitmix.py) names and parses them without the
training code (device_runtime/training/splitmix.py) and its torch."""
from __future__ import annotations

from device_runtime.errors import ModelBuildError


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


__all__ = ["variant_name", "parse_variant"]
