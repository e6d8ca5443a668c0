"""bench/robust.py's arms by name and its report: the tables and the acceptance lines
written from a run's summary (no torch here; the runs are robust.py's)."""
from __future__ import annotations

import statistics
from pathlib import Path

KINDS = ("replace", "signflip", "noise", "lie", "labelflip")
RULES = {"mean": None, "median": "median", "trimmed:0.1": "trimmed:0.1",
         "multikrum:4": "multikrum:4", "clip:q0.5": "mean", "zeno:4": "zeno:4",
         "fltrust": "fltrust"}
ORACLE = "fp32|oracle|absent:4"  # FedAvg over the 16 honest devices: the attackers' absent
DEFAULT = "clip:q0.5"  # the rule this bench recommends switching on (say why in the md)
# signSGD-FV (codec sign), without and with a vote cap; its step and local steps (the
# sweep arms: clean only, to choose them)
SIGN_RULES = ("fv", "fv cap:0.1")
SIGN_SWEEP = ("fv lr:0.005", "fv lr:0.02", "fv lr:0.005 steps:10", "fv lr:0.02 steps:10",
              "fv lr:0.05 steps:10", "fv lr:0.02 steps:40")
SIGN_LR, SIGN_STEPS = 0.02, 10  # the best of SIGN_SWEEP at 10 rounds (seed 0)


def _table(summary: dict, codec: str, rules: list[str], attacks: list[str]) -> list[str]:
    lines = ["| attack | " + " | ".join(rules) + " |", "|---" * (len(rules) + 1) + "|"]
    for a in attacks:
        cells = [summary.get(f"{codec}|{r}|{a}") for r in rules]
        lines.append(f"| {a} | " + " | ".join(
            "-" if c is None else f"{c['median']:.3f}" + (f" ({len(c['seeds'])})"
                                                          if len(c["seeds"]) < 3 else "")
            for c in cells) + " |")
    return lines


def _clean(summary: dict, seeds: list[int], arm: str = "fp32|mean|none") -> float | None:
    """Clean FedAvg's (``arm``'s) median final accuracy over those of ``seeds`` it ran."""
    runs = summary.get(arm, {"finals": [], "seeds": []})
    got = [a for a, s in zip(runs["finals"], runs["seeds"]) if s in seeds]
    return statistics.median(got) if got else None


def acceptance(summary: dict) -> list[str]:
    """With 4 attackers, the best rule per attack against clean FedAvg and the oracle on
    the same seeds (< 3 points); with none, each rule's cost against FedAvg (the
    default's < 1 point)."""
    if "fp32|mean|none" not in summary:
        return ["Clean FedAvg (fp32|mean|none) not run yet."]
    clean = summary["fp32|mean|none"]["median"]
    lines = [f"Clean FedAvg (fp32, no attackers): {clean:.3f} (seeds "
             f"{summary['fp32|mean|none']['seeds']})."]
    if ORACLE in summary:
        o = summary[ORACLE]
        lines.append(f"Oracle (FedAvg over the 16 honest devices only, the 4 attackers' "
                     f"devices never joining): {o['median']:.3f} (seeds {o['seeds']}: "
                     f"{', '.join(f'{a:.3f}' for a in o['finals'])}).")
    lines += ["", "| attack (4 of 20) | FedAvg | best rule | its accuracy | seeds | clean "
              "FedAvg, same seeds | oracle, same seeds | points below clean | within 3 "
              "points |", "|---|---|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        got = {r: summary[f"fp32|{r}|{kind}:4"] for r in RULES
               if r != "mean" and f"fp32|{r}|{kind}:4" in summary}
        if not got:
            continue
        best = max(got, key=lambda r: got[r]["median"])
        seeds = got[best]["seeds"]
        base = _clean(summary, seeds)
        oracle = _clean(summary, seeds, ORACLE)
        if base is None:
            continue
        gap = 100 * (base - got[best]["median"])
        plain = summary.get(f"fp32|mean|{kind}:4", {}).get("median")
        lines.append(f"| {kind} | {_fmt(plain)} | {best} | {got[best]['median']:.3f} | "
                     f"{seeds} | {base:.3f} | {_fmt(oracle)} | {gap:.1f} | "
                     f"{'yes' if gap < 3 else '**no**'} |")
    return lines + ["", *costs(summary, clean)]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def costs(summary: dict, clean: float) -> list[str]:
    """Each rule's accuracy with no attackers against FedAvg's."""
    lines = ["| rule, no attackers | accuracy | points below FedAvg | under 1 point |",
             "|---|---|---|---|"]
    for r in RULES:
        if f"fp32|{r}|none" in summary:
            acc = summary[f"fp32|{r}|none"]["median"]
            mark = " (default)" if r == DEFAULT else ""
            lines.append(f"| {r}{mark} | {acc:.3f} | {100 * (clean - acc):.1f} | "
                         f"{'yes' if clean - acc < 0.01 else '**no**'} |")
    return lines


def dp_table(res: dict) -> list[str]:
    s = res["summary"]
    lines = [f"| arm | noise multiplier | accountant epsilon (delta {res['delta']:g}) "
             "| accuracy |", "|---|---|---|---|"]
    for arm, z in res["dp_noise"].items():
        if arm in s:
            eps = s[arm].get("epsilon")
            lines.append(f"| {arm.split('|')[1]} | {z:.3f} | "
                         f"{'-' if eps is None else f'{eps:.3f}'} | {s[arm]['median']:.3f} |")
    return lines


def to_markdown(res: dict) -> str:
    s = res["summary"]
    seen = {a.split("|")[2] for a in s if not a.startswith("dp|")}
    attacks = ["none"] + [f"{k}:{c}" for k in KINDS for c in (2, 4) if f"{k}:{c}" in seen]
    lines = ["# Robust aggregation against attacking devices: MNIST-1D, Dirichlet 0.5\n",
             f"{res['devices']} devices, {res['rounds']} rounds of {res['epochs']} local "
             f"epochs (lr {res['lr']}), final accuracy, median over seeds {res['seeds']} "
             f"(fp32 clean and 4 attackers) and {res['side_seeds']} (the rest); the "
             f"aggregator's norm guard off. {res['runs_done']} of {res['runs_planned']} "
             f"planned runs done. Machine {res['machine']}; load at the end: "
             f"`{res['uptime']}`; wall {res['wall_seconds']} s (this invocation).\n",
             f"Command: `{res['command']}`\n", "## fp32 updates\n",
             "Cells: median final accuracy; (n): over n seeds only (the bench ran out of "
             "time before the rest).\n",
             *_table(s, "fp32", list(RULES), attacks), "", "## Acceptance\n",
             *acceptance(s)]
    onebit = sorted({a.split("|")[0] for a in s} - {"fp32", "dp"})
    for codec in onebit:
        ran = {a.split("|")[1] for a in s if a.startswith(codec + "|")}
        rules = [r for r in SIGN_RULES + SIGN_SWEEP if r in ran] if codec == "sign" \
            else sorted(ran)
        rows = [a for a in attacks if any(f"{codec}|{r}|{a}" in s for r in rules)]
        title = f"signSGD-FV, codec sign (server step {SIGN_LR:g}, {SIGN_STEPS} local " \
            "step(s) unless the column says)" if codec == "sign" else f"{codec} (1-bit masks)"
        lines += ["", f"## {title}\n", *_table(s, codec, rules, rows)]
    if res["dp_noise"]:
        lines += ["", "## Central DP (every device every round)\n",
                  *dp_table(res)]
    return "\n".join(lines) + "\n"


def kept(md: str | None) -> str:
    """The md's written part, from its ``## Findings`` on (kept when the tables are)."""
    text = Path(md).read_text() if md and Path(md).exists() else ""
    at = text.find("\n## Findings")
    return text[at:] if at >= 0 else ""
