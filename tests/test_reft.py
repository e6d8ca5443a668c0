"""REFT: pruned variants rebuilt from their config, distillation, and a job end to end."""
import numpy as np
import pytest
import torch

from device_runtime.training.local import load_weights, weights_of
from device_runtime.training.models import ModelConfig, build_model
from toolkit.checkpoint import example_input
from toolkit.pruning import count_macs, prune_to_macs
from toolkit.reft import REFTOptions, distill, pruned_config

CFG = ModelConfig("cnn1d", (40,), 10)


def test_a_pruned_model_is_rebuilt_from_its_config_with_the_same_shapes():
    torch.manual_seed(0)
    full = build_model(CFG)
    ex = example_input(CFG)
    macs, _ = count_macs(full, ex)
    pruned, _ = prune_to_macs(full, ex, macs // 3)
    rebuilt = build_model(pruned_config(CFG, pruned))
    load_weights(rebuilt, weights_of(pruned))  # raises on any shape mismatch
    x = torch.randn(4, 40)
    pruned.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), pruned(x))
    assert count_macs(rebuilt, ex)[0] <= macs // 3


def test_distillation_moves_the_student_towards_the_teachers():
    torch.manual_seed(1)
    x = np.random.default_rng(0).normal(size=(256, 40)).astype(np.float32)
    teacher, student = build_model(CFG), build_model(CFG)
    with torch.no_grad():  # a confident teacher, so there is something to learn
        teacher.classifier.weight.mul_(30)
    opts = REFTOptions(temperature=2.0, distill_epochs=20, distill_lr=0.05)

    def gap():
        with torch.no_grad():
            t = torch.softmax(teacher.eval()(torch.from_numpy(x)) / 2, 1)
            s = torch.log_softmax(student.eval()(torch.from_numpy(x)) / 2, 1)
            return float(torch.nn.functional.kl_div(s, t, reduction="batchmean"))
    before = gap()
    distill(student, [(teacher, 1.0)], x, opts)
    assert gap() < 0.5 * before


def test_reft_job_prunes_for_the_weakest_device_and_runs_end_to_end():
    from toolkit.simulate import SimOptions, run_simulation

    report, _ = run_simulation(SimOptions(devices=3, rounds=2, strategy="reft", epochs=1,
                                          profiles=("rpi3b", "jetson-orin-nano")))
    macs = {d["profile"]: d["macs"] for d in report["devices"]}
    assert macs["rpi3b"] <= 0.5 * macs["jetson-orin-nano"]
    assert report["rejected"] == [] and report["final_accuracy"] is not None
    assert all(d["rounds_trained"] == 2 for d in report["devices"])


def test_reft_needs_its_setup():
    from toolkit.reft import REFT

    with pytest.raises(ValueError, match="REFTSetup"):
        REFT()
