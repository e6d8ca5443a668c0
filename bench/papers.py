"""docs/results/papers.md: each seed paper's headline claim beside what fedge measures,
in the paper's mode (``--paper``, docs/ALGORITHMS.md "Paper modes") and in fedge's own,
with the ablations; medians over seeds 0-2, each row naming the command behind it.

    python bench/papers.py                 # run each bench whose JSON is missing, then write
    python bench/papers.py --report-only   # write the table from the JSON there is

Each bench writes its JSON to ``docs/results/papers/<bench>.json`` (the benches record
the code version they ran); a bench whose JSON exists is not run again (delete it to
re-run). A claim is marked reproduced, partly or not, with the reason in one line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "docs" / "results" / "papers"
SEEDS = "0,1,2"
BENCHES = {
    "split": ["bench/split.py", "--seeds", SEEDS, "--rounds", "20", "--arms",
              "fedavg,dpfl,ecofed-act8,ecofed-paper-act8"],
    "heterogeneous": ["bench/heterogeneous.py", "--seeds", SEEDS, "--rounds", "50", "--arms",
                      "splitmix,splitmix-paper,heterofl,reft,reft-average-only,"
                      "reft-distill-only,reft-paper,fedavg-common,fedavg-full"],
    "compression": ["bench/compression.py", "--seeds", SEEDS, "--arms",
                    "fedavg-fp32,fedavg-fedmrn,fedavg-fp32-wide,fedavg-fedmrn-wide,signsgd-mv,"
                    "signsgd-fv,signsgd-fv-paper,fedavg-fp32-50k,signsgd-mv-50k,"
                    "signsgd-fv-50k,signsgd-fv-paper-50k"],
}


def bench_command(name: str) -> list[str]:
    path = OUT / f"{name}.json"
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [*BENCHES[name], "--json", str(shown)]


def run_missing() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in BENCHES:
        if not (OUT / f"{name}.json").exists():
            print("running", " ".join(bench_command(name)), flush=True)
            subprocess.run([sys.executable, *bench_command(name)], cwd=ROOT, check=True)


def load(name: str) -> dict | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def final(res: dict | None, arm: str) -> float | None:
    """The median over seeds of ``arm``'s final accuracy (None: not run)."""
    runs = (res or {}).get("runs", {}).get(arm)
    return statistics.median(r["final_accuracy"] for r in runs) if runs else None


def pct(x: float | None) -> str:
    return "not run" if x is None else f"{100 * x:.1f}%"


# A row: paper, claim, paper mode, fedge mode, ablations, verdict, reason, bench.
Row = tuple[str, str, str, str, str, str, str, str]


def ecofed_row(res: dict | None) -> Row:
    from bench.split import summarize

    claim = ("up to 133x less traffic than classic FL and 16x less than vanilla DPFL at "
             "equal accuracy (VGG11, CIFAR-10)")
    if not res or "fedavg" not in res.get("runs", {}):
        return ("EcoFed", claim, "not run", "not run", "-", "not run", "no results", "split")
    arms = summarize(res["runs"], res["margin"])["arms"]

    def cell(arm: str) -> str:
        a = arms.get(arm)
        if a is None:
            return "not run"
        if a["bytes_to_target"] is None:
            return f"target not reached ({a['reached']}); final {pct(a['final_mean'])}"
        return (f"{a['traffic_ratio_vs_fedavg']}x less than FedAvg, "
                f"{a['traffic_ratio_vs_dpfl']}x less than dpfl; {a['seconds_to_target']} s "
                f"to target with the server counted ({a.get('seconds_to_target_measured')} s "
                f"as measured here; FedAvg {arms['fedavg']['seconds_to_target']} s); reached "
                f"{a['reached']}")
    paper, tuned = arms.get("ecofed-paper-act8"), arms.get("ecofed-act8")
    ratio = paper and paper["traffic_ratio_vs_fedavg"]
    if ratio and paper["reached"].startswith("3/"):
        verdict = "reproduced" if ratio >= 133 and paper["traffic_ratio_vs_dpfl"] >= 16 \
            else "partly"
        why = (f"paper mode reaches the target at {ratio}x less traffic than FedAvg (claimed "
               f"up to 133x, on a model with far more weights per activation)")
    else:
        verdict, why = "not", "paper mode does not reach FedAvg's accuracy in every seed"
    return ("EcoFed", claim, "act8: " + cell("ecofed-paper-act8"),
            "act8: " + cell("ecofed-act8"), f"fedge mode keeps >= 20x less than FedAvg: "
            f"{'yes' if tuned and (tuned['traffic_ratio_vs_fedavg'] or 0) >= 20 else 'no'}",
            verdict, why, "split")


def accuracy_row(paper: str, claim: str, res: dict | None, paper_arm: str, fedge_arm: str,
                 ref_arm: str, ablations: list[str], bench: str,
                 judge: Callable[[float, float], bool]) -> Row:
    """A claim that the paper's arm beats (``judge``) a reference arm in final accuracy."""
    p, f, ref = final(res, paper_arm), final(res, fedge_arm), final(res, ref_arm)
    abl = "; ".join(f"{a} {pct(final(res, a))}" for a in ablations) or "-"
    if p is None or ref is None:
        verdict, why = "not run", f"{paper_arm} or {ref_arm} has no results"
    elif judge(p, ref):
        verdict, why = "reproduced", f"{paper_arm} {pct(p)} against {ref_arm} {pct(ref)}"
    elif f is not None and judge(f, ref):
        verdict, why = "partly", (f"only fedge's mode: {fedge_arm} {pct(f)}, {paper_arm} "
                                  f"{pct(p)}, against {ref_arm} {pct(ref)}")
    else:
        verdict, why = "not", f"{paper_arm} {pct(p)} below {ref_arm} {pct(ref)}"
    return (paper, claim, f"{paper_arm} {pct(p)}", f"{fedge_arm} {pct(f)}",
            f"{ref_arm} {pct(ref)}; {abl}", verdict, why, bench)


def fedmrn_row(res: dict | None) -> Row:
    claim = "1-bit masks over seeded noise: about fp32 FedAvg's accuracy at 32x less uplink"
    rows = []
    for suffix in ("", "-wide"):
        mrn, fp = final(res, f"fedavg-fedmrn{suffix}"), final(res, f"fedavg-fp32{suffix}")
        ratio = (res or {}).get("summary", {}).get(f"fedavg-fedmrn{suffix}", {}).get(
            "ratio_to_fp32")
        rows.append((suffix or "-cnn", mrn, fp, ratio))
    gaps = [fp - mrn for _, mrn, fp, _ in rows if mrn is not None and fp is not None]
    cells = "; ".join(f"model{s}: {pct(m)} vs fp32 {pct(f)}, uplink {r}x smaller"
                      if m is not None else f"model{s}: not run" for s, m, f, r in rows)
    if not gaps:
        verdict, why = "not run", "no results"
    else:
        verdict = "reproduced" if max(gaps) <= 0.02 else "partly" if max(gaps) <= 0.05 \
            else "not"
        why = (f"largest gap to fp32 {100 * max(gaps):.1f} points; the uplink is 1 bit a "
               "weight, less than 32x smaller per frame where the model is small (headers, "
               "BatchNorm and biases in fp32)")
    return ("FedMRN", claim, cells + " (shared noise is fedge's documented choice; the paper "
            "draws it per client)", "same", "-", verdict, why, "compression")


def sign_row(res: dict | None) -> Row:
    claim = "federated voting beats majority vote when devices' batch sizes differ"
    pairs = [(s, final(res, f"signsgd-fv-paper{s}"), final(res, f"signsgd-fv{s}"),
              final(res, f"signsgd-mv{s}")) for s in ("", "-50k")]
    wins = [p > mv for _, p, _, mv in pairs if p is not None and mv is not None]
    cell = "; ".join(f"{'4k' if not s else '50k'}: FV {pct(p)}, MV {pct(mv)}"
                     for s, p, _, mv in pairs)
    fedge = "; ".join(f"{'4k' if not s else '50k'}: FV {pct(f)}" for s, _, f, _ in pairs)
    verdict = "not run" if not wins else "not" if not any(wins) else \
        "reproduced" if all(wins) else "partly"
    fedge_wins = [f > mv for _, _, f, mv in pairs if f is not None and mv is not None]
    why = (f"paper-mode FV above MV in {sum(wins)} of {len(wins)} data sizes (its 100 "
           f"warm-up rounds are majority votes, two thirds of a 150-round run); fedge's "
           f"estimator above MV in {sum(fedge_wins)} of {len(fedge_wins)}")
    return ("signSGD-FV", claim, cell, fedge, "-", verdict, why, "compression")


def rows() -> list[Row]:
    het, comp = load("heterogeneous"), load("compression")
    return [
        accuracy_row("SplitMix", "one federated ensemble serves any width at inference, "
                     "more accurate than HeteroFL's nested widths at the same budgets", het,
                     "splitmix-paper", "splitmix", "heterofl", ["fedavg-full"],
                     "heterogeneous", lambda a, b: a >= b),
        ecofed_row(load("split")),
        accuracy_row("REFT", "variable pruning with distillation trains a heterogeneous fleet "
                     "better than FedAvg with the smallest common model", het, "reft-paper",
                     "reft", "fedavg-common", ["reft-average-only", "reft-distill-only"],
                     "heterogeneous", lambda a, b: a >= b),
        fedmrn_row(comp),
        sign_row(comp),
    ]


def to_markdown(table: list[Row]) -> str:
    lines = ["# The seed papers: their claims beside fedge's measurements", "",
             "Generated by `python bench/papers.py` from the benches' JSON in "
             "docs/results/papers/ (medians over seeds " + SEEDS + "); paper mode is "
             "`--paper` (docs/ALGORITHMS.md, 'Paper modes'), fedge mode the defaults fedge "
             "ships. Code versions: " + ", ".join(
                 f"{n} {(load(n) or {}).get('code', 'not run')}" for n in BENCHES)
             + ". A bench whose arms ran in several invocations has its JSON joined from "
             "theirs (`--combine`); the JSON's `command` lists each.", "",
             "| paper | headline claim | paper mode | fedge mode | reference and ablations "
             "| verdict | why | command |", "|---|---|---|---|---|---|---|---|"]
    for paper, claim, pm, fm, abl, verdict, why, bench in table:
        cmd = " ".join(["python", *bench_command(bench)])
        lines.append(f"| {paper} | {claim} | {pm} | {fm} | {abl} | **{verdict}** | {why} | "
                     f"`{cmd}` |")
    missing = [f"{n}: {', '.join(arms)}" for n, arms in not_run().items() if arms]
    if missing:
        lines += ["", "Arms of the commands above with no results yet (each row says what "
                  "it lacks): " + "; ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def not_run() -> dict[str, list[str]]:
    """Per bench, the arms its command names that its JSON does not hold."""
    out = {}
    for name, argv in BENCHES.items():
        arms = argv[argv.index("--arms") + 1].split(",")
        have = (load(name) or {}).get("runs", {})
        out[name] = [a for a in arms if a not in have]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--md", default=str(ROOT / "docs" / "results" / "papers.md"))
    a = ap.parse_args()
    if not a.report_only:
        run_missing()
    Path(a.md).write_text(to_markdown(rows()))
    print("wrote", a.md)


if __name__ == "__main__":
    main()
