"""``bench/repeat.py``: a bench run twice is compared on every figure but its wall-clock
ones, and a figure that moves is named."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE = """
import json, sys, time
out = sys.argv[sys.argv.index("--json") + 1]
moving = "{moving}" == "yes"
json.dump({{"runs": {{"a": [{{"final_accuracy": time.time() if moving else 0.9,
                              "seconds": time.time(), "server_seconds": time.time()}}]}},
           "summary": {{"a": {{"seconds_to_target": 12.5,
                              "seconds_to_target_measured": time.time()}}}}}},
          open(out, "w"))
"""


def _repeat(tmp_path: Path, moving: str) -> subprocess.CompletedProcess:
    bench = tmp_path / "fake_bench.py"
    bench.write_text(FAKE.format(moving=moving))
    return subprocess.run([sys.executable, str(ROOT / "bench" / "repeat.py"), "--out",
                           str(tmp_path / "verdict.json"), "--", sys.executable, str(bench)],
                          capture_output=True, text=True, cwd=tmp_path)


def test_wall_clock_fields_do_not_count(tmp_path):
    p = _repeat(tmp_path, "no")
    assert p.returncode == 0, p.stdout + p.stderr
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["identical"] and verdict["digests"][0] == verdict["digests"][1]


def test_a_figure_that_moves_is_named(tmp_path):
    p = _repeat(tmp_path, "yes")
    assert p.returncode == 1
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert not verdict["identical"]
    assert [d.split(":")[0] for d in verdict["differences"]] == \
        [".runs.a[0].final_accuracy"]
