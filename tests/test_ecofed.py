"""EcoFed: a frozen ONNX head on the device, activations up every `period` rounds, tails
trained on the server's replay buffers; bad activation frames refused with a reason;
and a device process that runs with torch made unimportable."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys

import numpy as np
import pytest

from device_runtime import codecs, wire
from device_runtime.codecs import CodecContext
from device_runtime.errors import WireError
from tests.conftest import ROOT
from testkit.field import _env, device_keys, finish, prepare_job, start_server
from testkit.timing import scaled
from tests.keys import trust
from tests.test_device_runtime_no_torch import BLOCK_TORCH
from toolkit import strategies


@pytest.fixture(scope="module")
def ecofed_job():
    from toolkit.strategies.server.ecofed import EcoFedOptions
    from toolkit.sim.simulate import SimOptions, run_simulation

    report, ckpt = run_simulation(SimOptions(
        devices=3, rounds=3, strategy="ecofed", codec="act8", epochs=1, seed=2,
        profiles=("rpi4", "jetson-orin-nano"),
        strategy_options=EcoFedOptions(pretrain_epochs=3, iterations=20)))
    return report, ckpt


def test_devices_send_every_period_rounds_and_the_server_trains_in_between(ecofed_job):
    report, _ = ecofed_job
    assert [r["devices_reporting"] for r in report["rounds"]] == [3, 0, 3]
    assert report["rounds"][1]["uplink_bytes"] == 0 and not report["rejected"]
    # one byte per activation value plus an int64 label per sample, and little else
    # (frame and chunk headers)
    act_elems = int(np.prod(report["act_shape"]))
    assert report["split_after"] in (1, 2, 3) and act_elems >= 128
    for d in report["devices"]:
        per_send = d["uplink_bytes"] / 2
        payload = d["samples"] * (act_elems + 8)
        assert payload <= per_send < payload * 1.01 + 4096
    accs = [r["accuracy"] for r in report["rounds"]]
    assert accs[1] != accs[0]  # round 2 trained the tail on the buffers alone


def _frame(acts, labels, codec="act8"):
    tensors, params = codecs.get(codec).encode({"acts": acts, "labels": labels}, CodecContext())
    return wire.encode(wire.Frame("update", "j", 1, "d", codec, tensors, params,
                                  {"samples": len(labels), "variant": "head-1"}))


def test_bad_activation_frames_are_refused_with_a_reason(ecofed_job):
    from toolkit.strategies.server.ecofed import ActivationFold, EcoFed, EcoFedSetup

    _, ckpt = ecofed_job
    setup = EcoFedSetup(ckpt.config, 1, b"", (32, 40))
    strategy = EcoFed(options=setup)
    codec = codecs.get("act8")
    spec = codec.wire_spec(strategy.update_shapes("head-1", {}, 4))
    good = np.ones((4, 32, 40), np.float32)
    wire.decode(_frame(good, np.arange(4)), wire.Expect(kind="update", tensors=spec))
    with pytest.raises(WireError, match="acts"):  # another split point's shape
        wire.decode(_frame(np.ones((4, 64, 20), np.float32), np.arange(4)),
                    wire.Expect(kind="update", tensors=spec))
    with pytest.raises(WireError, match="labels"):  # fewer labels than activations
        wire.decode(_frame(good, np.arange(3)), wire.Expect(kind="update", tensors=spec))
    fold = ActivationFold(strategy, 1, {}, codec, CodecContext())
    tensors, params = codec.encode({"acts": good, "labels": np.array([0, 1, 2, 99])},
                                   CodecContext())
    with pytest.raises(WireError, match="classes 0..9"):
        fold.add("d", 4, tensors, params, variant="head-1")
    tensors, params = codec.encode({"acts": good, "labels": np.arange(4)}, CodecContext())
    with pytest.raises(WireError, match="params.scale"):  # a non-finite scale
        fold.add("d", 4, tensors, {"acts": {"scale": float("nan")}}, variant="head-1")
    with pytest.raises(WireError, match="finite activations"):
        codec.encode({"acts": good * np.inf}, CodecContext())
    fold.add("d", 4, tensors, params, variant="head-1")
    assert list(fold.updates) == ["d"]  # nothing refused was kept


@pytest.mark.slow
def test_the_ecofed_device_runs_with_torch_unimportable(tmp_path, mosquitto):
    """`fedge serve --strategy ecofed` and two `fedge device` processes on a real
    Mosquitto; the devices cannot import torch and still take part in every send round."""
    work = tmp_path / "run"
    work.mkdir()
    ckpt = prepare_job(work, devices=2)
    job = f"e{secrets.token_hex(3)}"
    server = start_server(mosquitto.url, job, work, ckpt, rounds=3, min_devices=2,
                          round_timeout=scaled(60),
                          extra=["--strategy", "ecofed", "--codec", "act4", "--profiles", "rpi4"])
    devices = []
    for k in range(2):
        code = BLOCK_TORCH + (
            "from toolkit.cli.main import main\n"
            f"rc = main(['device', '--broker', {mosquitto.url!r}, '--job', {job!r}, '--id', "
            f"'dev-{k}', '--profile', 'rpi4', '--data', "
            f"{str(work / 'data' / f'device-{k}.npz')!r}, '--idle-timeout', '{scaled(600):g}', "
            f"*{device_keys(work, f'dev-{k}')!r}])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "sys.exit(rc)\n")
        devices.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                                        stdout=open(work / f"device-{k}.log", "wb"),
                                        stderr=subprocess.STDOUT))
    codes = finish([server], timeout=240) + finish(devices, timeout=60)
    logs = [(work / f"device-{k}.log").read_text() for k in range(2)]
    assert codes == [0, 0, 0], (work / "server.log").read_text()[-1500:] + logs[0][-1500:]
    report = json.loads((work / "report.json").read_text())
    assert [r["devices_reporting"] for r in report["rounds"]] == [2, 0, 2]
    assert all("trained 2 rounds" in log for log in logs)


def memory_fleet(job: str, profiles: list[str], ds):
    """Device agents (100 samples each) running on an in-memory hub; returns a factory of
    more connected transports on it (for aggregators) and the agents."""
    import threading

    from device_runtime.agent import DeviceAgent
    from tests.keys import agent_options
    from device_runtime.transport.memory import MemoryHub, MemoryTransport

    hub = MemoryHub()

    def transport(name):
        t = MemoryTransport(hub, name)
        t.connect()
        return t
    agents = [DeviceAgent(transport(f"dev-{k}"), agent_options(job, f"dev-{k}", p),
                          ds.x_train[k * 100:(k + 1) * 100], ds.y_train[k * 100:(k + 1) * 100])
              for k, p in enumerate(profiles)]
    for a in agents:
        threading.Thread(target=a.run, daemon=True).start()
    return transport, agents


def test_replay_buffers_survive_an_aggregator_restart(tmp_path):
    """Round 1 collects the buffers; a new aggregator on the same state dir runs round 2
    (nobody sends) and still trains the tail, on the buffers it reloaded."""
    import torch

    from broker_server.service import Aggregator, ServeOptions
    from device_runtime.training.local import weights_of
    from toolkit.model import datasets, zoo
    from toolkit.strategies.server.ecofed import EcoFedOptions, tail_names
    from toolkit.planning.profiles import ProfileCatalogue
    from toolkit.strategies.setups import setup_strategy

    strategies.get("ecofed")  # the aggregator then knows it by name
    ds = datasets.load("mnist1d")
    cfg = zoo.make_config("cnn", ds.sample_shape, ds.num_classes)
    torch.manual_seed(0)
    model = zoo.build_model(cfg)
    cfg, setup = setup_strategy("ecofed", cfg, [ProfileCatalogue.load().get("rpi4")],
                                ds.x_train[:64], "act8", EcoFedOptions(iterations=5), model)
    transport, _ = memory_fleet("eco", ["rpi4", "rpi4"], ds)

    def serve(rounds, name):
        return Aggregator(transport(name), ServeOptions("eco", tmp_path, "ecofed", "act8",
                                                        rounds, 2, 60.0,
                                                        strategy_options=setup),
                          cfg.to_json(), weights_of(model), trust=trust("eco", tmp_path))
    first = serve(1, "server-1")
    first.run()
    kept = sorted(p.name for p in tmp_path.glob("kept-*.fdg"))
    cut = setup.split_after
    assert kept == [f"kept-replay-{cut}-dev-0.fdg", f"kept-replay-{cut}-dev-1.fdg"]
    values = 100 * int(np.prod(setup.act_shape))  # one byte per activation value
    assert values < (tmp_path / kept[0]).stat().st_size < values + 4096
    second = serve(2, "server-2")  # a restart: the buffers come from the state dir
    report = second.run()
    assert report["rounds"][-1]["devices_reporting"] == 0
    assert sorted(second.strategy.replay) == ["dev-0", "dev-1"]
    for k in tail_names(first.weights, setup.split_after):  # the tail trained in round 2
        assert not np.array_equal(first.weights[k], second.weights[k]), k
    # a damaged buffer file stops the restart with its name, and changes nothing
    path = tmp_path / kept[0]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    from broker_server.errors import BrokerServerError

    with pytest.raises(BrokerServerError,
                       match=f"kept tensors 'replay-{cut}-dev-0' are unreadable"):
        serve(3, "server-3")


def test_profiles_with_an_earlier_cut_are_bridged_to_the_frozen_depth(tmp_path):
    """rpi4 runs a one-stage head, the Orin a two-stage one; the server carries the rpi4's
    activations through the frozen second stage, so both buffers live at the same cut."""
    import torch

    from broker_server.service import Aggregator, ServeOptions
    from device_runtime.training.local import weights_of
    from toolkit.model import datasets, zoo
    from toolkit.strategies.server.ecofed import EcoFedOptions, EcoFedSetup, export_head

    strategies.get("ecofed")  # the aggregator then knows it by name
    ds = datasets.load("mnist1d")
    cfg = zoo.make_config("cnn", ds.sample_shape, ds.num_classes)
    torch.manual_seed(0)
    model = zoo.build_model(cfg)
    heads = {c: export_head(model, cfg, c, ds.x_train[:64]) for c in (1, 2)}
    setup = EcoFedSetup(cfg, 2, *heads[2], EcoFedOptions(iterations=2),
                        {"rpi4": 1, "jetson-orin-nano": 2}, heads)
    transport, agents = memory_fleet("br", ["rpi4", "jetson-orin-nano"], ds)
    agg = Aggregator(transport("server"), ServeOptions("br", tmp_path, "ecofed", "act8", 1, 2,
                                                       60.0, strategy_options=setup),
                     cfg.to_json(), weights_of(model), trust=trust("br", tmp_path))
    report = agg.run()
    assert report["rounds"][0]["devices_reporting"] == 2 and not report["rejected"]
    up = {a.device: a.history[0]["uplink_bytes"] for a in agents}
    per_sample = {c: int(np.prod(heads[c][1])) + 8 for c in (1, 2)}
    for dev, c in (("dev-0", 1), ("dev-1", 2)):  # each sent its own cut's activations
        assert 100 * per_sample[c] <= up[dev] < 100 * per_sample[c] + 4096
    acts0, _ = agg.strategy.replay["dev-0"]
    assert acts0.shape[1:] == heads[2][1]  # carried to the frozen depth
    with torch.no_grad():  # ... as the two-stage head computes it (up to act8's step)
        want = zoo.split(model.eval(), 2)[0](torch.from_numpy(ds.x_train[:100])).numpy()
    assert np.abs(acts0 - want).max() < 0.05 * np.abs(want).max()
