"""The soak's engine: one Mosquitto, one ``fedge serve``, N ``fedge device`` processes and
a seeded schedule of faults on them; ``run_soak`` runs it and checks every round.

``bench/soak.py`` is the command line (the 50-round run of docs/results/soak.md);
``tests/test_soak.py`` runs a shorter schedule. The checks are ``testkit.soak_check``'s,
the figures ``testkit.soak_report``'s.
"""
from __future__ import annotations

import json
import random
import secrets
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from broker_server.records import rss_bytes
from broker_server.update_log import read_log
from device_runtime.keys import PublicKey
from testkit.brokers import Mosquitto
from testkit.field import (
    completed_rounds,
    finish,
    prepare_job,
    sigkill,
    start_device,
    start_server,
)
from testkit.soak_check import Observer, check_history
from testkit.soak_report import summarize


@dataclass(frozen=True)
class SoakConfig:
    rounds: int = 50
    devices: int = 8
    seed: int = 0
    min_devices: int = 5  # quorum: two devices down at once still leave six
    round_timeout: float = 8.0  # a killed device holds its round this long, no more
    codec: str = "fedmrn"
    strategy: str = "fedavg"
    warmup: int = 5  # rounds of each aggregator process left out of the RSS fit
    min_fit_rounds: int = 10  # a shorter fit is reported, not judged
    # MiB/round. What legitimately grows is the history (a record of ~3.5 KB a round),
    # ~0.003 MiB/round; RSS is read after malloc_trim, and its fitted slope wanders by
    # a few hundredths of a MiB/round (Python's own arenas). Keeping one model frame a
    # round (94 KiB here), a fold's state or a round's decoded updates passes 0.05; a
    # leak below ~50 KiB a round (the raw updates alone, ~40 KiB) would not.
    rss_bound_mb: float = 0.05
    max_seconds: float = 1500.0
    workdir: str | None = None


def schedule(cfg: SoakConfig) -> list[dict]:
    """The faults, by round: seeded, so a run can be repeated. A device is killed every
    3-5 rounds (never more than two down at once) and restarted 2-3 rounds later; the
    aggregator is killed at 40% of the run and the broker restarted at 70%."""
    rng = random.Random(cfg.seed)
    agg, brk = max(2, round(0.4 * cfg.rounds)), max(3, round(0.7 * cfg.rounds))
    events = [{"round": agg, "kind": "kill_aggregator"},
              {"round": brk, "kind": "restart_broker", "delay": 1.0}]
    down: dict[int, int] = {}  # device -> the round it comes back
    r = 2
    while r <= cfg.rounds - 3:
        if r in (agg, brk):  # one fault kind at a time, so each one's effect is visible
            r += 1
            continue
        down = {k: back for k, back in down.items() if back > r}
        alive = [k for k in range(cfg.devices) if k not in down]
        if len(down) < 2 and alive:
            k = rng.choice(alive)
            back = r + rng.randint(2, 3)
            down[k] = back
            events.append({"round": r, "kind": "kill_device", "device": k,
                           "delay": round(rng.uniform(0.2, 2.0), 2)})
            events.append({"round": back, "kind": "restart_device", "device": k})
        r += rng.randint(3, 5)
    return sorted(events, key=lambda e: (e["round"], e["kind"] != "restart_device"))


class Fleet:
    """The processes of one soak: broker, aggregator, devices; and the faults on them."""

    def __init__(self, cfg: SoakConfig, work: Path):
        self.cfg, self.work = cfg, work
        self.ckpt = prepare_job(work, cfg.devices, cfg.seed)
        self.broker = Mosquitto(work / "mosq").start()
        self.job = f"soak-{cfg.seed}-{secrets.token_hex(3)}"
        self.observer = Observer(self.broker.url, self.job,
                                 PublicKey.load(work / "keys" / "server.pub"))
        self.devices: dict[int, object] = {}
        self.server = None
        self.done: list[dict] = []  # the faults as injected, with what was seen then

    def start(self) -> None:
        self.observer.start()
        for k in range(self.cfg.devices):
            self.devices[k] = start_device(self.broker.url, self.job, self.work, k)
        self._start_server()

    def _start_server(self) -> None:
        self.server = start_server(self.broker.url, self.job, self.work, self.ckpt,
                                   self.cfg.rounds, self.cfg.min_devices,
                                   self.cfg.round_timeout,
                                   ["--codec", self.cfg.codec, "--strategy", self.cfg.strategy])

    def apply(self, ev: dict, r: int) -> None:
        t0 = time.time()
        if ev["kind"] == "kill_device":
            time.sleep(ev["delay"])  # mid-round: while it trains or just after it sent
            sigkill(self.devices[ev["device"]])
        elif ev["kind"] == "restart_device":
            self.devices[ev["device"]] = start_device(self.broker.url, self.job, self.work,
                                                      ev["device"])
        elif ev["kind"] == "kill_aggregator":
            ev = {**ev, **self._kill_aggregator(r)}
        elif ev["kind"] == "restart_broker":
            time.sleep(ev["delay"])
            self.broker.restart(down_seconds=1.5)
        self.done.append({**ev, "at_round": r, "seconds": round(time.time() - t0, 2)})

    def _kill_aggregator(self, r: int) -> dict:
        """SIGKILL once an update of the open round is persisted (so the restart must
        reload it and must not fold its resend again), then restart on the same state."""
        log = self.work / "state" / f"round-{r}.log"
        deadline = time.time() + 4 * self.cfg.round_timeout
        while time.time() < deadline and completed_rounds(self.work) < r and \
                not (log.exists() and read_log(log).records):
            time.sleep(0.01)
        sigkill(self.server)
        persisted = sorted(d for d, _ in read_log(log).records) if log.exists() else []
        completed = completed_rounds(self.work)
        time.sleep(1.0)
        self._start_server()
        return {"persisted_at_kill": persisted, "completed_at_kill": completed}

    def sample(self) -> dict:
        """RSS of every live process now, in bytes."""
        devs = {f"dev-{k}": rss_bytes(p.pid) for k, p in self.devices.items()
                if p.poll() is None}
        return {"aggregator": rss_bytes(self.server.pid) if self.server.poll() is None else 0,
                "aggregator_pid": self.server.pid, "devices": devs,
                "device_pids": {f"dev-{k}": p.pid for k, p in self.devices.items()}}

    def stop(self) -> list[int]:
        codes = finish([self.server, *self.devices.values()], timeout=60)
        self.observer.close()
        self.broker.stop()
        return codes

    def kill_all(self) -> None:
        for p in [self.server, *self.devices.values()]:
            if p is not None and p.poll() is None:
                sigkill(p)
        self.observer.close()
        self.broker.stop()


def _drive(fleet: Fleet, cfg: SoakConfig, events: list[dict]) -> dict[int, dict]:
    """Follow the rounds as the observer sees their models; at each round's start sample
    RSS and inject that round's faults. Returns the samples by round."""
    samples: dict[int, dict] = {}
    seen, start = 0, time.time()
    while True:
        r = fleet.observer.current_round()
        for rr in range(seen + 1, r + 1):
            samples[rr] = {**fleet.sample(), "t": round(time.time() - start, 2)}
            for ev in (e for e in events if e["round"] == rr):
                fleet.apply(ev, rr)
        seen = max(seen, r)
        if fleet.server.poll() is not None:
            return samples
        if time.time() - start > cfg.max_seconds:
            raise TimeoutError(f"soak: round {seen} of {cfg.rounds} after "
                               f"{cfg.max_seconds:.0f}s")
        time.sleep(0.05)


def run_soak(cfg: SoakConfig) -> dict:
    """Run the soak and check it; the result's ``passed`` says whether every check held."""
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="fedge-soak-"))
    if work.exists() and cfg.workdir:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    events = schedule(cfg)
    fleet = Fleet(cfg, work)
    t0 = time.time()
    try:
        fleet.start()
        samples = _drive(fleet, cfg, events)
        codes = fleet.stop()
    except BaseException:
        fleet.kill_all()
        raise
    wall = time.time() - t0
    report = json.loads((work / "report.json").read_text())
    final = work / "state" / f"global-{cfg.rounds}.fdg"
    checks = check_history(report["rounds"], fleet.observer.seen,
                           final.read_bytes() if final.exists() else None, cfg.rounds,
                           cfg.strategy, cfg.codec)
    res = summarize(cfg, report, checks, fleet.observer.seen, samples, fleet.done, codes, wall)
    res.update(config=asdict(cfg), workdir=str(work), job=fleet.job,
               observer_errors=fleet.observer.errors[:20],
               observer_reconnects=fleet.observer.t.reconnects)
    return res
