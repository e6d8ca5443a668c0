"""``fedge demo``: the field loop end to end on one machine.

MNIST-1D is split non-IID over N devices with mixed profiles; a broker (the
embedded amqtt unless ``--broker``), the aggregator (in this process) and one
OS process per device talk only MQTT. Prints a per-round table with a progress
bar (``toolkit/console.py``), writes the JSON report and a PNG plot beside it.
"""
from __future__ import annotations

import json
import secrets
import subprocess
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from device_runtime import threads
from toolkit.console import RoundProgress
from toolkit.errors import UsageError
from toolkit.field.jobs import DemoJob

PROFILES = ("rpi3b", "rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "android-mid")


def _prepare(work: Path, demo: DemoJob) -> Path:
    """Partition the data and write the initial (untrained) checkpoint."""
    import torch

    from toolkit.model import checkpoint, datasets, zoo
    from toolkit.model.partition import write_partition

    ds = datasets.load_mnist1d()
    write_partition(ds, work / "data", demo.devices, demo.seed, demo.alpha)
    public = datasets.load_npz(work / "data" / "server.npz")
    cfg = zoo.make_config("cnn", ds.sample_shape, ds.num_classes, 1.0,
                          float(np.mean(public.x_train)), float(np.std(public.x_train)))
    torch.manual_seed(demo.seed)
    path = work / "init.safetensors"
    checkpoint.save(checkpoint.Checkpoint(cfg, zoo.build_model(cfg),
                                          dataset=datasets.DatasetSpec("mnist1d")), path)
    return path


def _start_devices(url: str, job: str, work: Path, n: int, keys) -> list[subprocess.Popen]:
    procs = []
    for k in range(n):
        log = open(work / f"device-{k}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "toolkit", "device", "--broker", url, "--job", job,
             "--id", f"dev-{k}", "--profile", PROFILES[k % len(PROFILES)],
             "--data", str(work / "data" / f"device-{k}.npz"), "--idle-timeout", "600",
             "--key", str(keys.device_key(f"dev-{k}")), "--trust", str(keys.server_pub)],
            stdout=log, stderr=subprocess.STDOUT, env=threads.child_env(n + 1)))
    return procs


def _stop(procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in report["rounds"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(rounds, [r["accuracy"] for r in report["rounds"]], marker="o")
    a.set(xlabel="round", ylabel="test accuracy",
          title=f"MNIST-1D, FedAvg ({report['codec']} up, {report['downlink']} down)")
    a.grid(alpha=0.3)
    w = 0.4
    b.bar([r - w / 2 for r in rounds], [r["uplink_bytes"] / 1e6 for r in report["rounds"]],
          w, label="uplink")
    b.bar([r + w / 2 for r in rounds], [r["downlink_bytes"] / 1e6 for r in report["rounds"]],
          w, label="downlink")
    b.set(xlabel="round", ylabel="MB", title="traffic per round")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _serve_job(demo: DemoJob, job: str, init: Path, work: Path, url: str, keys):
    """The aggregator's job: FedAvg with the demo's codecs, serve's defaults for the rest."""
    from toolkit.field.jobs import BrokerSettings, EvalSettings, RoundSettings, ServeJob

    rounds = RoundSettings(demo.rounds, max(2, demo.devices * 3 // 4), demo.round_timeout,
                           demo.epochs, demo.batch_size, demo.lr)
    broker = BrokerSettings(url, signing_key=str(keys.server_key),
                            registry=str(keys.registry))
    return ServeJob(job, init, work / "state", codec=demo.codec, downlink=demo.downlink,
                    rounds=rounds, broker=broker, evaluation=EvalSettings(demo.eval_every),
                    profiles=",".join(PROFILES))


def _eval_rows(history: list[dict]) -> list[dict]:
    """Per evaluation round: the devices' weighted accuracy beside the central test's
    (both of the same round's aggregate) and the gap in points."""
    rows = []
    for r in history:
        ev = r.get("device_eval")
        if ev is None or ev.get("accuracy") is None:
            continue
        gap = round(100 * abs(ev["accuracy"] - r["accuracy"]), 2) \
            if r["accuracy"] is not None else None
        rows.append({"round": r["round"], "central": r["accuracy"],
                     "devices": ev["accuracy"], "gap_points": gap, "samples": ev["samples"],
                     "devices_reporting": ev["devices_reporting"],
                     "by_profile": {p: v["accuracy"] for p, v in ev["by_profile"].items()},
                     "spread": ev["spread"]})
    return rows


MARK = ".fedge-demo"  # a folder with it is a demo's own work dir: a new demo may clear it


def _workdir(demo: DemoJob) -> Path:
    """--workdir, else $FEDGE_HOME/demo, cleared first (the last demo's shards, state,
    keys and logs): runs do not pile up, and nothing goes into the current folder."""
    from device_runtime.rollback import fedge_home

    work = Path(demo.workdir) if demo.workdir else fedge_home() / "demo"
    if (work / MARK).is_file():
        shutil.rmtree(work)
    elif work.is_dir() and any(work.iterdir()):
        raise UsageError(f"--workdir {work}: expected an empty folder or an earlier demo's, "
                         f"got a folder with other files")
    work.mkdir(parents=True, exist_ok=True)
    (work / MARK).write_text("fedge demo work dir: the next fedge demo clears it\n")
    return work


def _report(demo: DemoJob, job: str, history: list[dict], seconds: float) -> dict:
    return {"broker": demo.broker or "embedded", "strategy": "fedavg", "codec": demo.codec,
            "downlink": demo.downlink, "job": job, "devices": demo.devices,
            "rounds": [{k: r[k] for k in ("round", "accuracy", "uplink_bytes",
                                          "downlink_bytes", "devices_reporting", "seconds")}
                       for r in history],
            "final_accuracy": history[-1]["accuracy"], "device_eval": _eval_rows(history),
            "train_seconds": round(seconds, 1)}


def _finish(demo: DemoJob, job: str, work: Path, keys, history: list[dict]) -> dict:
    """Each profile's variant of the final model (printed), and the traffic line."""
    from device_runtime.training.local import weights_of
    from toolkit.field import demo_report
    from toolkit.model import checkpoint

    final = checkpoint.load(work / "state" / "final.safetensors")
    out: dict = {}
    if demo.variants:
        t = time.time()
        manifest, shared = _export(final, job, work, keys)
        out["variants"] = demo_report.variant_rows(manifest, shared)
        out["export_seconds"] = round(time.time() - t, 1)
        print("\n".join(demo_report.variant_lines(out["variants"])))
    t = demo_report.traffic(history, demo_report.fp32_frame_bytes(job, weights_of(final.model)))
    out["traffic"] = {"sent_bytes": t.sent, "fedavg_fp32_bytes": t.fp32,
                      "ratio": round(t.ratio, 2)}
    print(demo_report.traffic_line(t, demo.codec, demo.downlink, len(history),
                                   history[-1]["accuracy"]))
    return out


def _export(final, job: str, work: Path, keys) -> tuple[Path, dict[str, str]]:
    """``fedge export`` of the final model for the demo's profiles, fine-tuning the
    pruned variants and calibrating int8 on what the server has: its public split
    (server.npz, 400 samples), 20 epochs, signed by the demo's key. (``fedge export``'s
    default, the checkpoint's dataset, would be all of MNIST-1D's training set, every
    device's data: a pruned variant then scores above the federated model itself.)

    Profiles whose plans are the same (MACs budget, opset, mobile) share one export,
    planned against the whole fleet: each export costs seconds (the dynamo exporter,
    about 1 s per artifact), and the Pis' three were the same variant. Returns the
    manifest and, per profile, the profile whose export it shares."""
    from toolkit.model import datasets
    from toolkit.model.pruning import count_macs
    from toolkit.planning.fleet import ExportOptions, export_fleet
    from toolkit.planning.plan import PlanOptions, plan_fleet
    from toolkit.planning.profiles import ProfileCatalogue
    from toolkit.model.checkpoint import example_input

    profiles = ProfileCatalogue.load(None).select(",".join(PROFILES))
    plan = PlanOptions(reference_gflops=max(p.gflops for p in profiles))
    macs, params = count_macs(final.model, example_input(final.config))
    plans = plan_fleet(profiles, macs, params, plan)
    first: dict[tuple, str] = {}
    shared = {p.name: first.setdefault((plans[p.name].macs_budget, plans[p.name].opset,
                                        p.mobile), p.name) for p in profiles}
    reps = [p for p in profiles if shared[p.name] == p.name]
    opts = ExportOptions(plan=plan, finetune_epochs=20, pte=False,
                         signing_key=keys.server_key, job=job)
    public = datasets.load_npz(work / "data" / "server.npz")
    return export_fleet(final, reps, work / "variants", public, opts), shared


def run_demo(demo: DemoJob) -> int:
    from toolkit.field.fleet_keys import write_fleet_keys
    from toolkit.field.serve import broker_url, round_extra, run_serve

    from broker_server.downlink import check_downlink
    from device_runtime import codecs
    from toolkit.strategies.setups import check_strategy

    codecs.get(demo.codec)  # a bad name is a one-line error before anything is made
    check_strategy("fedavg")  # FedAvg's rule known, for the downlink's check
    check_downlink(demo.downlink, "fedavg")
    work = _workdir(demo)
    t0 = time.time()
    init = _prepare(work, demo)
    job = f"demo-{secrets.token_hex(3)}"
    # Keys made on the fly, as fedge secure init would issue them: signed is the only path.
    keys = write_fleet_keys(work / f"keys-{job}", [f"dev-{k}" for k in range(demo.devices)])
    report_path = demo.report or work / "demo.json"
    with broker_url(demo.broker, work / "broker.log") as url:
        print(f"broker {url}{' (embedded amqtt)' if not demo.broker else ''}; job {job}; "
              f"{demo.devices} device processes ({', '.join(PROFILES)}); FedAvg, "
              f"{demo.codec} up, {demo.downlink} down; work dir {work}", flush=True)
        procs = _start_devices(url, job, work, demo.devices, keys)
        try:
            with RoundProgress(demo.rounds, extra=round_extra) as progress:
                run_serve(_serve_job(demo, job, init, work, url, keys), on_round=progress)
        finally:
            _stop(procs)
    from broker_server.state import read_history

    history = read_history(work / "state")[0]
    out = _report(demo, job, history, time.time() - t0)
    out.update(_finish(demo, job, work, keys, history))
    out["seconds"] = round(time.time() - t0, 1)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(out, indent=1))
    plot(out, report_path.with_suffix(".png"))
    if out["device_eval"]:
        worst = max(e["gap_points"] for e in out["device_eval"])
        print(f"on-device evaluation: {len(out['device_eval'])} rounds, the devices' weighted "
              f"accuracy within {worst:.2f} points of the central test's")
    print(f"final accuracy {out['final_accuracy']:.4f} in {out['seconds']}s; wrote "
          f"{report_path} and {report_path.with_suffix('.png')}; shards, state, keys, "
          f"variants and logs in {work} (the next demo clears it)")
    return 0
