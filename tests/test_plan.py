"""Planning: MAC budgets, opsets, split points (pure functions)."""
import pytest

from toolkit.errors import UsageError
from toolkit.model.analysis import StageInfo
from toolkit.planning.plan import (
    PlanOptions,
    choose_opset,
    choose_split,
    plan_fleet,
    split_candidates,
)
from toolkit.planning.profiles import ProfileCatalogue


@pytest.fixture
def cat():
    return ProfileCatalogue.load()


def test_budgets_follow_compute_with_a_floor(cat):
    fleet = cat.select("rpi3b,rpi4,rpi5")
    plans = plan_fleet(fleet, full_macs=1_000_000, full_params=10_000,
                       opts=PlanOptions(min_macs_fraction=0.1))
    assert plans["rpi5"].macs_budget == 1_000_000
    assert plans["rpi4"].macs_budget == int(1_000_000 * 13.5 / 31)
    assert plans["rpi3b"].macs_budget == int(1_000_000 * 3.6 / 31)
    floor = plan_fleet(fleet, 1_000_000, 10_000, PlanOptions(min_macs_fraction=0.5))
    assert floor["rpi3b"].macs_budget == 500_000


def test_memory_caps_the_budget(cat):
    rpi3b = cat.get("rpi3b")  # 1 GB, a quarter of it for training
    plans = plan_fleet([rpi3b], 1_000_000, full_params=64_000_000,
                       opts=PlanOptions(min_macs_fraction=0.01))
    assert plans["rpi3b"].compute_fraction == pytest.approx(1024e6 * 0.25 / (16 * 64e6), 1e-3)


def test_opset_and_exporter_per_profile(cat):
    assert choose_opset(cat.get("jetson-nano"), PlanOptions()) == (15, "torchscript")
    assert choose_opset(cat.get("rpi4"), PlanOptions()) == (18, "dynamo")


def test_split_minimizes_device_time_and_can_be_forced(cat):
    infos = [StageInfo(0, 1000, 10, (8, 40)), StageInfo(1, 5000, 10, (16, 20)),
             StageInfo(2, 9000, 10, (4, 10)), StageInfo(3, 100, 10, (10,))]
    cands = split_candidates(infos, cat.get("rpi3b"))
    assert [c.after for c in cands] == [1, 2, 3]
    assert [c.act_bytes_int8 for c in cands] == [320, 320, 40]
    assert [c.head_macs for c in cands] == [1000, 6000, 15000]
    assert choose_split(cands, None).after == 3
    assert choose_split(cands, 1).after == 1
    with pytest.raises(UsageError, match="split_after"):
        choose_split(cands, 7)
