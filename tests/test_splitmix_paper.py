"""SplitMix's paper mode: the options (``SplitMixOptions.paper()``) and their checks, the
reshuffling base sampler, the authors' width tricks and batch statistics in the bases,
the CLI (``--paper`` and a flag per option), and an export of a paper-mode base."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from broker_server.strategies.base import DeviceInfo
from broker_server.strategies.splitmix import CyclicSampler, SplitMix, SplitMixOptions
from device_runtime.errors import ModelBuildError
from device_runtime.splitmix_variants import config_for, parse_variant
from device_runtime.training.models import ModelConfig, build_model
from tests.conftest import assert_one_line_error, run_fedge

PAPER = {"rescale_init": True, "rescale_layer": True, "batch_stats": True}


def _cfg(m: int = 4, base: str = "cnn1d", **tricks) -> ModelConfig:
    return ModelConfig("splitmix", (40,), 10, 1 / m, kwargs={"base": base, "bases": m,
                                                             **tricks})


def _built(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg)


# ---- options ----

def test_fedge_defaults_are_unchanged_and_paper_turns_every_trick_on():
    d, p = SplitMixOptions(), SplitMixOptions.paper()
    assert (d.rescale_init, d.rescale_layer, d.batch_stats, d.base_sampling) == \
        (False, False, False, "cyclic")
    assert d.model_kwargs() == {}  # a default config is what it always was
    assert (p.rescale_init, p.rescale_layer, p.batch_stats, p.base_sampling) == \
        (True, True, True, "reshuffle")
    assert p.model_kwargs() == PAPER and (p.atom, p.budgets) == (d.atom, d.budgets)
    p.check()


@pytest.mark.parametrize("opts,message", [
    (SplitMixOptions(rescale_init="yes"), "rescale_init: expected True or False, got 'yes'"),
    (SplitMixOptions(batch_stats=1), "batch_stats: expected True or False, got 1"),
    (SplitMixOptions(base_sampling="random"),
     "base_sampling: expected one of cyclic, reshuffle, got 'random'"),
    (SplitMixOptions(rescale_layer=True),
     "rescale_layer: expected False unless batch_stats is True")])
def test_bad_options_are_refused_naming_field_expected_and_actual(opts, message):
    with pytest.raises(ValueError) as e:
        SplitMix(options=opts)
    assert str(e.value).startswith(message)


# ---- base sampling ----

def test_reshuffled_sampling_is_seeded_reproducible_and_covers_every_cycle():
    m = 8
    a = CyclicSampler(m, seed=5, reshuffle=True)
    seq = [a.next() for _ in range(6 * m)]
    b = CyclicSampler(m, seed=5, reshuffle=True)
    assert [b.next() for _ in range(6 * m)] == seq
    other = CyclicSampler(m, seed=6, reshuffle=True)
    assert [other.next() for _ in range(6 * m)] != seq
    cycles = [seq[c * m:(c + 1) * m] for c in range(6)]
    assert all(sorted(c) == list(range(m)) for c in cycles)
    assert len({tuple(c) for c in cycles}) > 1  # reshuffled, not one fixed order
    fixed = CyclicSampler(m, seed=5)
    assert [fixed.next() for _ in range(m)] == cycles[0]  # the first cycle is fedge's
    restored = CyclicSampler(m, seed=5, reshuffle=True)
    restored.load({"pos": 19})  # a restart mid-cycle
    assert [restored.next() for _ in range(2 * m)] == seq[19:19 + 2 * m]


def test_a_paper_strategy_trains_every_base_in_each_aligned_cycle():
    m, n = 8, 4
    s = SplitMix(options=SplitMixOptions(atom=1 / m, default_budget=1 / m,
                                         base_sampling="reshuffle"))
    devices = [DeviceInfo(f"d{k}", "rpi4", 100) for k in range(n)]
    trained = [{i for a in s.assign(r, devices).values() for i in parse_variant(a.variant)}
               for r in range(1, 9)]
    for start in range(0, 8, m // n):
        assert set().union(*trained[start:start + m // n]) == set(range(m))


# ---- the model ----

@pytest.mark.parametrize("m,base", [(4, "cnn1d"), (8, "cnn1d"), (4, "cnn-wide")])
def test_rescale_init_scales_every_layer_but_the_first_by_sqrt_atom(m, base):
    plain, scaled = _built(_cfg(m, base)), _built(_cfg(m, base, rescale_init=True))
    ref = dict(plain.named_parameters())
    layers = [n for n, mod in scaled.bases["0"].named_modules()
              if isinstance(mod, (nn.Linear, nn.Conv1d))]
    for name, p in scaled.named_parameters():
        layer = name.split(".", 2)[2].rsplit(".", 1)[0]
        factor = 1.0 if layer not in layers or layer == layers[0] else math.sqrt(1 / m)
        torch.testing.assert_close(p, ref[name] * factor, msg=name)  # BatchNorm: 1


def test_rescale_layer_divides_conv_outputs_by_atom_in_training_only():
    model = _built(_cfg(4, **PAPER))
    base = model.bases["0"]
    convs = [mod for mod in base.modules() if isinstance(mod, nn.Conv1d)]
    x = torch.randn(6, convs[1].in_channels, 10)
    want = nn.functional.conv1d(x, convs[1].weight, None, convs[1].stride, convs[1].padding)
    model.train()
    torch.testing.assert_close(convs[1](x), want / 0.25)
    model.eval()
    torch.testing.assert_close(convs[1](x), want)
    assert all(c._forward_hooks for c in convs)  # the first conv too, as the authors do
    assert not base.stages[-1].fc._forward_hooks  # never the classifier
    wide = _built(_cfg(4, "cnn-wide", **PAPER)).bases["0"]
    assert not wide.stages[-2].fc._forward_hooks  # no BatchNorm after it: left alone


def test_batch_stats_normalise_with_the_batch_not_running_statistics():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(16, 40)).astype(np.float32))
    shifted = torch.cat([x[:1], x[1:] + 3.0])  # same first sample, a batch of other mean
    for tricks, moves in (({}, False), ({"batch_stats": True}, True)):
        model = _built(_cfg(4, **tricks)).eval()
        with torch.no_grad():
            a, b = model(x)[0], model(shifted)[0]
        assert (not torch.allclose(a, b, atol=1e-4)) == moves, tricks
    state = _built(_cfg(4, batch_stats=True)).state_dict()
    assert not [k for k in state if "running" in k or "num_batches" in k]


def test_the_tricks_travel_to_a_device_variant_and_bad_ones_are_refused():
    cfg = _cfg(4, **PAPER)
    part = build_model(config_for(cfg, "bases-1-3"))
    assert part.indices == [1, 3]
    assert not [k for k in part.state_dict() if "running" in k]
    assert part.bases["1"].stages[1][0]._forward_hooks
    with pytest.raises(ModelBuildError, match="kwargs.rescale_init: expected true or false"):
        build_model(_cfg(4, rescale_init="yes"))


# ---- export ----

@pytest.mark.parametrize("opset", [15, 18])
def test_a_paper_mode_base_exports_and_matches_torch_batch_for_batch(opset, tmp_path):
    from device_runtime.session import open_session, run
    from exporters.onnx_fp32 import export_fp32

    model = _built(_cfg(4, **PAPER))
    base = model.bases["2"].eval()
    x = np.random.default_rng(1).normal(size=(48, 40)).astype(np.float32)
    path = export_fp32(base, torch.from_numpy(x[:2]), tmp_path / "b.onnx", opset, "x",
                       "logits", {})
    got = run(open_session(path, threads=1, providers=["CPUExecutionProvider"]), x, 16)
    with torch.no_grad():
        want = np.concatenate([base(torch.from_numpy(x[i:i + 16])).numpy()
                               for i in range(0, 48, 16)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---- CLI ----

def _options(*argv: str):
    from toolkit.cli import strategy_args
    from toolkit.cli.main import build_parser
    from toolkit.planning.profiles import ProfileCatalogue

    args = build_parser("simulate").parse_args(["simulate", "--json", "unused.json",
                                                "--strategy", "splitmix", *argv])
    return strategy_args.options(args, ProfileCatalogue.load(), ["rpi4"])


def test_paper_flag_builds_the_paper_options_and_explicit_flags_win():
    assert _options() == SplitMixOptions()
    assert _options("--paper") == SplitMixOptions.paper()
    got = _options("--paper", "--no-splitmix-rescale-init", "--splitmix-base-sampling",
                   "cyclic", "--splitmix-atom", "0.25")
    assert got == SplitMixOptions(atom=0.25, rescale_layer=True, batch_stats=True)
    assert _options("--splitmix-batch-stats") == SplitMixOptions(batch_stats=True)


def test_a_splitmix_checkpoint_goes_on_only_with_the_tricks_it_was_trained_with():
    from toolkit.errors import UsageError
    from toolkit.planning.profiles import ProfileCatalogue
    from toolkit.strategies.setups import setup_strategy

    fleet, public = ProfileCatalogue.load().select("rpi4"), np.zeros((4, 40), np.float32)
    trained = _cfg(8, **PAPER)
    cfg, opts = setup_strategy("splitmix", trained, fleet, public, "fp32",
                               SplitMixOptions.paper())
    assert cfg == trained and opts.batch_stats
    with pytest.raises(UsageError, match="--splitmix-rescale-layer: the checkpoint's bases "
                       "were trained with rescale_layer False, the options ask for True"):
        setup_strategy("splitmix", _cfg(8), fleet, public, "fp32", SplitMixOptions.paper())


def test_a_bad_splitmix_flag_is_a_one_line_error(tmp_path):
    code, _, err = run_fedge("simulate", "--strategy", "splitmix", "--splitmix-base-sampling",
                             "random", "--json", str(tmp_path / "x.json"))
    assert_one_line_error(code, err, 2, "--splitmix-base-sampling: base_sampling: expected "
                          "one of cyclic, reshuffle, got 'random'")
    assert not (tmp_path / "x.json").exists()


def test_a_paper_run_trains_and_reports_every_width():
    from toolkit.sim.simulate import SimOptions, run_simulation

    opts = SplitMixOptions.paper()
    report, ckpt = run_simulation(SimOptions(devices=3, rounds=2, strategy="splitmix",
                                             epochs=1, strategy_options=opts))
    assert report["rejected"] == [] and len(report["width_accuracy"]) == 8
    assert {k: ckpt.config.kwargs[k] for k in PAPER} == PAPER
    assert all(d["rounds_trained"] == 2 for d in report["devices"])
