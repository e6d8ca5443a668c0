"""REFT: pruned variants rebuilt from their config, distillation, and a job end to end."""
import numpy as np
import pytest
import torch

from device_runtime.training.local import load_weights, weights_of
from device_runtime.training.models import ModelConfig, build_model
from toolkit.model.checkpoint import example_input
from toolkit.model.pruning import count_macs, prune_to_macs
from toolkit.strategies.server.reft import REFTOptions, distill, pruned_config

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
    from toolkit.sim.simulate import SimOptions, run_simulation

    report, _ = run_simulation(SimOptions(devices=3, rounds=2, strategy="reft", epochs=1,
                                          profiles=("rpi3b", "jetson-orin-nano")))
    macs = {d["profile"]: d["macs"] for d in report["devices"]}
    assert macs["rpi3b"] <= 0.5 * macs["jetson-orin-nano"]
    assert report["rejected"] == [] and report["final_accuracy"] is not None
    assert all(d["rounds_trained"] == 2 for d in report["devices"])


def test_reft_needs_its_setup():
    from toolkit.strategies.server.reft import REFT

    with pytest.raises(ValueError, match="REFTSetup"):
        REFT()


@pytest.mark.slow  # two REFT jobs in the simulator
def test_logits_uplink_sends_the_public_split_logits_and_distils_the_same_targets():
    """Devices send N_public x classes float32 instead of their models; with a lossless
    codec the server distils exactly what it distils from the models themselves (when
    it does not also average the models' weights first)."""
    from toolkit.sim.simulate import SimOptions, run_simulation

    base = SimOptions(devices=3, rounds=2, strategy="reft", epochs=1, seed=3,
                      profiles=("rpi3b", "jetson-orin-nano"),
                      strategy_options=REFTOptions(average_first=False))
    weights, _ = run_simulation(base)
    logits, _ = run_simulation(SimOptions(**{**base.__dict__, "strategy_options":
                                             REFTOptions(uplink="logits",
                                                         average_first=False)}))
    assert logits["rejected"] == [] and logits["final_accuracy"] == weights["final_accuracy"]
    n_public = 400  # 10% of MNIST-1D's 4,000 training samples, 10 classes, 4 bytes each
    for d in logits["devices"]:
        per_round = d["uplink_bytes"] / d["rounds_trained"]
        assert n_public * 10 * 4 <= per_round < n_public * 10 * 4 + 1024
    big = max(weights["devices"], key=lambda d: d["macs"])
    assert big["uplink_bytes"] > 10 * max(d["uplink_bytes"] for d in logits["devices"])
    # each device fetches the public inputs once per job, counted in its downlink
    assert all(a["downlink_bytes"] > b["downlink_bytes"] for a, b in
               zip(logits["devices"], weights["devices"]))


def test_logits_uplink_refuses_codecs_that_code_model_updates():
    from toolkit.errors import UsageError
    from toolkit.sim.simulate import SimOptions, run_simulation

    with pytest.raises(UsageError, match="--reft-uplink logits: expected --codec fp32"):
        run_simulation(SimOptions(devices=2, rounds=1, strategy="reft", codec="fedmrn",
                                  strategy_options=REFTOptions(uplink="logits")))
    with pytest.raises(UsageError,
                       match="reft uplink: expected .weights. or .logits., got .probs."):
        run_simulation(SimOptions(devices=2, rounds=1, strategy="reft",
                                  strategy_options=REFTOptions(uplink="probs")))


def test_logits_updates_are_validated_against_the_public_split_shape():
    from toolkit.strategies.server.reft import REFT, REFTSetup

    x = np.zeros((50, 40), np.float32)
    s = REFT(options=REFTSetup(CFG, x, {"rpi4": 0.5}, REFTOptions(uplink="logits")))
    assert s.update_shapes("reft-rpi4", {"w": (3, 3)}, 7) == {"logits": (50, 10)}
    assert s.assets()["public"]["x"].shape == (50, 40)


def test_pruned_entries_map_back_to_their_places_and_average_there():
    from toolkit.strategies.server.reft import index_map, scatter_average

    torch.manual_seed(2)
    full = build_model(CFG)
    ex = example_input(CFG)
    pruned, rec = prune_to_macs(full, ex, count_macs(full, ex)[0] // 3)
    index = index_map(CFG, rec, ex)
    fw, pw = weights_of(full), weights_of(pruned)
    for k, w in pw.items():  # every kept entry is the full entry at its mapped index
        np.testing.assert_array_equal(fw[k].ravel()[index[k].ravel()], w.ravel(), err_msg=k)
    moved = {k: w + 1.0 for k, w in pw.items()}
    avg = scatter_average(fw, [(moved, index, 3.0), (fw, {k: np.arange(v.size).reshape(v.shape)
                                                          for k, v in fw.items()}, 1.0)])
    k = "stages.1.0.weight"
    held = np.zeros(fw[k].size, bool)
    held[index[k].ravel()] = True
    np.testing.assert_allclose(avg[k].ravel()[held], fw[k].ravel()[held] + 0.75, rtol=1e-5)
    np.testing.assert_allclose(avg[k].ravel()[~held], fw[k].ravel()[~held], rtol=1e-6)
