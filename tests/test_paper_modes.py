"""Paper modes (``--paper``): each method's published settings in one place (its options
class's ``paper()``), flags given explicitly laid over them, refused by a strategy that
has none; EcoFed's fresh tail and REFT's one-shot pruning do what they say."""
import argparse

import numpy as np
import pytest
import torch

from device_runtime.training.local import weights_of
from device_runtime.training.models import ModelConfig, build_model
from toolkit.cli import strategy_args
from toolkit.errors import UsageError
from toolkit.planning.profiles import ProfileCatalogue
from toolkit.strategies.options import EcoFedOptions, REFTOptions

CFG = ModelConfig("cnn1d", (40,), 10)


def _options(*argv: str):
    p = argparse.ArgumentParser()
    p.add_argument("--strategy")
    strategy_args.add(p)
    return strategy_args.options(p.parse_args(list(argv)), ProfileCatalogue.load(), ["rpi4"])


def test_without_paper_the_defaults_are_fedges():
    assert _options("--strategy", "ecofed") == EcoFedOptions()
    assert _options("--strategy", "reft") == REFTOptions()


def test_paper_gives_the_published_settings():
    eco = _options("--strategy", "ecofed", "--paper")
    assert eco == EcoFedOptions.paper()
    assert (eco.iterations, eco.batch_size, eco.shared_tail, eco.tail_init) == \
        (50, 10, False, "fresh")
    reft = _options("--strategy", "reft", "--paper")
    assert reft == REFTOptions.paper() and reft.one_shot and not reft.average_first


def test_flags_given_explicitly_win_over_paper():
    eco = _options("--strategy", "ecofed", "--paper", "--tail-steps", "12", "--shared-tail")
    assert (eco.iterations, eco.shared_tail, eco.batch_size) == (12, True, 10)
    reft = _options("--strategy", "reft", "--paper", "--reft-average", "yes")
    assert reft.average_first and reft.one_shot
    reft = _options("--strategy", "reft", "--reft-distill-epochs", "0")  # averaging only
    assert reft == REFTOptions(distill_epochs=0)


def test_paper_on_a_strategy_without_one_is_a_one_line_error():
    with pytest.raises(UsageError, match="--paper: strategy fedavg has no paper mode "
                       r"\(these do: .*ecofed.*reft"):
        _options("--strategy", "fedavg", "--paper")


@pytest.mark.parametrize("argv, needle", [
    (("--strategy", "ecofed", "--tail-steps", "0"), "ecofed iterations: expected a positive "
                                                     "int, got 0"),
    (("--strategy", "reft", "--reft-distill-epochs", "-1"), "reft distill_epochs: expected "
                                                             "an int >= 0, got -1"),
])
def test_bad_values_name_the_option(argv, needle):
    with pytest.raises(UsageError, match=needle):
        _options(*argv)


def test_a_fresh_tail_leaves_the_head_and_is_repeatable():
    from toolkit.strategies.ecofed import fresh_tail

    torch.manual_seed(0)
    model = build_model(CFG)
    with torch.no_grad():  # a "trained" model: every weight moved away from its init
        for p in model.parameters():
            p.add_(1.0)
    before = weights_of(model)
    fresh_tail(model, 2)
    after = weights_of(model)
    again = build_model(CFG)
    again.load_state_dict(model.state_dict())
    fresh_tail(again, 2)
    stage = {k: int(k.split(".")[1]) for k in before if k.startswith("stages.")}
    for k in before:
        moved = not np.array_equal(before[k], after[k])
        if k in stage and stage[k] < 2:
            assert not moved, k  # the device layers keep their pre-training
        elif k.endswith("weight") and "num_batches" not in k:
            assert moved, k
        np.testing.assert_array_equal(after[k], weights_of(again)[k])  # seeded


def _reft(one_shot: bool):
    from toolkit.strategies.server.reft import REFT, REFTSetup

    x = np.zeros((8, 40), np.float32)
    return REFT(options=REFTSetup(CFG, x, {"rpi3b": 0.3},
                                  REFTOptions(one_shot=one_shot, average_first=True)))


def _reversed_importance(w: dict) -> dict:
    """The same model with each conv's output channels in reverse order of magnitude:
    pruning by magnitude anew would keep other channels."""
    out = {}
    for k, v in w.items():
        out[k] = v[::-1].copy() if v.ndim >= 1 and k.startswith("stages.") else v
    return out


@pytest.mark.parametrize("one_shot", [True, False])
def test_one_shot_pruning_keeps_the_first_rounds_channels(one_shot):
    torch.manual_seed(0)
    w1 = weights_of(build_model(CFG))
    scale = {k: (np.arange(v.shape[0], dtype=np.float32)[:, None, None] + 1 if v.ndim == 3
                 else 1) for k, v in w1.items()}
    w1 = {k: (v * scale[k]).astype(np.float32) for k, v in w1.items()}
    s = _reft(one_shot)
    s.variants(w1)
    first = s.index["rpi3b"]
    w2 = _reversed_importance(w1)
    pruned = s.variants(w2)["reft-rpi3b"]
    same = all(np.array_equal(first[k], s.index["rpi3b"][k]) for k in first)
    assert same is one_shot
    for k, idx in s.index["rpi3b"].items():  # the variant holds w2's entries at its places
        np.testing.assert_array_equal(pruned[k], w2[k].ravel()[idx])
