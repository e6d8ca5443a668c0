"""The dashboard with a simulated fleet: how long after a round closes the page shows it.

A private Mosquitto, ``fedge simulate --broker`` with N devices (each its own MQTT
client, in K processes), ``fedge dashboard`` on the same broker, and a real headless
Chromium on the page. The page records, for each round that closes while it is open,
``Date.now()`` after the new figures are laid out and painted minus the summary's
``closed`` (the aggregator's clock; same machine). Also reported: how many device
rows the page shows, the events it received, the dashboard process's CPU time and RSS,
and ``uptime`` before and after (the machine is shared).

    python bench/dashboard.py --devices 1000 --procs 4 --rounds 5 \\
        --json docs/results/dashboard.json --md docs/results/dashboard.md
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import command, machine, write_results  # noqa: E402

SHOT = ROOT / "docs" / "results" / "dashboard" / "fleet-1000.png"


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _simulate(args, url: str, job: str, work: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "toolkit", "simulate", "--broker", url, "--job", job,
           "--keys-out", str(work / "keys"), "--devices", str(args.devices),
           "--procs", str(args.procs), "--rounds", str(args.rounds), "--codec", "fedmrn",
           "--downlink", "fedmrn", "--model", "cnn", "--width", "0.25", "--epochs", "2",
           "--min-samples", "2", "--json", str(work / "sim.json")]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(work / "simulate.log", "wb"),
                            stderr=subprocess.STDOUT)


def run(args) -> dict:
    import psutil

    from broker_server.embedded import free_port
    from testkit.brokers import Mosquitto
    from testkit.browser import headless_chromium, page_value, start_dashboard, wait_http

    work = Path(tempfile.mkdtemp(prefix="dash-bench-"))
    before = _uptime()
    broker = Mosquitto(work / "mosq", extra_conf="max_connections -1\n").start()
    job, port = "dash-bench", free_port()
    sim = _simulate(args, broker.url, job, work)
    deadline = time.time() + 600
    while not (work / "keys" / "registry.json").exists():
        if sim.poll() is not None or time.time() > deadline:
            raise SystemExit(f"simulate ended before writing its keys: {work}/simulate.log")
        time.sleep(0.2)
    dash = start_dashboard(broker.url, job, work, port)
    driver = None
    try:
        wait_http(f"http://127.0.0.1:{port}/api/state")
        driver = headless_chromium()
        driver.get(f"http://127.0.0.1:{port}/")
        code = sim.wait(args.timeout)
        time.sleep(2)  # the last event
        SHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOT))
        latency = page_value(driver, "fedge.latency")
        rows = page_value(driver, "document.querySelectorAll('#fleet tbody tr').length")
        events = page_value(driver, "fedge.events")
        proc = psutil.Process(dash.pid)
        cpu = proc.cpu_times()
        res = {"machine": machine(), "command": command("bench/dashboard.py"),
               "devices": args.devices, "procs": args.procs, "rounds": args.rounds,
               "simulate_exit": code, "rows_shown": rows, "events": events,
               "latency": latency, "dashboard_cpu_seconds": round(cpu.user + cpu.system, 2),
               "dashboard_rss_mb": round(proc.memory_info().rss / 2**20, 1),
               "uptime_before": before, "uptime_after": _uptime(), "work": str(work)}
    finally:
        if driver is not None:
            driver.quit()
        dash.terminate()
        dash.wait(30)
        if sim.poll() is None:
            sim.kill()
        broker.stop()
    return res


def to_markdown(res: dict) -> str:
    secs = [x["seconds"] for x in res["latency"]]
    rows = "\n".join(f"| {x['round']} | {x['seconds']:.3f} |" for x in res["latency"])
    return f"""# Dashboard with {res['devices']:,} simulated devices

Machine: {res['machine']}, shared. Command: `{res['command']}`

`uptime` before: `{res['uptime_before']}`; after: `{res['uptime_after']}`

| round | page updated after the round closed, s |
|---|---|
{rows}

Median {statistics.median(secs):.3f} s, max {max(secs):.3f} s over {len(secs)} rounds;
the page showed {res['rows_shown']:,} device rows after {res['events']} events; the
dashboard process used {res['dashboard_cpu_seconds']} CPU s and {res['dashboard_rss_mb']}
MB RSS over the run. `fedge simulate` exited {res['simulate_exit']}.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default="docs/results/dashboard.json")
    p.add_argument("--md")
    args = p.parse_args()
    write_results(run(args), args.json, args.md, to_markdown)


if __name__ == "__main__":
    main()
