"""Model zoo, checkpoints and pruning."""
import numpy as np
import pytest
import torch

from device_runtime.local_models import LocalModels
from tests.conftest import assert_one_line_error
from toolkit.cli.main import main
from toolkit.errors import CheckpointError, ModelError
from toolkit.model import checkpoint, zoo
from toolkit.model.pruning import PruneRecord, count_macs, prune, prune_to_macs, replay


def _cfg(width=1.0):
    return zoo.make_config("cnn", (40,), 10, width, 0.5, 2.0)


def test_width_scales_every_conv():
    full, half = zoo.build_model(_cfg(1.0)), zoo.build_model(_cfg(0.5))
    convs = lambda m: [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv1d)]
    assert convs(full) == [32, 64, 128, 128]
    assert convs(half) == [16, 32, 64, 64]
    x = torch.randn(3, 40)
    assert full(x).shape == half(x).shape == (3, 10)


def test_normalization_is_inside_the_model():
    m = zoo.build_model(zoo.make_config("cnn", (40,), 10, 1.0, 3.0, 2.0)).eval()
    x = torch.full((1, 40), 3.0)
    first = m.stages[0][0](x)  # the Normalize layer sees raw features
    assert torch.allclose(first, torch.zeros_like(first))


def test_cnn2d_for_digits_and_split_points():
    m = zoo.build_model(zoo.make_config("cnn", (8, 8), 10)).eval()
    x = torch.randn(4, 8, 8)
    head, tail = zoo.split(m, 2)
    assert torch.allclose(tail(head(x)), m(x))
    with pytest.raises(ModelError, match="split point"):
        zoo.split(m, len(m.stages))


def test_checkpoint_roundtrip_keeps_config_and_weights(tmp_path):
    m = zoo.build_model(_cfg())
    path = checkpoint.save(checkpoint.Checkpoint(_cfg(), m, metrics={"a": 1}), tmp_path / "c")
    ck = checkpoint.load(path)
    assert ck.config == _cfg() and ck.metrics == {"a": 1}
    x = torch.randn(2, 40)
    assert torch.equal(ck.model(x), m.eval()(x))


def test_checkpoint_keeps_its_dataset_spec_and_refuses_a_malformed_one(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from toolkit.model import datasets

    spec = datasets.spec_for("mnist1d:600")
    path = checkpoint.save(checkpoint.Checkpoint(_cfg(), zoo.build_model(_cfg()),
                                                 dataset=spec), tmp_path / "d")
    assert checkpoint.load(path).dataset == spec  # export calibrates on the same data
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for bad in ('{"name": "mnist1d", "size": 600}', '"mnist1d"'):
        save_file(tensors, str(tmp_path / "bad.safetensors"), dict(meta, dataset=bad))
        with pytest.raises(CheckpointError, match="bad.safetensors: metadata is malformed"):
            checkpoint.load(tmp_path / "bad.safetensors")


def test_pruned_checkpoint_rebuilds_its_shapes(tmp_path):
    m = zoo.build_model(_cfg()).eval()
    rec = prune(m, torch.zeros(1, 40), 0.5)
    path = checkpoint.save(checkpoint.Checkpoint(_cfg(), m, rec), tmp_path / "p")
    ck = checkpoint.load(path)
    x = torch.randn(2, 40)
    assert torch.equal(ck.model(x), m(x))


def test_corrupt_or_missing_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "none.safetensors")
    good = checkpoint.save(checkpoint.Checkpoint(_cfg(), zoo.build_model(_cfg())), tmp_path / "g")
    data = bytearray(good.read_bytes())
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        checkpoint.load(truncated)


def test_pruning_really_shrinks_tensors_and_keeps_the_classifier():
    m = zoo.build_model(_cfg()).eval()
    ex = torch.zeros(1, 40)
    macs0, params0 = count_macs(m, ex)
    rec = prune(m, ex, 0.5)
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv1d)]
    assert [c.weight.shape[0] for c in convs] == [16, 32, 64, 64]
    assert m.classifier.out_features == 10
    macs1, params1 = count_macs(m, ex)
    assert macs1 < 0.3 * macs0 and params1 < 0.3 * params0
    assert sum(len(idx) for _, _, idx in rec.steps) == 16 + 32 + 64 + 64


def test_prune_record_is_json_and_replays_exactly():
    import json

    m = zoo.build_model(_cfg()).eval()
    ex = torch.zeros(1, 40)
    pruned, rec = prune_to_macs(m, ex, count_macs(m, ex)[0] // 3)
    assert count_macs(pruned, ex)[0] <= count_macs(m, ex)[0] // 3
    again = PruneRecord.from_json(json.loads(json.dumps(rec.to_json())))
    fresh = replay(zoo.build_model(_cfg()), again, ex)
    fresh.load_state_dict(pruned.state_dict())  # identical shapes
    x = torch.randn(3, 40)
    assert torch.allclose(fresh.eval()(x), pruned(x))


def test_untraceable_model_is_a_model_error():
    from tests.user_models import untraceable

    with pytest.raises(ModelError, match="cannot trace"):
        prune(untraceable((40,), 10), torch.zeros(1, 40), 0.5)


def test_pretrain_cli_bad_input(tmp_path, capsys):
    code = main(["pretrain", "--dataset", "mnist1d", "--model", "resnet9000",
                 "--out", str(tmp_path / "c")])
    assert_one_line_error(code, capsys.readouterr().err, 2, "unknown model 'resnet9000'")
    code = main(["pretrain", "--dataset", "mnist1d", "--epochs", "0", "--out", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, 2, "--epochs")
    code = main(["pretrain", "--dataset", "mnist1d", "--model", "nosuch.module:f",
                 "--out", str(tmp_path / "c")])
    assert_one_line_error(code, capsys.readouterr().err, 5, "cannot be imported")
    assert not list(tmp_path.iterdir())


def test_pretrain_cli_user_module_on_digits(tmp_path, capsys):
    out = tmp_path / "mlp.safetensors"
    assert main(["pretrain", "--dataset", "digits", "--model", "tests.user_models:mlp",
                 "--epochs", "3", "--out", str(out)]) == 0
    ck = checkpoint.load(out, LocalModels.parse(["tests.user_models:mlp"]))
    assert ck.config.arch == "custom" and ck.metrics["test_accuracy"] > 0.5
    x = np.zeros((2, 8, 8), np.float32)
    assert ck.model(torch.from_numpy(x)).shape == (2, 10)


def test_counting_macs_of_a_split_keeps_batchnorm_in_eval_mode():
    from toolkit.model.zoo import split

    m = zoo.build_model(_cfg()).eval()
    head, tail = split(m, 2)
    count_macs(head, torch.zeros(1, 40))
    assert not any(mod.training for mod in m.modules())
    before = m.stages[0][2].running_mean.clone()
    head(torch.randn(4, 40))
    assert torch.equal(m.stages[0][2].running_mean, before)
