"""``fedge simulate``: the deployment's own aggregator, strategies, codecs and device
agents, in one process, over the in-memory transport (or a real broker); with
``procs`` > 1 the agents run in worker processes instead (``toolkit.sim.simfleet``).

Every byte counted is a frame that was really encoded and sent; each device's
simulated round time comes from its profile (compute from MACs and GFLOP/s,
transfer from frame bytes and link bandwidth), so time-to-accuracy compares
methods on the fleet the user names, not on this machine; the server's own compute
is added as counted FLOPs at a stated server's rate, and as measured here
(``server_time.py``).
"""
from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from broker_server.guard import MAX_SAMPLES, NORM_BOUND
from toolkit.errors import UsageError
from toolkit.planning.profiles import DeviceProfile
from toolkit.sim.server_time import DEFAULT_SERVER_GFLOPS, add_server_time


@dataclass(frozen=True)
class SimOptions:
    dataset: str = "mnist1d"
    devices: int = 10
    rounds: int = 20
    alpha: float = 0.5
    seed: int = 0
    strategy: str = "fedavg"
    codec: str = "fp32"
    model: str = "cnn"
    width: float = 1.0
    profiles: tuple[str, ...] = ("rpi4",)
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.02
    public_fraction: float = 0.1
    round_timeout: float = 600.0
    broker: str | None = None  # None: the in-memory transport
    procs: int = 1  # > 1 (needs broker): the devices in this many worker processes
    min_samples: int = 10  # per device; short shards are topped up from the largest
    # Parent of the aggregator's throwaway state folder (None: the system's temp folder).
    # The aggregator fsyncs every accepted update; on tmpfs (/dev/shm) that costs nothing.
    state_parent: str | None = None
    strategy_options: object | None = None  # e.g. SignSGDOptions
    downlink: str = "fp32"  # the model to devices: whole, or a coded change (downlink.py)
    norm_bound: float = NORM_BOUND  # the aggregator's guard (broker_server/guard.py)
    max_samples: int = MAX_SAMPLES
    attack: str = ""  # kind:count[:scale]: the first count devices attack (attackers.py)
    # (absent:count: they never join, the others keep their shards of the same partition)
    job: str | None = None  # None: a fresh "sim-<seed>-<random>"
    # Write the run's public keys here (server.pub, registry.json), for a watcher such as
    # fedge dashboard, which checks every message it shows.
    keys_out: str | None = None
    # torch threads of the run's server side (aggregator, server-side training,
    # evaluation); None: threads.budget(). Server-side training differs in its last bits
    # with the thread count, so a run is reproducible at a given count (the report's
    # ``threads``); the devices train with one thread each.
    threads: int | None = None
    # A stated server's sustained fp32 GFLOP/s: the server's counted FLOPs at this rate
    # are its part of the simulated time (toolkit/sim/server_time.py).
    server_gflops: float = DEFAULT_SERVER_GFLOPS

    def custom_models(self):
        """The allowlist of this run's own agents and rebuilds: the factory ``model``
        names, if any (the operator named it here; plans from the broker cannot)."""
        from toolkit.model.zoo import named_locally

        return named_locally(self.model)


def train_flops(macs: int, samples: int, epochs: int) -> float:
    """Forward + backward is ~3 forward passes; a MAC is 2 FLOPs."""
    return 3 * 2 * macs * samples * epochs


def device_round_seconds(profile: DeviceProfile, macs: int, rec: dict) -> float:
    # Training is ~3 passes (forward + backward); a frozen head runs forward only.
    compute = train_flops(macs, rec["samples"], rec["epochs"]) * rec.get("passes", 3) / 3 \
        / (profile.gflops * 1e9)
    down = rec["downlink_bytes"] * 8 / (profile.downlink_kbps * 1e3)
    up = rec["uplink_bytes"] * 8 / (profile.uplink_kbps * 1e3)
    # Split learning waits for the server once per batch: one round trip each.
    return compute + down + up + rec.get("exchanges", 0) * profile.rtt_ms / 1e3


def simulated_round_times(histories: dict[str, list[dict]], profiles: dict[str, DeviceProfile],
                          macs: dict[str, int]) -> dict[int, float]:
    """A synchronous round lasts as long as its slowest participant."""
    out: dict[int, float] = {}
    for dev, hist in histories.items():
        for rec in hist:
            t = device_round_seconds(profiles[dev], macs[dev], rec)
            out[rec["round"]] = max(out.get(rec["round"], 0.0), t)
    return out


def batch_by_compute(profiles: list[DeviceProfile], largest: int = 128,
                     smallest: int = 4) -> dict[str, int]:
    """Minibatch size in proportion to sustained compute (signSGD-FV's heterogeneity)."""
    top = max(p.gflops for p in profiles)
    return {p.name: max(smallest, int(round(largest * p.gflops / top))) for p in profiles}


def _fleet(opts: SimOptions, catalogue) -> list[DeviceProfile]:
    chosen = [catalogue.get(p) for p in opts.profiles]
    return [chosen[k % len(chosen)] for k in range(opts.devices)]


def _transports(opts: SimOptions, n: int, job: str, keys):
    """A factory of connected transports, in memory or on the broker (``keys``: the
    fleet's, which sign each device's will)."""
    from device_runtime.agent import status_will
    from device_runtime.topics import Topics
    from device_runtime.transport.memory import MemoryHub, MemoryTransport
    from device_runtime.transport.mqtt import MqttTransport

    topics, hub = Topics(job), MemoryHub()

    def make(cid: str, device: str | None = None, persistent: bool = False):
        will = status_will(topics, device, keys.device(device)) if device else None
        if opts.broker:
            t = MqttTransport(opts.broker, f"{job}-{cid}", will=will, persistent=persistent)
        else:
            t = MemoryTransport(hub, cid, will=will)
        t.connect()
        return t
    return make


# paho waits on select(), which takes file descriptors below 1024 only, and each client
# holds 3 (its socket and a wake-up pair): past ~330 clients a process's next client
# never sees its CONNACK. 300 leaves room for the process's other files.
MAX_CLIENTS_PER_PROCESS = 300


def check_options(opts: SimOptions) -> None:
    """The user's mistakes, before anything is loaded."""
    if opts.devices < 1 or opts.rounds < 1:
        raise UsageError("--devices and --rounds: expected >= 1")
    if opts.procs < 1:
        raise UsageError(f"--procs: expected >= 1, got {opts.procs}")
    if opts.procs > 1 and not opts.broker:
        raise UsageError(f"--procs {opts.procs}: needs --broker (device processes reach "
                         "the aggregator only through a broker)")
    if opts.min_samples < 1:
        raise UsageError(f"--min-samples: expected >= 1, got {opts.min_samples}")
    if not opts.server_gflops > 0:
        raise UsageError(f"--server-gflops: expected > 0, got {opts.server_gflops}")
    per = -(-opts.devices // opts.procs)
    if opts.broker and per > MAX_CLIENTS_PER_PROCESS:
        need = -(-opts.devices // MAX_CLIENTS_PER_PROCESS)
        raise UsageError(f"--devices {opts.devices} over --procs {opts.procs}: {per} MQTT "
                         f"clients in one process, at most {MAX_CLIENTS_PER_PROCESS} fit "
                         f"(paho's select() takes file descriptors below 1024); use --procs "
                         f"{need} or more")
    if opts.attack:
        from toolkit.sim.attacks import parse_attack

        parse_attack(opts.attack, opts.devices)
        if opts.procs > 1:
            raise UsageError("--attack: the attackers run in this process; drop --procs")


def absent(opts: SimOptions) -> int:
    """How many devices (dev-0 ...) never join: ``--attack absent:count``, else 0."""
    from toolkit.sim.attacks import parse_attack

    attack = parse_attack(opts.attack, opts.devices) if opts.attack else None
    return attack.count if attack and attack.kind == "absent" else 0


def _shards(opts: SimOptions, labels: np.ndarray) -> list[np.ndarray]:
    """Each device's indices into ``labels``: Dirichlet, short shards topped up."""
    from toolkit.model.partition import dirichlet_split

    if len(labels) < opts.devices * opts.min_samples:
        raise UsageError(f"--devices {opts.devices} x --min-samples {opts.min_samples} "
                         f"exceed the {len(labels)} training samples; lower --min-samples")
    return dirichlet_split(labels, opts.devices, opts.alpha, opts.seed, opts.min_samples,
                           top_up=True)


def _run_local(opts: SimOptions, job: str, ds, fleet: list[DeviceProfile], shards,
               make_aggregator, on_round, keys):
    """Every agent a thread of this process; returns (aggregator, report, devices)."""
    from device_runtime.agent import AgentOptions, DeviceAgent
    from device_runtime.threads import available_cpus
    from toolkit.sim.simfleet import SimDevice

    make = _transports(opts, opts.devices, job, keys)
    agents, threads = [], []
    # They share this process's cores: ten cnn-wide devices training at once on two
    # cores spent 5.2-5.4 s of training CPU a round, two at a time 4.9-5.1 (caches and
    # the GIL shared ten ways; paired runs, docs/results/vs_flower_speed.md).
    compute = threading.BoundedSemaphore(available_cpus())
    attacker, missing = _attackers(opts, ds.num_classes), absent(opts)
    for k, (prof, idx) in enumerate(zip(fleet, shards)):
        if k < missing:
            continue
        dev = f"dev-{k}"
        agent_opts = AgentOptions(job, dev, prof.name, key=keys.device(dev),
                                  server_key=keys.server.public,
                                  custom_models=opts.custom_models(), compute=compute)
        x, y = ds.x_train[idx], ds.y_train[idx]
        a = attacker(make(dev, dev), agent_opts, x, y) if k < attacker.count \
            else DeviceAgent(make(dev, dev), agent_opts, x, y)
        agents.append(a)
        threads.append(threading.Thread(target=a.run, daemon=True, name=dev))
    for th in threads:
        th.start()
    agg_t = make("aggregator", persistent=True)
    agg = make_aggregator(agg_t, on_round)
    report = agg.run()
    for th in threads:
        th.join(timeout=30)
    for t in [agg_t, *(a.t for a in agents)]:
        t.close()
    return agg, report, [SimDevice(a.device, int(len(a.y)), a.history) for a in agents]


def _attackers(opts: SimOptions, classes: int):
    """A factory of the run's attacking agents (``count`` 0: none attack)."""
    from toolkit.sim.attackers import AttackerAgent, Collusion
    from toolkit.sim.attacks import parse_attack

    attack = parse_attack(opts.attack, opts.devices) if opts.attack else None
    count = attack.count if attack and attack.kind != "absent" else 0
    board = Collusion(count)

    def make(transport, agent_opts, x, y):
        return AttackerAgent(transport, agent_opts, x, y, attack, opts.devices, classes,
                             board, opts.seed)
    make.count = count
    return make


def _root_training(opts: SimOptions):
    """The devices' local training, for the server's own on its root data (fltrust)."""
    from device_runtime.training.local import LocalTrainOptions

    return LocalTrainOptions(epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr,
                             seed=opts.seed)


def run_simulation(opts: SimOptions, on_round: Callable[[dict], None] | None = None,
                   catalogue=None) -> tuple[dict, object]:
    """Run the job; returns (report, final checkpoint)."""
    import torch

    from broker_server.service import Aggregator, ServeOptions
    from broker_server.trust import ServerTrust
    from device_runtime.keys import FleetKeys
    from device_runtime.threads import budget, pin_torch_threads
    from device_runtime.training.local import load_weights, weights_of
    from toolkit import strategies
    from toolkit.field import root_data
    from toolkit.field.serve import evaluator
    from toolkit.field.summary import publish_summaries
    from toolkit.model import checkpoint, datasets, zoo
    from toolkit.model.partition import public_split
    from toolkit.model.pruning import count_macs
    from toolkit.planning.profiles import ProfileCatalogue
    from toolkit.strategies import SimRun
    from toolkit.strategies.setups import setup_strategy

    check_options(opts)
    server_threads = pin_torch_threads(opts.threads or budget())
    catalogue = catalogue or ProfileCatalogue.load()
    fleet = _fleet(opts, catalogue)
    ds = datasets.load(opts.dataset)
    pub, rest = public_split(len(ds.y_train), opts.public_fraction, opts.seed)
    parts = _shards(opts, ds.y_train[rest])
    cfg = zoo.make_config(opts.model, ds.sample_shape, ds.num_classes, opts.width,
                          float(np.mean(ds.x_train[pub])), float(np.std(ds.x_train[pub])))
    spec = strategies.get(opts.strategy)
    # e.g. EcoFed's starting point: the model pre-trained on the server's public split
    pretrained = spec.pretrain(opts, cfg, ds.x_train[pub], ds.y_train[pub]) \
        if spec.pretrain else None
    cfg, strategy_options = setup_strategy(opts.strategy, cfg, fleet, ds.x_train[pub],
                                           opts.codec, opts.strategy_options, pretrained,
                                           opts.custom_models(), simulated=True)
    torch.manual_seed(opts.seed)
    model = pretrained if pretrained is not None else zoo.build_model(cfg,
                                                                      opts.custom_models())
    ckpt = checkpoint.Checkpoint(cfg, model, dataset=datasets.spec_for(opts.dataset))
    macs, _ = count_macs(model, checkpoint.example_input(cfg))
    # Random, so that runs on one broker never share retained messages; of a fixed
    # width, so that the bytes counted (the job is in every frame) do not vary with it.
    job = opts.job or f"sim-{opts.seed}-{np.random.default_rng().integers(1 << 32):08x}"
    shards = [rest[p] for p in parts]
    keys = FleetKeys()  # made on the fly: the signed path is the only path
    if opts.keys_out:
        _write_public_keys(keys, opts.devices, Path(opts.keys_out))
    with tempfile.TemporaryDirectory(prefix="fedge-sim-", dir=opts.state_parent) as state:
        serve = ServeOptions(job, Path(state), opts.strategy, opts.codec, opts.rounds,
                             opts.devices - absent(opts), opts.round_timeout, opts.epochs,
                             opts.batch_size, opts.lr, opts.seed, strategy_options=strategy_options,
                             downlink=opts.downlink, max_samples=opts.max_samples,
                             norm_bound=opts.norm_bound)

        def make_aggregator(transport, hook):
            agg = Aggregator(transport, serve, cfg.to_json(), weights_of(model),
                             evaluator(ckpt, ds.x_test, ds.y_test), hook,
                             trust=ServerTrust(job, keys.server, keys, Path(state)))
            publish_summaries(agg, hook)  # a dashboard can watch a --broker run
            # The server's public split is its labelled root data (zeno, fltrust).
            root_data.attach(agg, root_data.RootData(ckpt.model, ds.x_train[pub],
                                                     ds.y_train[pub], _root_training(opts)))
            return agg
        if opts.procs > 1:
            from toolkit.sim.simfleet import run_fleet

            agg, report, agents = run_fleet(opts, job, (ds.x_train, ds.y_train), fleet,
                                            shards, make_aggregator, on_round, keys)
        else:
            agg, report, agents = _run_local(opts, job, ds, fleet, shards, make_aggregator,
                                             on_round, keys)
    load_weights(ckpt.model, agg.weights)
    fleet = fleet[absent(opts):]  # the profiles of the devices that took part
    ckpt.metrics = {"test_accuracy": report["final_accuracy"]}
    run = SimRun(strategy_options, agg.strategy, ckpt.model, cfg, macs, agents, fleet,
                 ds.x_test, ds.y_test)
    per_device = spec.device_macs(run) if spec.device_macs else \
        {a.device: macs for a in agents}
    if spec.report:
        report.update(spec.report(run))
    _add_fleet_figures(report, opts, agents, fleet, per_device)
    report["threads"] = {"server": server_threads, "device": 1}
    return report, ckpt


def _write_public_keys(keys, devices: int, out: Path) -> None:
    """server.pub and registry.json of a simulated fleet (every device's key made now),
    the registry last: a watcher that sees it finds both."""
    for k in range(devices):
        keys.device(f"dev-{k}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.pub").write_bytes(keys.server.public.pem())
    tmp = out / "registry.json.tmp"
    tmp.write_bytes(keys.registry().dumps())
    tmp.replace(out / "registry.json")


def _median(xs: list[float]) -> float:
    return round(float(np.median(xs)), 4) if xs else 0.0


def _add_fleet_figures(report: dict, opts: SimOptions, agents, fleet,
                       macs: dict[str, int]) -> None:
    """Per device: the MACs of the model it trains, its bytes; per round: simulated time.
    ``agents`` are ``SimDevice`` records, wherever the agents ran."""
    profiles = {a.device: p for a, p in zip(agents, fleet)}
    histories = {a.device: a.history for a in agents}
    add_server_time(report["rounds"], simulated_round_times(histories, profiles, macs),
                    opts.server_gflops)
    report["server_gflops"] = opts.server_gflops
    report["devices"] = [
        {"id": a.device, "profile": p.name, "macs": macs[a.device], "samples": a.samples,
         "uplink_bytes": sum(h["uplink_bytes"] for h in a.history),
         "downlink_bytes": sum(h["downlink_bytes"] for h in a.history),
         "rounds_trained": len(a.history),
         "simulated_round_seconds": _median([device_round_seconds(p, macs[a.device], h)
                                             for h in a.history])}
        for a, p in zip(agents, fleet)]
    report.update({"broker": opts.broker or "memory", "dataset": opts.dataset,
                   "attack": opts.attack or None,
                   "alpha": opts.alpha, "seed": opts.seed,
                   "uplink_bytes_total": sum(d["uplink_bytes"] for d in report["devices"]),
                   "downlink_bytes_total": sum(d["downlink_bytes"] for d in report["devices"])})
