"""Fleet export: artifacts load in onnxruntime, respect opsets, match torch, are verified."""
import json
import shutil

import numpy as np
import onnx
import pytest

from device_runtime.errors import ArtifactVerificationError
from device_runtime.manifest import load_manifest, sha256_file
from device_runtime.session import open_session, run
from exporters.errors import ParityError
from exporters.parity import ParityBounds
from tests.conftest import FLEET_PROFILES, assert_one_line_error, run_fedge
from toolkit.cli.main import main
from toolkit.planning.profiles import ProfileCatalogue


def test_every_artifact_loads_and_respects_its_profile_opset(fleet_export, mnist1d):
    m = load_manifest(fleet_export)
    cat = ProfileCatalogue.load()
    assert set(m.devices) == set(FLEET_PROFILES)
    x = mnist1d.x_test[:7]
    for name, dev in m.devices.items():
        cap = cat.get(name).max_opset
        for a in dev.artifacts:
            path = m.verify(a)
            if a.format == "onnx":
                model = onnx.load(str(path))
                assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                               for t in model.graph.initializer)
                opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
                assert max(opsets) <= cap and a.opset <= cap
                meta = {p.key: p.value for p in model.metadata_props}
                assert json.loads(meta["fedge.config"])["arch"] == "cnn1d"
            out = run(open_session(path), x if a.role != "tail" else
                      run(open_session(m.path_of(dev.find("head"))), x))
            assert out.shape[0] == 7
    assert m.device("jetson-nano").find().opset == 15
    roles = {(a.role, a.precision, a.format) for a in m.device("android-mid").artifacts}
    assert {("full", "fp32", "ort"), ("full", "int8", "ort")} <= roles
    assert not any(a.format == "ort" for a in m.device("rpi4").artifacts)


def test_largest_profile_accuracy_and_int8_within_a_point(fleet_export, mnist1d):
    m = load_manifest(fleet_export)
    dev = m.device("jetson-orin-nano")
    fp32 = run(open_session(m.verify(dev.find())), mnist1d.x_test)  # raw features
    int8 = run(open_session(m.verify(dev.find(precision="int8"))), mnist1d.x_test)
    acc = np.mean(fp32.argmax(1) == mnist1d.y_test)
    acc8 = np.mean(int8.argmax(1) == mnist1d.y_test)
    assert acc >= 0.94
    assert acc - acc8 <= 0.01
    assert np.mean(fp32.argmax(1) == int8.argmax(1)) >= 0.99


def test_smallest_variant_has_at_most_half_the_macs(fleet_export):
    m = load_manifest(fleet_export)
    macs = {n: d.find().macs for n, d in m.devices.items()}
    assert macs["rpi3b"] <= macs["jetson-orin-nano"] / 2
    assert m.device("rpi3b").plan["prune_ratio"] > 0
    assert m.device("jetson-orin-nano").plan["prune_ratio"] == 0


def test_parity_recorded_and_head_then_tail_equals_full(fleet_export):
    m = load_manifest(fleet_export)
    for dev in m.devices.values():
        for a in dev.artifacts:
            if a.precision == "fp32":
                assert a.parity["max_abs_err"] <= 1e-4
            else:
                assert a.parity["top1_agreement"] >= 0.99
        assert dev.find("tail").parity["chain_max_abs_err"] <= 1e-4
        assert dev.find("head").macs + dev.find("tail").macs == dev.find().macs


def test_manifest_hashes_match_and_corruption_is_caught(fleet_export, tmp_path):
    copy = tmp_path / "fleet"
    shutil.copytree(fleet_export.parent, copy)
    m = load_manifest(copy / "manifest.json")
    for dev in m.devices.values():
        for a in dev.artifacts:
            assert sha256_file(m.path_of(a)) == a.sha256
    victim = m.device("rpi4").find(precision="int8")
    path = m.path_of(victim)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactVerificationError, match="rpi4/full.int8.onnx fails its sha256"):
        m.verify(victim)


def test_broken_parity_stops_the_export_naming_the_artifact(trained_ckpt, mnist1d, tmp_path):
    from toolkit.model import checkpoint
    from toolkit.planning.fleet import ExportOptions, export_fleet

    out = tmp_path / "out"
    opts = ExportOptions(finetune_epochs=0, bounds=ParityBounds(fp32_max_abs_err=0.0))
    with pytest.raises(ParityError, match=r"rpi4/full.fp32.onnx fails parity"):
        export_fleet(checkpoint.load(trained_ckpt), ProfileCatalogue.load().select("rpi4"),
                     out, mnist1d, opts)
    assert not out.exists() and not list(tmp_path.glob(".fedge-export-*"))


def test_export_cli_bad_input_is_one_line_and_changes_nothing(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["export", "--checkpoint", str(trained_ckpt), "--profiles", "rpi4,toaster",
                 "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, 2, "unknown device profile 'toaster'")
    code = main(["export", "--checkpoint", str(tmp_path / "none.safetensors"),
                 "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, 4, "does not exist")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    code = main(["export", "--checkpoint", str(bad), "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, 4, "corrupt")
    toml = tmp_path / "p.toml"
    toml.write_text("[profiles.x]\nram_mb = ")
    code = main(["export", "--checkpoint", str(trained_ckpt), "--profiles-file", str(toml),
                 "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, 2, "not valid TOML")
    assert not out.exists()


@pytest.mark.slow
def test_untraceable_user_model_via_the_real_cli(tmp_path):
    ck = tmp_path / "u.safetensors"
    code, _, err = run_fedge("pretrain", "--dataset", "mnist1d", "--model",
                             "tests.user_models:untraceable", "--epochs", "1", "--out", str(ck))
    assert code == 0, err
    out = tmp_path / "out"
    code, _, err = run_fedge("export", "--checkpoint", str(ck), "--profiles", "rpi3b,rpi5",
                             "--allow-custom-model", "tests.user_models:untraceable",
                             "--out", str(out))
    assert_one_line_error(code, err, 5, "cannot trace", "Untraceable")
    assert not out.exists()


def test_export_refuses_to_overwrite_a_foreign_folder(trained_ckpt, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    code = main(["export", "--checkpoint", str(trained_ckpt), "--profiles", "rpi4",
                 "--out", str(tmp_path)])
    assert_one_line_error(code, capsys.readouterr().err, 2, "refusing to overwrite")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_unpruned_variant_computes_exactly_the_checkpoint(fleet_export, trained_ckpt, mnist1d):
    """Export must not disturb the model (e.g. BatchNorm statistics) on its way out."""
    from toolkit.model import checkpoint
    from toolkit.model.train import predict_logits

    ref = predict_logits(checkpoint.load(trained_ckpt).model, mnist1d.x_test)
    m = load_manifest(fleet_export)
    out = run(open_session(m.verify(m.device("jetson-orin-nano").find())), mnist1d.x_test)
    assert np.max(np.abs(out - ref)) <= 1e-4
