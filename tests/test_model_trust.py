"""No code from the network or from data files: a model config from a plan, task,
checkpoint or artifact names a zoo architecture only; a custom factory is built only
when the operator allowed it locally, with exactly the kwargs allowed.

The attack: a module planted on the machine's import path (here a temp dir on
sys.path, holding ``hubconf.py`` too) that writes a marker file when imported, named by
a forged config directly or through ``torch.hub:load`` with ``source: local``."""
from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
import uuid

import numpy as np
import pytest

from device_runtime.errors import AllowSpecError, ModelNotAllowedError
from device_runtime.local_models import LocalModels
from testkit.timing import scaled
from tests.conftest import assert_one_line_error


def task_status(payload: bytes):
    """A status the device published (signed by its key)."""
    from device_runtime import messages
    from tests.keys import KEYS

    return messages.unseal(messages.Status, payload, KEYS.get("dev-0"), "job").msg

PLANTED = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from torch import nn


def model(input_shape, num_classes, **kwargs):
    return nn.Sequential(nn.Flatten(), nn.Linear(40, num_classes))
"""


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """(forged configs naming planted code, the marker its import writes)."""
    where, marker = tmp_path / "planted", tmp_path / "MARKER"
    where.mkdir()
    name = f"planted_{uuid.uuid4().hex[:8]}"
    for module in (name, "hubconf"):
        (where / f"{module}.py").write_text(PLANTED.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(where))
    base = {"arch": "custom", "input_shape": [40], "num_classes": 10}
    forged = {
        "direct": dict(base, factory=f"{name}:model"),
        "torch.hub": dict(base, factory="torch.hub:load", kwargs={
            "repo_or_dir": str(where), "model": "model", "source": "local",
            "trust_repo": True, "verbose": False}),
    }
    yield forged, marker
    for module in (name, "hubconf"):
        sys.modules.pop(module, None)


@pytest.mark.parametrize("how", ["direct", "torch.hub"])
def test_build_model_refuses_a_forged_config_before_importing(planted, how):
    from device_runtime.training.models import ModelConfig, build_model

    forged, marker = planted
    cfg = ModelConfig.from_json(forged[how])
    with pytest.raises(ModelNotAllowedError, match="--allow-custom-model") as e:
        build_model(cfg)
    assert cfg.factory in str(e.value) and e.value.exit_code == 5
    assert not marker.exists()


def test_allowed_factory_with_other_kwargs_is_refused(planted):
    from device_runtime.training.models import ModelConfig, build_model

    forged, marker = planted
    allowed = LocalModels.parse([forged["direct"]["factory"], "tests.user_models:mlp"])
    cfg = ModelConfig.from_json(dict(forged["direct"], kwargs={"evil": 1}))
    with pytest.raises(ModelNotAllowedError, match="cannot parameterize"):
        build_model(cfg, allowed)
    assert not marker.exists()  # refused before the import
    mlp = ModelConfig("custom", (8, 8), 10, factory="tests.user_models:mlp")
    with pytest.raises(ModelNotAllowedError, match="kwargs"):
        build_model(mlp.replace(kwargs={"hidden": 10 ** 6}), allowed)
    assert build_model(mlp, allowed)[1].out_features == 32  # the factory's default
    fixed = LocalModels.parse(['tests.user_models:mlp={"hidden": 8}'])
    assert build_model(mlp.replace(kwargs={"hidden": 8}), fixed)[1].out_features == 8
    with pytest.raises(ModelNotAllowedError):
        build_model(mlp, fixed)  # the operator fixed hidden=8; the config leaves it out


def test_allowlist_specs():
    allowed = LocalModels.parse(["a.b:f", 'c:g={"k": [1, 2]}', "a.b:f"])
    assert allowed.factories == ["a.b:f", "c:g"] and allowed.kwargs_for("c:g") == {"k": [1, 2]}
    assert LocalModels.parse(allowed.specs()) == allowed
    for bad in ("nocolon", "a:b:c", "a:f=[1]", "a:f={bad", "a.:f", ":f"):
        with pytest.raises(AllowSpecError, match="--allow-custom-model"):
            LocalModels.parse([bad])
    with pytest.raises(AllowSpecError, match="different kwargs"):
        LocalModels.parse(["a:f", 'a:f={"x": 1}'])


def _forge_checkpoint(tmp_path, config: dict):
    """A real checkpoint whose metadata names ``config`` instead of its own."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from toolkit.model import checkpoint, zoo

    cfg = zoo.make_config("cnn", (40,), 10)
    good = checkpoint.save(checkpoint.Checkpoint(cfg, zoo.build_model(cfg)), tmp_path / "g")
    with safe_open(str(good), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    path = tmp_path / "forged.safetensors"
    save_file(tensors, str(path), dict(meta, config=json.dumps(config)))
    return path


@pytest.mark.parametrize("how", ["direct", "torch.hub"])
def test_checkpoint_naming_a_factory_imports_nothing(tmp_path, planted, how):
    from toolkit.model import checkpoint

    forged, marker = planted
    path = _forge_checkpoint(tmp_path, forged[how])
    with pytest.raises(ModelNotAllowedError, match="forged.safetensors"):
        checkpoint.load(path)
    assert not marker.exists()


def test_serve_and_export_refuse_a_forged_checkpoint(tmp_path, planted, capsys):
    from toolkit.cli.main import main

    forged, marker = planted
    path = _forge_checkpoint(tmp_path, forged["torch.hub"])
    code = main(["serve", "--job", "j", "--checkpoint", str(path),
                 "--state-dir", str(tmp_path / "state")])
    assert_one_line_error(code, capsys.readouterr().err, 5, "torch.hub:load",
                          "--allow-custom-model torch.hub:load")
    code = main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, 5, "not allowed")
    code = main(["export", "--checkpoint", str(path), "--allow-custom-model", "torch.hub:load",
                 "--out", str(tmp_path / "out")])  # allowed, but not with these kwargs
    assert_one_line_error(code, capsys.readouterr().err, 5, "cannot parameterize")
    code = main(["export", "--checkpoint", str(path), "--allow-custom-model", "torch.hub",
                 "--out", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, 2, "--allow-custom-model")
    assert not marker.exists() and not (tmp_path / "state").exists()
    assert not (tmp_path / "out").exists()


def test_custom_checkpoint_loads_only_when_allowed(tmp_path, capsys):
    from toolkit.cli.main import main
    from toolkit.model import checkpoint

    out = tmp_path / "mlp.safetensors"
    assert main(["pretrain", "--dataset", "digits", "--model", "tests.user_models:mlp",
                 "--epochs", "1", "--out", str(out)]) == 0
    with pytest.raises(ModelNotAllowedError, match="tests.user_models:mlp"):
        checkpoint.load(out)
    ck = checkpoint.load(out, LocalModels.parse(["tests.user_models:mlp"]))
    assert ck.config.factory == "tests.user_models:mlp"


# --- the device agent: plans and tasks from the broker -------------------------------

# Signed by the aggregator's key (the checks behind the signature are what is tested:
# even a message the device's trusted aggregator signed cannot name a factory).
SERVER = None


def _server():
    global SERVER
    from tests.keys import trust

    SERVER = SERVER or trust("job")
    return SERVER


def _agent(custom_models: LocalModels = LocalModels()):
    from device_runtime.agent import DeviceAgent
    from device_runtime.transport.memory import MemoryHub, MemoryTransport
    from tests.keys import agent_options

    hub = MemoryHub()
    t = MemoryTransport(hub, "dev-0")
    t.connect()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 40)).astype(np.float32), rng.integers(0, 10, 20)
    agent = DeviceAgent(t, agent_options("job", "dev-0", "rpi4", custom_models=custom_models),
                        x, y)
    return hub, agent


def _plan(model: dict) -> bytes:
    from device_runtime import messages

    server = _server()
    plan = messages.Plan("job", "fedavg", "fp32", 3, model, 1, 60.0, session=server.session,
                         issued=time.time())
    return server.seal(plan, nonce=server.session)


def test_agent_refuses_a_plan_naming_a_factory(planted):
    forged, marker = planted
    _, agent = _agent()
    zoo = {"arch": "cnn1d", "input_shape": [40], "num_classes": 10}
    agent._handle(agent.topics.plan, _plan(zoo))
    for how in ("direct", "torch.hub"):
        agent._handle(agent.topics.plan, _plan(forged[how]))
        assert agent.plan.model == zoo  # refused whole: the zoo plan stays
    with pytest.raises(ModelNotAllowedError):
        agent._build("full", forged["torch.hub"])  # what a task's model config reaches
    assert not marker.exists()


def _run_task(agent, hub, task_model: dict, weights: dict) -> dict:
    """Run the agent on the in-memory hub; a hostile client publishes a zoo plan, a
    model frame and a task whose model is ``task_model``. Returns the agent's last
    status and whether it sent an update."""
    from device_runtime import messages, wire
    from device_runtime.transport.memory import MemoryTransport

    evil = MemoryTransport(hub, "evil")
    evil.connect()
    seen: dict = {}
    evil.subscribe(agent.topics.status("dev-0"), lambda t, p: seen.update(
        status=dataclasses.asdict(task_status(p))))
    evil.subscribe(agent.topics.update(1, "dev-0"), lambda t, p: seen.update(update=True))
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    server = _server()
    frame = server.frame(wire.Frame("model", "job", 1, "server", "fp32", weights))
    evil.publish(agent.topics.plan, _plan({"arch": "cnn1d", "input_shape": [40],
                                           "num_classes": 10}), retain=True)
    evil.publish(agent.topics.model(1, "full"), frame, retain=True)
    task = messages.Task(round=1, device="dev-0", variant="full",
                         model_sha256=wire.content_sha(frame),
                         deadline=time.time() + scaled(30), epochs=1, batch_size=8, lr=0.01,
                         seed=0, codec="fp32", model=task_model,
                         nonce=server.nonce(1, "dev-0"), session=server.session)
    evil.publish(agent.topics.task(1, "dev-0"), server.seal(task, 1, task.nonce, "dev-0"))
    until = time.time() + scaled(60)
    while time.time() < until and not (seen.get("update") or
                                       seen.get("status", {}).get("error")):
        time.sleep(0.05)
    evil.publish(agent.topics.control, server.seal(messages.Control("stop"),
                                                   nonce=server.session))
    runner.join(timeout=scaled(30))
    return seen


@pytest.mark.parametrize("how", ["direct", "torch.hub"])
def test_agent_refuses_a_task_naming_a_factory(planted, how):
    from device_runtime.training.local import weights_of
    from tests.user_models import mlp

    forged, marker = planted
    hub, agent = _agent()
    seen = _run_task(agent, hub, forged[how], weights_of(mlp((40,), 10)))
    assert "not allowed" in seen["status"]["error"] and "update" not in seen
    assert not marker.exists()


def test_agent_builds_an_allowed_factory_only_with_the_allowed_kwargs():
    from device_runtime.training.local import weights_of
    from tests.user_models import mlp

    model = {"arch": "custom", "input_shape": [40], "num_classes": 10,
             "factory": "tests.user_models:mlp"}
    allowed = LocalModels.parse(["tests.user_models:mlp"])
    hub, agent = _agent(allowed)
    seen = _run_task(agent, hub, dict(model, kwargs={"hidden": 4096}),
                     weights_of(mlp((40,), 10, hidden=4096)))
    assert "cannot parameterize" in seen["status"]["error"] and "update" not in seen
    hub, agent = _agent(allowed)
    seen = _run_task(agent, hub, model, weights_of(mlp((40,), 10)))
    assert seen.get("update") and agent.rounds_done == 1


def test_device_config_allow_custom_model(tmp_path):
    from device_runtime.config import ConfigError, load_config

    path = tmp_path / "device.toml"
    path.write_text('allow_custom_model = ["pkg.models:small", \'pkg.models:big={"h": 8}\']\n')
    cfg = load_config(path)
    assert LocalModels.parse(cfg.allow_custom_model).kwargs_for("pkg.models:big") == {"h": 8}
    path.write_text('allow_custom_model = "pkg.models:small"\n')
    with pytest.raises(ConfigError, match="allow_custom_model: expected a list"):
        load_config(path)


def test_device_cli_refuses_a_malformed_allow_entry(tmp_path, capsys):
    from toolkit.cli.main import main

    code = main(["device", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--id", "d0",
                 "--profile", "rpi4", "--data", str(tmp_path / "x.npz"), "--check",
                 "--allow-custom-model", "pkg.mod"])
    assert_one_line_error(code, capsys.readouterr().err, 2, "--allow-custom-model",
                          "module:callable")


def test_simulate_builds_the_custom_model_its_options_name():
    """The simulator's own agents get the allowlist from its options (``--model``)."""
    from toolkit.sim.simulate import SimOptions, run_simulation

    report, ckpt = run_simulation(SimOptions("digits", devices=2, rounds=1,
                                             model="tests.user_models:mlp", epochs=1,
                                             min_samples=10))
    assert ckpt.config.factory == "tests.user_models:mlp"
    assert [r["devices_reporting"] for r in report["rounds"]] == [2]
