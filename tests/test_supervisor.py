"""fedge serve --workers keeps its worker processes running: one that exits mid-job is
started again after a backoff delay, one that keeps exiting ends the job naming its log,
and one that cannot come up before the first round is an error at once."""
from __future__ import annotations

import random
import sys

import pytest

from broker_server.errors import BrokerServerError
from device_runtime.backoff import Backoff
from toolkit.field.supervisor import Supervisor
from testkit.timing import scaled



class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _sup(tmp_path, code: str, clock: Clock, **kw) -> Supervisor:
    """One worker "w0" running ``code``; its runs are counted in tmp_path/runs."""
    count = f"open({str(tmp_path / 'runs')!r}, 'a').write('x');"
    sup = Supervisor({"w0": [sys.executable, "-c", count + code]},
                     {"w0": tmp_path / "w0.log"}, clock=clock, **kw)
    for s in sup.slots:
        s.backoff = Backoff(base=0.5, cap=4.0, rng=random.Random(0))
    return sup


def _runs(tmp_path) -> int:
    return len((tmp_path / "runs").read_text()) if (tmp_path / "runs").exists() else 0


def _exited(sup: Supervisor) -> None:
    for p in sup.procs:
        p.wait(scaled(30))


def test_a_worker_that_exits_is_started_again_after_its_delay(tmp_path):
    clock = Clock()
    sup = _sup(tmp_path, "import sys; sys.exit(7)", clock)
    sup.start()
    _exited(sup)
    sup.check()  # notices the exit: a restart is due within the backoff's first delay
    slot = sup.slots[0]
    assert slot.due is not None and 0 <= slot.due - clock.now <= 0.5
    assert sup.restarts == 1 and _runs(tmp_path) == 1
    clock.now = slot.due + 0.01
    sup.check()  # due: started again, same command
    _exited(sup)
    assert _runs(tmp_path) == 2 and slot.due is None


def test_a_worker_that_keeps_exiting_ends_the_job_naming_its_log(tmp_path):
    clock = Clock()
    sup = _sup(tmp_path, "import sys; sys.exit(7)", clock, max_restarts=2)
    sup.start()
    for _ in range(2):
        _exited(sup)
        sup.check()
        clock.now = sup.slots[0].due
        sup.check()
    _exited(sup)
    with pytest.raises(BrokerServerError, match=r"worker w0 exited 3 times in a row "
                                                r"\(last code 7\); see .*w0\.log"):
        sup.check()
    assert _runs(tmp_path) == 3


def test_a_worker_up_for_a_while_starts_its_count_and_backoff_over(tmp_path):
    clock = Clock()
    sup = _sup(tmp_path, "import time; time.sleep(60)", clock, max_restarts=1, stable=30)
    sup.start()
    slot = sup.slots[0]
    slot.in_a_row, slot.backoff.attempt = 1, 3  # as after a restart
    sup.check()
    assert slot.in_a_row == 1  # not up long enough yet
    clock.now += 31
    sup.check()
    assert slot.in_a_row == 0 and slot.backoff.attempt == 0
    sup.slots[0].proc.kill()
    _exited(sup)
    sup.check()  # one restart allowed again, not an error
    assert slot.due is not None
    sup.stop(0)


def test_a_worker_that_exits_before_the_first_round_is_an_error(tmp_path):
    sup = _sup(tmp_path, "import sys; sys.exit(2)", Clock())
    sup.start()
    _exited(sup)
    with pytest.raises(BrokerServerError, match=r"\(w0\) exited with code 2 before the "
                                                r"first round; see .*w0\.log"):
        sup.check_started()
