"""A device remembers the manifest signatures it has checked (device_runtime.verified):
a second ``fedge infer`` of the same export skips the Ed25519 check, but any change to
the manifest, its signature or the trusted key, or a cache others may write, means the
full check again. Also: small runs open their session without graph rewrites."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from device_runtime import verified
from device_runtime.keys import load_public_key
from device_runtime.manifest import sha256_file
from device_runtime.predictor import SMALL_RUN_MACS, Predictor, _small_run
from tests.conftest import assert_one_line_error
from toolkit.cli.main import main

DEVICE = "rpi4"


@pytest.fixture()
def setup(fleet_export, export_key, tmp_path, monkeypatch, mnist1d):
    shutil.copytree(fleet_export.parent, tmp_path / "fleet")
    home = tmp_path / "home"
    monkeypatch.setenv("FEDGE_HOME", str(home))
    x = tmp_path / "x.npy"
    np.save(x, mnist1d.x_test[:5])
    manifest = tmp_path / "fleet" / "manifest.json"
    args = ["infer", "--manifest", str(manifest), "--device", DEVICE, "--input", str(x),
            "--trust", str(export_key.public_path)]
    return SimpleNamespace(manifest=manifest, cache=home / verified.CACHE_NAME, args=args,
                           key=export_key)


def _tokens(cache):
    return json.loads(cache.read_text())["tokens"]


def test_a_checked_signature_is_remembered_privately(setup, capsys):
    assert main(setup.args) == 0
    assert len(_tokens(setup.cache)) == 1
    assert setup.cache.stat().st_mode & 0o777 == 0o600
    assert main(setup.args) == 0  # the same export again: the same one token
    assert len(_tokens(setup.cache)) == 1
    assert "manifest signature verified" in capsys.readouterr().out


def test_a_manifest_edited_after_a_remembered_check_is_refused(setup, capsys):
    assert main(setup.args) == 0
    doc = json.loads(setup.manifest.read_text())
    target = setup.manifest.parent / DEVICE / "full.fp32.onnx"
    shutil.copyfile(setup.manifest.parent / "rpi3b" / "full.fp32.onnx", target)
    for a in doc["devices"][DEVICE]["artifacts"]:
        if a["path"] == f"{DEVICE}/full.fp32.onnx":
            a["sha256"] = sha256_file(target)
    setup.manifest.write_text(json.dumps(doc, indent=1))
    capsys.readouterr()
    assert_one_line_error(main(setup.args), capsys.readouterr().err, 6,
                          "does not match its signature", "modified after signing")


def _forge(setup):
    """A token for the manifest with a signature that is not the key's: what an
    attacker who can write the cache would add to run a manifest of theirs."""
    sig_path = setup.manifest.with_name("manifest.json.sig")
    sig = json.loads(sig_path.read_text())
    bad = bytes(64)
    sig["signature"] = __import__("base64").b64encode(bad).decode()
    sig_path.write_text(json.dumps(sig))
    raw = load_public_key(setup.key.public_path).public_bytes_raw()
    return verified.token(raw, bad, setup.manifest.read_bytes())


@pytest.mark.parametrize("mode", [0o666, 0o620])
def test_a_cache_others_may_write_is_ignored(setup, capsys, mode):
    tok = _forge(setup)
    setup.cache.parent.mkdir(parents=True)
    setup.cache.write_text(json.dumps({"format": verified.FORMAT, "tokens": [tok]}))
    os.chmod(setup.cache, mode)
    assert verified.known(setup.cache, tok) is False
    assert_one_line_error(main(setup.args), capsys.readouterr().err, 6,
                          "does not match its signature")


def test_a_damaged_cache_costs_a_check_not_a_refusal(setup, capsys):
    setup.cache.parent.mkdir(parents=True)
    for damage in (b"{", b"\xff\xfe", b'{"format": "fedge-verified/1", "tokens": 3}',
                   b"[]", b"x" * (verified.MAX_BYTES + 10)):
        setup.cache.write_bytes(damage)
        os.chmod(setup.cache, 0o600)
        assert main(setup.args) == 0, damage
        assert len(_tokens(setup.cache)) == 1  # rewritten whole


def test_the_cache_keeps_the_newest_tokens(tmp_path):
    cache = tmp_path / "c.json"
    toks = [verified.token(bytes(32), bytes(64), str(i).encode())
            for i in range(verified.MAX_TOKENS + 5)]
    for t in toks:
        verified.remember(cache, t)
    kept = _tokens(cache)
    assert kept == toks[-verified.MAX_TOKENS:]
    assert not verified.known(cache, toks[0]) and verified.known(cache, toks[-1])
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temp file left


def test_tokens_bind_key_signature_and_bytes():
    base = verified.token(bytes(32), bytes(64), b"manifest")
    assert len({base, verified.token(b"\x01" * 32, bytes(64), b"manifest"),
                verified.token(bytes(32), b"\x01" * 64, b"manifest"),
                verified.token(bytes(32), bytes(64), b"manifesT")}) == 4


def test_large_inputs_hash_the_same(monkeypatch):
    import hashlib

    from device_runtime import digest

    monkeypatch.setattr(digest, "LARGE", 10)
    for data in (b"short", b"longer than ten bytes"):
        assert digest.sha256_hex(data) == hashlib.sha256(data).hexdigest()


def test_small_runs_skip_graph_rewrites(fleet_export, monkeypatch):
    import device_runtime.predictor as mod
    from device_runtime.session import open_session

    seen = []

    def spy(model, *args, **kwargs):
        seen.append(kwargs.get("optimize", True))
        return open_session(model, *args, **kwargs)
    monkeypatch.setattr(mod, "open_session", spy)
    for samples in (1, None, 10 ** 6):
        Predictor.from_manifest(fleet_export, DEVICE, samples=samples)
    assert seen == [False, True, True]
    model = SimpleNamespace(macs=370_000)
    assert _small_run(model, SMALL_RUN_MACS // 370_000)
    assert not _small_run(model, SMALL_RUN_MACS // 370_000 + 1)
    assert not _small_run(SimpleNamespace(macs=0), 1)  # the manifest does not know
