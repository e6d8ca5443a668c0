"""The round records: appended to history.jsonl, the last few also in state.json
(broker_server/state.py). Closing a round must not rewrite every earlier record, and no
crash or power cut may lose one."""
from __future__ import annotations

import json

import numpy as np
import pytest

from broker_server.errors import BrokerServerError
from broker_server.state import HISTORY, RECENT, StateStore, read_history

W = {"w": np.arange(6, dtype=np.float32)}


def _record(r: int) -> dict:
    return {"round": r, "seconds": 0.1 * r, "updates": [[f"d{k}", "ab" * 32] for k in range(3)]}


def _run(tmp_path, rounds: int, store: StateStore | None = None) -> StateStore:
    store = store or StateStore(tmp_path, "job")
    st, _ = store.load()
    for r in range(st.completed + 1, st.completed + rounds + 1):
        st.completed = r
        st.history.append(_record(r))
        store.save_round(st, W)
    store.flush()
    return store


def test_state_json_stays_small_and_every_record_comes_back(tmp_path):
    _run(tmp_path, 3)
    small = (tmp_path / "state.json").stat().st_size
    _run(tmp_path, 40)
    state = json.loads((tmp_path / "state.json").read_text())
    assert "history" not in state and len(state["recent"]) == RECENT
    assert (tmp_path / "state.json").stat().st_size < small * 2  # not 14x: not every record
    lines = (tmp_path / HISTORY).read_text().splitlines()
    assert [json.loads(x) for x in lines] == [_record(r) for r in range(1, 44)]
    st, _ = StateStore(tmp_path, "job").load()
    assert st.completed == 43 and st.history == [_record(r) for r in range(1, 44)]
    assert read_history(tmp_path) == (st.history, True)


def test_a_record_appended_before_a_crash_that_state_json_never_named_is_dropped(tmp_path):
    _run(tmp_path, 6)
    with open(tmp_path / HISTORY, "ab") as f:  # round 7's line, then the kill
        f.write(json.dumps(_record(99)).encode() + b"\n" + b'{"round": 10')
    st, _ = StateStore(tmp_path, "job").load()
    assert st.history == [_record(r) for r in range(1, 7)]
    _run(tmp_path, 2)  # the resumed job's rounds follow round 6, not the stray line
    lines = [json.loads(x) for x in (tmp_path / HISTORY).read_text().splitlines()]
    assert lines == [_record(r) for r in range(1, 9)]


def test_a_power_cut_that_lost_the_last_lines_loses_no_record(tmp_path):
    _run(tmp_path, 10)
    lines = (tmp_path / HISTORY).read_bytes().splitlines(keepends=True)
    (tmp_path / HISTORY).write_bytes(b"".join(lines[:-RECENT]) + lines[-RECENT][:5])
    st, _ = StateStore(tmp_path, "job").load()
    assert st.history == [_record(r) for r in range(1, 11)]
    _run(tmp_path, 1)
    assert read_history(tmp_path) == ([_record(r) for r in range(1, 12)], True)


def test_a_history_shorter_than_state_json_names_is_refused_in_one_line(tmp_path):
    _run(tmp_path, 10)
    lines = (tmp_path / HISTORY).read_bytes().splitlines(keepends=True)
    (tmp_path / HISTORY).write_bytes(b"".join(lines[:2]))
    with pytest.raises(BrokerServerError, match=rf"state .*state.json is unreadable: "
                       rf"{HISTORY}: expected at least {10 - RECENT} round records, got 2"):
        StateStore(tmp_path, "job").load()


def test_a_state_dir_of_before_history_jsonl_is_read_and_moved_over(tmp_path):
    _run(tmp_path, 2)
    state = json.loads((tmp_path / "state.json").read_text())
    old = {k: v for k, v in state.items() if k not in ("history_records", "recent")}
    old["history"] = [_record(1), _record(2)]
    (tmp_path / "state.json").write_text(json.dumps(old))
    (tmp_path / HISTORY).unlink()
    st, _ = StateStore(tmp_path, "job").load()
    assert st.history == [_record(1), _record(2)]
    _run(tmp_path, 1)
    assert read_history(tmp_path) == ([_record(r) for r in range(1, 4)], True)
    assert "history" not in json.loads((tmp_path / "state.json").read_text())


def test_a_closed_rounds_files_go_without_holding_up_the_next_round(tmp_path, monkeypatch):
    """Closing round r removes its saved updates and the global model before it on the
    syncer's thread (unlinking 16 updates took 4 ms of every close): ``save_round``
    returns while the removal is held up, state.json already names the new model, and
    ``flush`` waits for the removal."""
    import threading

    from broker_server import syncer

    disk, real = threading.Event(), syncer.remove_paths
    # held up only when there is something to remove (every pass calls it)
    monkeypatch.setattr(syncer, "remove_paths",
                        lambda paths: (paths and disk.wait(60), real(paths)))
    store = _run(tmp_path, 1)
    st, _ = store.load()
    store.save_update(2, "d0", b"an update")
    st.completed = 2
    st.history.append(_record(2))
    done = threading.Thread(target=store.save_round, args=(st, W))
    done.start()
    done.join(30)
    assert not done.is_alive()  # returned while the folder's removal is held up
    assert json.loads((tmp_path / "state.json").read_text())["global_file"] == "global-2.fdg"
    assert (tmp_path / "round-2.log").exists() and not store.flush(timeout=0.2)
    disk.set()
    assert store.flush(timeout=60)
    assert not (tmp_path / "round-2.log").exists() and not (tmp_path / "global-1.fdg").exists()
    assert store.load()[0].completed == 2
