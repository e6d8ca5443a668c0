"""HeteroFL nested widths and the heterogeneous baselines: slicing, per-entry averaging,
level choice, and a job where each profile trains its own width."""
from __future__ import annotations

import numpy as np
import pytest

from broker_server.strategies import DeviceInfo, FedAvg, FedAvgOptions
from broker_server.strategies.heterofl import (
    HeteroFL,
    HeteroFLOptions,
    NestedSum,
    nested_average,
    nested_slice,
)
from device_runtime.training.local import weights_of
from device_runtime.training.models import ModelConfig, build_model
from toolkit.strategies.server.heterofl import (
    common_width,
    full_width_profiles,
    heterofl_options,
    snap_width,
)

CFG = ModelConfig("cnn1d", (40,), 10)


def test_nested_slice_is_the_leading_block():
    w = {"a": np.arange(24, dtype=np.float32).reshape(4, 6), "s": np.float32(3) * np.ones(())}
    out = nested_slice(w, {"a": (2, 3), "s": ()})
    assert out["a"].tolist() == [[0, 1, 2], [6, 7, 8]] and out["s"].shape == ()
    with pytest.raises(ValueError, match="a of shape"):
        nested_slice(w, {"a": (5, 1)})


def test_entries_average_over_the_devices_that_hold_them():
    g = {"a": np.full((4,), 10.0, np.float32)}
    out = nested_average(g, [({"a": np.array([1, 1, 1, 1], np.float32)}, 1.0),
                             ({"a": np.array([4, 4], np.float32)}, 2.0)])
    # entries 0-1: (1*1 + 4*2) / 3; entries 2-3: only the wide device; none untrained here
    np.testing.assert_allclose(out["a"], [3, 3, 1, 1])
    acc = NestedSum(g)
    acc.add({"a": np.array([2.0], np.float32)}, 5.0)
    np.testing.assert_allclose(acc.result()["a"], [2, 10, 10, 10])  # the rest keeps its value


def test_every_width_is_a_block_of_the_full_model_and_flatten_keeps_its_prefix():
    """The width-w model computes what the full model computes when the full model's
    other channels are zero: nested slicing is exact for the zoo's channel-major flatten."""
    import torch

    opts = heterofl_options(CFG, {"small": 0.3, "big": 1.0})
    assert sorted(opts.levels, key=float) == ["0.25", "1"]
    full = build_model(CFG).eval()
    small = build_model(ModelConfig.from_json(opts.levels["0.25"]["model"])).eval()
    fw = weights_of(full)
    sw = nested_slice(fw, opts.levels["0.25"]["tensors"])
    zeroed = {k: np.zeros_like(v) for k, v in fw.items()}
    for k, v in sw.items():
        zeroed[k][tuple(slice(0, s) for s in v.shape)] = v
    for k in zeroed:  # BN of the pruned-away channels: identity on zero inputs
        if k.endswith("running_var"):
            zeroed[k][zeroed[k] == 0] = 1.0
    full.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in zeroed.items()})
    small.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sw.items()})
    x = torch.randn(5, 40)
    torch.testing.assert_close(full(x), small(x), rtol=1e-4, atol=1e-5)


def test_levels_follow_budgets_and_bad_options_name_the_field():
    opts = heterofl_options(CFG, {"rpi3b": 0.05, "rpi4": 0.6, "orin": 1.0})
    assert opts.level_of("d0", "rpi3b") == "0.125" and opts.level_of("d1", "rpi4") == "0.5"
    assert opts.level_of("d2", "orin") == "1"
    s = HeteroFL(options=opts)
    tasks = s.assign(1, [DeviceInfo("d0", "rpi3b", 10), DeviceInfo("d2", "orin", 10)])
    assert tasks["d0"].variant == "width-0.125"
    assert tasks["d0"].model["width"] == 0.125
    with pytest.raises(ValueError, match="no variant 'width-0.3'"):
        s.variant(weights_of(build_model(CFG)), "width-0.3")
    with pytest.raises(ValueError, match=r"width_by_profile\['x'\]: expected a width"):
        HeteroFLOptions(opts.levels, width_by_profile={"x": 0}).check()
    with pytest.raises(ValueError, match="HeteroFLOptions"):
        HeteroFL(options=None)


def test_baseline_widths():
    budgets = {"rpi3b": 0.05, "rpi4": 0.3, "orin": 1.0}
    assert common_width(budgets) == 0.125 and snap_width(0.3, 0.125) == 0.25
    assert full_width_profiles(budgets) == ("orin",)


def test_fedavg_trains_only_the_named_profiles():
    s = FedAvg(options=FedAvgOptions(("orin",)))
    tasks = s.assign(1, [DeviceInfo("a", "rpi4", 5), DeviceInfo("b", "orin", 5)])
    assert list(tasks) == ["b"]


def test_heterofl_job_each_profile_trains_its_width():
    from toolkit.sim.simulate import SimOptions, run_simulation

    r, _ = run_simulation(SimOptions(devices=4, rounds=2, strategy="heterofl", epochs=1,
                                     profiles=("rpi3b", "jetson-orin-nano"), seed=1))
    by = {d["profile"]: d for d in r["devices"]}
    small, big = by["rpi3b"], by["jetson-orin-nano"]
    assert small["macs"] * 4 < big["macs"]  # width 1/8 against width 1
    assert small["uplink_bytes"] * 8 < big["uplink_bytes"]
    assert r["final_accuracy"] > 0.15 and not r["rejected"]
