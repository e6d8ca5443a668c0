"""The soak's figures: per round, per phase, the memory fits, and the markdown table.

A phase is the stretch between two of the big faults: before the aggregator kill,
from it to the broker restart, and after. Memory is fitted per process (an
aggregator restarted at round 20 starts small again), leaving out each process's
first ``warmup`` rounds, in which imports and first allocations settle.
"""
from __future__ import annotations

from testkit.soak_check import Seen, slope

MIB = float(1 << 20)


def _per_process(points: list[tuple[int, int, int]], warmup: int) -> dict[int, dict]:
    """(round, pid, rss) -> per pid: rounds, first/last MiB and the slope after warm-up."""
    out: dict[int, dict] = {}
    for pid in dict.fromkeys(p for _, p, _ in points):
        mine = sorted((r, rss) for r, p, rss in points if p == pid and rss > 0)
        kept = mine[warmup:]
        s = slope([r for r, _ in kept], [v / MIB for _, v in kept])
        out[pid] = {"rounds": [mine[0][0], mine[-1][0]] if mine else [],
                    "first_mib": round(mine[0][1] / MIB, 1) if mine else None,
                    "last_mib": round(mine[-1][1] / MIB, 1) if mine else None,
                    "fit_rounds": len(kept),
                    "slope_mib_per_round": None if s is None else round(s, 4)}
    return out


def _rows(cfg, hist: list[dict], seen: Seen, samples: dict, checks: dict) -> list[dict]:
    by_round = {c["round"]: c for c in checks["per_round"]}
    last: dict[int, tuple[int, int]] = {}  # pid -> (duplicates, rejected) so far
    rows = []
    for h in hist:
        pid = h.get("pid")
        dup0, rej0 = last.get(pid, (0, 0))
        last[pid] = (h.get("duplicates_so_far", 0), h.get("rejected_so_far", 0))
        c, s = by_round.get(h["round"], {}), samples.get(h["round"], {})
        rows.append({
            "round": h["round"], "seconds": h["seconds"], "assigned": h["devices_assigned"],
            "reporting": h["devices_reporting"], "accuracy": h["accuracy"],
            "quorum_miss": h["seconds"] > cfg.round_timeout + 1.0,
            "deadline_close": h["devices_reporting"] < h["devices_assigned"],
            "resends_seen": seen.resends(h["round"]),
            "duplicates": last[pid][0] - dup0, "rejected": last[pid][1] - rej0,
            "pid": pid, "rss_mib": round(h.get("rss_bytes", 0) / MIB, 2),
            "exactly_once": bool(c.get("distinct") and c.get("observed") and
                                 c.get("recomputed")),
            "double_fold_detectable": c.get("double_fold_detectable"),
            "device_rss_mib": {d: round(v / MIB, 1) for d, v in s.get("devices", {}).items()},
            "t": s.get("t")})
    return rows


def _phases(cfg, rows: list[dict], done: list[dict], wall: float) -> list[dict]:
    agg = next((e["round"] for e in done if e["kind"] == "kill_aggregator"), None)
    brk = next((e["round"] for e in done if e["kind"] == "restart_broker"), None)
    cuts = [(1, "start")]
    if agg:
        cuts.append((agg, f"aggregator SIGKILLed in round {agg}, restarted"))
    if brk:
        cuts.append((brk, f"broker restarted in round {brk}"))
    out = []
    for i, (lo, name) in enumerate(cuts):
        hi = cuts[i + 1][0] - 1 if i + 1 < len(cuts) else cfg.rounds
        mine = [r for r in rows if lo <= r["round"] <= hi]
        evs = [e for e in done if lo <= e["at_round"] <= hi]
        count = lambda kind: sum(e["kind"] == kind for e in evs)  # noqa: E731
        t_lo = mine[0]["t"] if mine and mine[0]["t"] is not None else 0.0
        nxt = [r["t"] for r in rows if r["round"] == hi + 1 and r["t"] is not None]
        fit = _per_process([(r["round"], r["pid"], int(r["rss_mib"] * MIB)) for r in mine],
                           cfg.warmup if lo == 1 or lo == agg else 0)
        slopes = [f["slope_mib_per_round"] for f in fit.values()
                  if f["slope_mib_per_round"] is not None]
        out.append({"phase": name, "rounds": [lo, hi], "n_rounds": len(mine),
                    "device_kills": count("kill_device"),
                    "device_restarts": count("restart_device"),
                    "aggregator_kills": count("kill_aggregator"),
                    "broker_restarts": count("restart_broker"),
                    "quorum_misses": sum(r["quorum_miss"] for r in mine),
                    "deadline_closes": sum(r["deadline_close"] for r in mine),
                    "resends_seen": sum(r["resends_seen"] for r in mine),
                    "duplicates": sum(r["duplicates"] for r in mine),
                    "rejected": sum(r["rejected"] for r in mine),
                    "exactly_once": f"{sum(r['exactly_once'] for r in mine)}/{len(mine)}",
                    "rss_slope_mib_per_round": max(slopes) if slopes else None,
                    "wall_seconds": round((nxt[0] if nxt else wall) - t_lo, 1)})
    return out


def _device_fits(samples: dict, warmup: int) -> dict:
    points: dict[str, list[tuple[int, int, int]]] = {}
    for r, s in samples.items():
        for d, rss in s.get("devices", {}).items():
            points.setdefault(d, []).append((r, s["device_pids"][d], rss))
    return {d: list(_per_process(p, warmup).values()) for d, p in sorted(points.items())}


def summarize(cfg, report: dict, checks: dict, seen: Seen, samples: dict, done: list[dict],
              codes: list[int], wall: float) -> dict:
    """Everything the JSON holds; ``failures`` empty and ``passed`` true when the soak
    proved exactly-once and bounded memory and every process ended cleanly."""
    hist = report["rounds"]
    rows = _rows(cfg, hist, seen, samples, checks)
    agg = _per_process([(h["round"], h.get("pid", 0), h.get("rss_bytes", 0)) for h in hist],
                       cfg.warmup)
    fails = list(checks["failures"])
    for pid, f in agg.items():
        s = f["slope_mib_per_round"]
        if s is not None and f["fit_rounds"] >= cfg.min_fit_rounds and \
                s >= cfg.rss_bound_mb:
            fails.append(f"aggregator pid {pid}: RSS grows {s:.3f} MiB/round over rounds "
                         f"{f['rounds']} (bound {cfg.rss_bound_mb})")
    if not any(f["fit_rounds"] >= cfg.min_fit_rounds for f in agg.values()):
        fails.append(f"no aggregator process ran {cfg.min_fit_rounds} rounds past its "
                     "warm-up: its memory is not judged")
    if any(codes):
        fails.append(f"exit codes (aggregator, devices): {codes}")
    kinds = {e["kind"] for e in done}
    for kind in ("kill_device", "restart_device", "kill_aggregator", "restart_broker"):
        if kind not in kinds:
            fails.append(f"fault never injected: {kind}")
    return {"passed": not fails, "failures": fails, "rounds_completed": len(hist),
            "final_accuracy": report.get("final_accuracy"), "wall_seconds": round(wall, 1),
            "faults": done, "exit_codes": codes,
            "checks": {k: v for k, v in checks.items() if k != "per_round"},
            "aggregator_rss": {str(k): v for k, v in agg.items()},
            "device_rss": _device_fits(samples, cfg.warmup),
            "phases": _phases(cfg, rows, done, wall), "per_round": rows,
            "rejected": report.get("rejected", [])[:50],  # the last process's, with reasons
            "last_process": {"duplicates": report.get("duplicates"),
                             "rejected": len(report.get("rejected", [])),
                             "resumed_from": report.get("resumed_from")}}


def _fault(e: dict) -> str:
    r = e["at_round"]
    if e["kind"] == "kill_device":
        return f"r{r} SIGKILL dev-{e['device']} ({e['delay']} s in)"
    if e["kind"] == "restart_device":
        return f"r{r} restart dev-{e['device']}"
    if e["kind"] == "kill_aggregator":
        return (f"r{r} SIGKILL aggregator (persisted then: "
                f"{', '.join(e.get('persisted_at_kill', [])) or 'none'}), restarted")
    return f"r{r} broker restarted ({e.get('delay', 0)} s in, 1.5 s down)"


NOTES = """
## How it is proven

- Every round record of the aggregator lists `updates`, the `[device, sha256]` of each
  payload its fold folded, in fold order, and `folded`, the successful `Fold.add` calls
  counted apart (`broker_server/records.py`). Per round the checker
  (`testkit/soak_check.py`) requires (a) distinct devices, `folded == len(updates)` and the
  same devices as `accepted`; (b) each sha256 to be that of a payload an independent
  observer client saw that device publish for that round; (c) folding exactly those
  payloads, in that order, into the round's observed model frame with the job's own fold
  to reproduce the next round's model frame (for the last round: the saved
  `global-<R>.fdg`) bit for bit. FedAvg over `fedmrn` sums integer mask bits, so the
  recomputation is exact. It also folds each round's first update twice and checks the
  result differs: a double fold would have been seen in every round (so the check does
  not pass vacuously; `tests/test_soak.py` also feeds it forged records and a real
  double fold and sees each one fail).
- "resends seen" are update publications beyond a device's first for that round (a
  device resends its stored update when its task comes again: after the aggregator
  restart, after the broker restart, after a reconnect); "duplicates" are those the
  aggregator counted and ignored. None was folded twice: (a) and (c) hold in every round.
- "quorum misses": rounds that closed more than 1 s after their deadline (the quorum was
  not in at the deadline); round 1 is one when the devices' first training (torch import)
  outlasts the round timeout. "deadline closes": rounds closed at the deadline with the
  quorum but not every assigned device (a killed one).
- Memory: the record's `rss_bytes` is read after `malloc_trim(0)` (without it the
  allocator's kept pages made RSS jump by +-10 MiB between rounds); the slope is
  Theil-Sen (median of pairwise slopes) per aggregator process, leaving out each
  process's first rounds. Legitimate growth is the history (~3.5 KB a round,
  ~0.003 MiB/round). The bound, 0.05 MiB/round, fails a leak of one model frame a round
  (94 KiB here), of a fold's state or of a round's decoded updates; it would not see a
  leak below ~50 KiB a round (the raw updates alone, ~40 KiB, would take a longer soak).
  The phase column is the same fit over that phase only (fewer rounds: noisier, not
  judged).

## What the soak found in fedge (fixed with it)

- A restarted aggregator lost the updates the broker had queued for its persistent
  session: they arrived right after the CONNACK, before it subscribed its handlers again,
  and the transport dropped messages no handler matched. The transport now keeps them
  (up to 32 MiB) for the first handler subscribed for them
  (`device_runtime/transport/base.py`).
- With that, they reached the aggregator while it waited for devices, before it reopened
  their round, and were rejected as late. Since issue 20 they are refused on purpose
  (the transport's gate holds nothing for a round that is not open): the reopened round
  re-sends each task with the same nonce, and each device answers with the update it
  already sent, so none is lost and nothing unbounded is parked.
- The aggregator's RSS climbed ~15-45 KiB a round: the MQTT transport kept every
  publish's paho `MQTTMessageInfo` (~1.5 KB each) until it held 1024 of them. It now
  forgets the acknowledged ones whenever the list passes twice what was left unacknowledged
  the last time (at least 64), so the list stays small at an amortized O(1) per publish.
"""


def to_markdown(res: dict) -> str:
    c = res["checks"]
    lines = [f"# Soak: {res['rounds_completed']} rounds under faults",
             "", f"`{res['command']}` on {res['machine']}; "
             f"{res['config']['devices']} devices, {res['config']['strategy']} + "
             f"{res['config']['codec']}, round timeout {res['config']['round_timeout']:g} s, "
             f"quorum {res['config']['min_devices']}, seed {res['config']['seed']}.",
             "", f"**{'PASSED' if res['passed'] else 'FAILED'}** in {res['wall_seconds']} s; "
             f"exactly-once proven for {c['rounds_passed']}/{c['rounds_checked']} rounds "
             f"({c['updates_checked']} accepted updates: each seen on the broker, folded "
             f"once, the aggregate recomputed bit for bit; a double fold would have changed "
             f"the result in {c['double_fold_detectable']} of them); final accuracy "
             f"{res['final_accuracy']}.", "",
             "| phase | rounds | device kills | device restarts | aggregator kills | broker "
             "restarts | quorum misses | deadline closes | resends seen | duplicates | "
             "rejected | exactly-once | agg RSS slope (MiB/round) | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["phases"]:
        s = p["rss_slope_mib_per_round"]
        lines.append(f"| {p['phase']} | {p['rounds'][0]}-{p['rounds'][1]} | "
                     f"{p['device_kills']} | {p['device_restarts']} | {p['aggregator_kills']} | "
                     f"{p['broker_restarts']} | {p['quorum_misses']} | {p['deadline_closes']} | "
                     f"{p['resends_seen']} | {p['duplicates']} | {p['rejected']} | "
                     f"{p['exactly_once']} | {'-' if s is None else f'{s:+.4f}'} | "
                     f"{p['wall_seconds']} |")
    faults = "; ".join(_fault(e) for e in res["faults"])
    lines += ["", f"Faults injected (seeded schedule): {faults}."]
    lines += ["", "Aggregator RSS per process (Theil-Sen slope after the warm-up rounds; "
              f"judged against {res['config']['rss_bound_mb']} MiB/round over at least "
              f"{res['config']['min_fit_rounds']} rounds):", ""]
    for pid, f in res["aggregator_rss"].items():
        lines.append(f"- pid {pid}: rounds {f['rounds']}, {f['first_mib']} -> "
                     f"{f['last_mib']} MiB, slope {f['slope_mib_per_round']} MiB/round over "
                     f"{f['fit_rounds']} rounds")
    dev = [f for fits in res["device_rss"].values() for f in fits
           if f["slope_mib_per_round"] is not None]
    if dev:
        lines += ["", f"Device RSS: {len(dev)} device processes fitted, last "
                  f"{min(f['last_mib'] for f in dev)}-{max(f['last_mib'] for f in dev)} MiB, "
                  f"slopes {min(f['slope_mib_per_round'] for f in dev):+.4f} to "
                  f"{max(f['slope_mib_per_round'] for f in dev):+.4f} MiB/round."]
    if res["failures"]:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in res["failures"]]
    return "\n".join(lines) + "\n" + NOTES
