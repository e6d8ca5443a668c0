"""README.md and docs/deploy.md's quick start, run as written (issue 27): a command in
them that fails is a failing test.

What runs: every ```sh block of README.md, then those of docs/deploy.md before its
first "## " heading (the quick start), in order, each document in a temp folder of its
own (its "clone": deploy.md's gets the README's ``runs/cnn.safetensors`` by a link, the
one input it takes from there). ``HOME`` and ``FEDGE_HOME`` (``HOME/.fedge``) are in the
temp folder, so ``~/.fedge/signing.pub`` is the run's key and nothing touches the real
home; ``PYTHONPATH`` is the repository and ``PATH`` starts with this interpreter's bin
folder (``python``, ``fedge``). The only broker outside the README's own is a private
Mosquitto on a free port; nothing uses the network.

The conventions are plain shell, which a reader follows anyway, and one HTML comment,
which GitHub does not show:
- A command ends at a line that does not end in ``\\``; blank and comment lines are none.
- ``CMD &`` runs in the background, as in a shell; ``wait`` waits for the block's
  background commands. A background command must exit 0 whenever it exits; those still
  running when their document ends (a broker, a serve waiting for devices) are stopped.
- ``<!-- readme-test: skip: REASON -->`` on the line before a block: the block is not run
  (it needs what a test machine has not, e.g. a Pi with systemd). The skipped blocks must
  be exactly SKIPPED_BLOCKS, so a new block is run unless someone says why not.

The changes made to a command before it runs are exactly SUBSTITUTIONS (each with its
reason) and SKIPPED_COMMANDS; every rule must apply somewhere, so a stale one fails.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker_server.embedded import free_port
from testkit import ROOT
from testkit.brokers import mosquitto_binary
from testkit.timing import scaled

DOCS = ("README.md", "docs/deploy.md")  # run in this order
SKIP_MARK = re.compile(r"<!-- readme-test: skip: (.+?) -->\s*$")
FENCE = re.compile(r"^```sh\n(.*?)^```", re.M | re.S)

# (document, its first command's first line): blocks a test machine cannot run
SKIPPED_BLOCKS = {
    ("README.md", "fedge wheelhouse --out .wheelhouse && python -m pytest -q"),
    ("docs/deploy.md", "tar xzf pi-01.tar.gz && sudo fedge-pi-01/install.sh --fingerprint "
                       "82f1cdf7...  # first install"),
}


@dataclass(frozen=True)
class Sub:
    pattern: str  # a regex over the whole command (re.M)
    replacement: str  # {mqtt}, {tls}, {agg}: the test's ports
    reason: str


SUBSTITUTIONS = (
    Sub(r'^pip install -e "\.\[dev\]" && ', "",
        "installed already (CI installs exactly so, .ci/run); no network at test time"),
    Sub(r"^fedge demo$", "fedge demo --rounds 2 --devices 4",
        "a minute quiet; 2 rounds of 4 device processes (each imports torch) print the "
        "same table, report and plot"),
    Sub(r"--rounds \d+", "--rounds 2", "time: every round runs the same code"),
    Sub(r"^fedge pretrain ", "fedge pretrain --epochs 2 ",
        "30 epochs take minutes; 2 make a checkpoint the rest can use"),
    Sub(r"^fedge export ", "fedge export --finetune-epochs 1 ",
        "time: the pruned profiles' fine-tune, 5 epochs each by default"),
    Sub(r"mnist1d:50000", "mnist1d:5000",
        "generating 50,000 samples takes ~10 s; 5,000 still give each shard its batches"),
    Sub(r"mqtt://broker:1883", "mqtt://127.0.0.1:{mqtt}",
        "'broker' is the reader's Mosquitto: here the test's private one"),
    Sub(r"^fedge secure init --devices ", "fedge secure init --port {tls} "
        "--aggregator-port {agg} --devices ",
        "free ports for the TLS broker's listeners instead of 8883/8884 (a shared machine)"),
    Sub(r"broker\.lan:8883", "127.0.0.1:{tls}",
        "the devices' TLS listener on its free port; 127.0.0.1 is in the certificate"),
    Sub(r"broker\.lan:8884", "127.0.0.1:{agg}", "the aggregator's TLS listener, likewise"),
    Sub(r" \\?\s*--pin-wheels wh-rpi", "",
        "its wheelhouse is the download skipped below (tests/test_bundle.py pins wheels)"),
)
# (regex, reason): commands not run at all
SKIPPED_COMMANDS = (
    (r"^fedge wheelhouse ", "downloads wheels from PyPI (network)"),
)


@dataclass
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    commands: list[str]
    skip: str | None = None

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def split_commands(body: str) -> list[str]:
    """The commands of a block: lines joined over a trailing backslash (kept, for bash),
    without blank and comment-only lines."""
    out, cur = [], []
    for line in body.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur.append(line)
        if not line.endswith("\\"):
            out.append("\n".join(cur))
            cur = []
    assert not cur, f"a block ends in a continuation: {cur}"
    return out


def doc_blocks(doc: str) -> list[Block]:
    text = (ROOT / doc).read_text()
    if doc != "README.md":  # a doc's quick start: what comes before its first section
        text = text.split("\n## ", 1)[0]
    blocks = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP_MARK.search(before)
        blocks.append(Block(doc, text[:m.start()].count("\n") + 1,
                            split_commands(m.group(1)), skip.group(1) if skip else None))
    return blocks



def code_of(cmd: str) -> tuple[str, bool]:
    """The command without a trailing comment, and whether it ends in ``&``."""
    code = cmd
    for m in re.finditer(r"\s#", cmd):  # a comment starts outside quotes
        head = cmd[:m.start()]
        if head.count("'") % 2 == 0 and head.count('"') % 2 == 0:
            code = head
            break
    code = code.rstrip()
    background = code.endswith("&") and not code.endswith("&&")
    return (code[:-1].rstrip() if background else code), background


def rewrite(cmd: str, ports: dict, used: set) -> str | None:
    """The command as the test runs it (None: skipped); ``used`` collects the rules."""
    for pattern, _ in SKIPPED_COMMANDS:
        if re.search(pattern, cmd, re.M):
            used.add(pattern)
            return None
    for s in SUBSTITUTIONS:
        new = re.sub(s.pattern, s.replacement.format(**ports), cmd, flags=re.M)
        if new != cmd:
            used.add(s.pattern)
        cmd = new
    return cmd


def all_rules() -> set[str]:
    return {s.pattern for s in SUBSTITUTIONS} | {p for p, _ in SKIPPED_COMMANDS}


def test_every_block_is_run_or_skipped_as_listed_and_every_rule_applies():
    """Quick tier: the documents parse, the skipped blocks are the listed ones, and
    every substitution still matches a command (so the table cannot go stale)."""
    skipped, used = set(), set()
    ports = {"mqtt": 1, "tls": 2, "agg": 3}
    for doc in DOCS:
        blocks = doc_blocks(doc)
        assert blocks, doc
        for b in blocks:
            assert b.commands, b.where()
            if b.skip:
                skipped.add((doc, b.commands[0].split("\n")[0]))
                continue
            for cmd in b.commands:
                rewrite(code_of(cmd)[0], ports, used)
    assert skipped == SKIPPED_BLOCKS
    assert used == all_rules(), sorted(all_rules() - used)


# --- running them ----------------------------------------------------------------------


@dataclass
class Job:
    block: Block
    cmd: str  # as run
    proc: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.monotonic)


def _tail(path: Path, n: int = 25) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    text = text.replace("\r", "\n")  # progress lines
    return "\n".join("    " + line for line in text.strip().splitlines()[-n:])


class Runner:
    """Runs commands with bash in ``cwd``; keeps the background ones (process groups of
    their own, so that stopping one stops its children)."""

    def __init__(self, cwd: Path, env: dict, logs: Path):
        self.cwd, self.env, self.logs = cwd, env, logs
        self.background: list[Job] = []
        self.count = 0

    def _spawn(self, block: Block, cmd: str) -> Job:
        self.count += 1
        log = self.logs / f"{self.count:03d}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd], cwd=self.cwd,
                                    env=self.env, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return Job(block, cmd, proc, log)

    def fail(self, job: Job, what: str) -> None:
        others = "\n".join(f"  [{'running' if j.proc.poll() is None else j.proc.returncode}] "
                           f"{j.cmd.splitlines()[0]}" for j in self.background if j is not job)
        pytest.fail(f"{job.block.where()}: {what}\n  command: {job.cmd}\n"
                    f"  output (tail):\n{_tail(job.log)}\n"
                    f"  background commands:\n{others or '  none'}", pytrace=False)

    def check_background(self) -> None:
        for j in self.background:
            if j.proc.poll() not in (None, 0):
                self.fail(j, f"background command exited {j.proc.returncode}")

    def run(self, block: Block, cmd: str, background: bool) -> None:
        job = self._spawn(block, cmd)
        if background:
            self.background.append(job)
            return
        deadline = time.monotonic() + scaled(600)
        while job.proc.poll() is None:
            if time.monotonic() > deadline:
                self._stop(job)
                self.fail(job, f"still running after {scaled(600):.0f} s")
            try:
                self.check_background()  # a dead serve would leave a device waiting
            except BaseException:
                self._stop(job)
                raise
            time.sleep(0.2)
        if job.proc.returncode != 0:
            self.fail(job, f"exit {job.proc.returncode} after "
                           f"{time.monotonic() - job.started:.1f} s")

    def wait(self, block: Block) -> None:
        """``wait``: the block's background commands, each to exit 0."""
        for j in [j for j in self.background if j.block is block]:
            try:
                j.proc.wait(scaled(600))
            except subprocess.TimeoutExpired:
                self.fail(j, f"wait: still running after {scaled(600):.0f} s")
            if j.proc.returncode != 0:
                self.fail(j, f"exit {j.proc.returncode} (wait)")
            self.background.remove(j)

    @staticmethod
    def _stop(job: Job) -> None:
        if job.proc.poll() is not None:
            return
        os.killpg(job.proc.pid, signal.SIGTERM)
        try:
            job.proc.wait(scaled(15))
        except subprocess.TimeoutExpired:
            os.killpg(job.proc.pid, signal.SIGKILL)
            job.proc.wait()

    def settle(self) -> None:
        """Before a document's end: each background command still running has said
        something (a serve started last has connected, or failed), within limits."""
        deadline = time.monotonic() + scaled(60)
        for j in self.background:
            while (j.proc.poll() is None and time.monotonic() < deadline
                   and not (j.log.exists() and j.log.stat().st_size)):
                time.sleep(0.2)
        time.sleep(1.0)  # what it says first may be followed by its failure
        self.check_background()

    def stop_all(self, check: bool = True) -> None:
        """The end of a document: background commands still running are stopped; one
        that had exited must have exited 0 (``check``)."""
        if check:
            self.settle()
        for j in reversed(self.background):  # the broker last: its clients go first
            self._stop(j)
        self.background = []


def _env(home: Path) -> dict:
    home.mkdir(parents=True)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return dict(os.environ, HOME=str(home), FEDGE_HOME=str(home / ".fedge"),
                PYTHONPATH=str(ROOT), PATH=path)


def _ports(mqtt: int) -> dict:
    tls = free_port()
    agg = free_port()
    while agg in (tls, mqtt):
        agg = free_port()
    return {"mqtt": mqtt, "tls": tls, "agg": agg}


def run_doc(doc: str, runner: Runner, ports: dict, used: set) -> list[tuple[str, float]]:
    """Every block of ``doc`` in order; the seconds each took."""
    times = []
    for block in doc_blocks(doc):
        if block.skip:
            continue
        t0 = time.monotonic()
        for cmd in block.commands:
            code, background = code_of(cmd)
            code = rewrite(code, ports, used)
            if code is None:
                continue
            if code == "wait":
                runner.wait(block)
            else:
                runner.run(block, code, background)
        runner.check_background()
        times.append((block.where(), time.monotonic() - t0))
    runner.stop_all()
    return times


@pytest.mark.slow
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
def test_the_readme_runs_as_written(tmp_path, mosquitto, capsys):
    env = _env(tmp_path / "home")
    ports, used, times = _ports(mosquitto.port), set(), []
    t0 = time.monotonic()
    for doc in DOCS:
        cwd = tmp_path / Path(doc).stem
        (cwd / "logs").mkdir(parents=True)
        if doc != "README.md":  # the checkpoint README's fedge pretrain wrote
            (cwd / "runs").mkdir()
            (cwd / "runs" / "cnn.safetensors").symlink_to(
                tmp_path / "README" / "runs" / "cnn.safetensors")
        runner = Runner(cwd, env, cwd / "logs")
        try:
            times += run_doc(doc, runner, ports, used)
        finally:
            runner.stop_all(check=False)
    total = time.monotonic() - t0
    lines = [f"README test: {total:.0f} s (load {os.getloadavg()[0]:.1f})"]
    lines += [f"  {where:<22} {sec:6.1f} s" for where, sec in times]
    with capsys.disabled():  # the run time, in CI's log too
        print("\n" + "\n".join(lines))
    assert used == all_rules(), sorted(all_rules() - used)
