"""Per-device planning: how much model each device can afford, where to split, which opset.

REFT's variable pruning: a device gets a MAC budget in proportion to its
compute (relative to the reference device, by default the strongest of the
fleet), further capped by what its memory can train, and never below
``min_macs_fraction`` of the full model. The split point minimizes the
device's estimated time per sample (head compute + sending the 8-bit
activation at the cut). These are pure functions of profiles and analysis.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from toolkit.errors import UsageError
from toolkit.model.analysis import StageInfo
from toolkit.planning.profiles import DeviceProfile

# The dynamo exporter implements opset 18 and up; below it only the legacy
# TorchScript exporter produces a native graph (Jetson Nano's ORT 1.10 = opset 15).
DYNAMO_MIN_OPSET = 18
MIN_OPSET = 13  # per-channel QDQ quantization needs 13


@dataclass(frozen=True)
class PlanOptions:
    reference_gflops: float | None = None  # None: the strongest device of the fleet
    min_macs_fraction: float = 0.2
    ram_fraction: float = 0.25  # share of RAM local training may use
    preferred_opset: int = 18
    split_after: int | None = None  # force the split point (stage boundary)
    codec: str = "fp32"


@dataclass(frozen=True)
class SplitCandidate:
    after: int  # head = stages[:after]
    head_macs: int
    act_shape: tuple[int, ...]
    act_bytes_fp32: int
    act_bytes_int8: int
    est_ms: float  # head compute + int8 activation upload, per sample
    head_params: int = 0


@dataclass
class DevicePlan:
    profile: str
    method: str  # "prune" (REFT variable pruning)
    macs_budget: int
    compute_fraction: float
    opset: int
    exporter: str  # "dynamo" | "torchscript"
    codec: str
    prune_ratio: float = 0.0  # filled by prepare
    macs: int = 0
    params: int = 0
    split: SplitCandidate | None = None
    split_candidates: list[SplitCandidate] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def choose_opset(profile: DeviceProfile, opts: PlanOptions) -> tuple[int, str]:
    opset = min(profile.max_opset, opts.preferred_opset)
    if opset < MIN_OPSET:
        raise UsageError(f"profile {profile.name}: max_opset {profile.max_opset} is below "
                         f"{MIN_OPSET}, the lowest fedge exports (int8 QDQ needs it)")
    return opset, ("dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript")


def compute_fraction(profile: DeviceProfile, reference_gflops: float, full_params: int,
                     opts: PlanOptions) -> float:
    """Share of the full model's MACs this device is given."""
    frac = min(1.0, profile.gflops / reference_gflops)
    # Training memory ~ 16 bytes per parameter (weights, grads, two Adam moments);
    # parameters shrink with MACs under channel pruning, so cap the fraction too.
    need = 16 * full_params
    budget = profile.ram_mb * 1e6 * opts.ram_fraction
    if need > budget:
        frac = min(frac, budget / need)
    return max(opts.min_macs_fraction, frac)


def plan_fleet(profiles: list[DeviceProfile], full_macs: int, full_params: int,
               opts: PlanOptions = PlanOptions()) -> dict[str, DevicePlan]:
    """One plan per profile; the prune ratio and split are filled in by prepare."""
    if not profiles:
        raise UsageError("no device profile to plan for")
    ref = opts.reference_gflops or max(p.gflops for p in profiles)
    plans = {}
    for p in profiles:
        frac = compute_fraction(p, ref, full_params, opts)
        opset, exporter = choose_opset(p, opts)
        plans[p.name] = DevicePlan(p.name, "prune", int(full_macs * frac), round(frac, 4),
                                   opset, exporter, opts.codec)
    return plans


def split_candidates(infos: list[StageInfo], profile: DeviceProfile) -> list[SplitCandidate]:
    """Every stage boundary that leaves the classifier on the server side."""
    out, head_macs, head_params = [], 0, 0
    for info in infos[:-1]:
        head_macs += info.macs
        head_params += info.params
        compute_ms = 2 * head_macs / (profile.gflops * 1e9) * 1e3
        send_ms = info.out_elems * 8 / (profile.uplink_kbps * 1e3) * 1e3
        out.append(SplitCandidate(info.index + 1, head_macs, info.out_shape,
                                  4 * info.out_elems, info.out_elems,
                                  round(compute_ms + send_ms, 6), head_params))
    return out


def choose_split(cands: list[SplitCandidate], override: int | None) -> SplitCandidate | None:
    if not cands:
        return None
    if override is not None:
        for c in cands:
            if c.after == override:
                return c
        raise UsageError(f"split_after: expected one of "
                         f"{', '.join(str(c.after) for c in cands)}, got {override}")
    return min(cands, key=lambda c: (c.est_ms, c.after))
