"""One device process of ``fedge simulate --procs K``: many device agents, one MQTT
client each, in one light process.

``python -m toolkit.sim.simworker SPEC.json RESULT.json``. The spec is plain JSON
written by ``toolkit.sim.simfleet`` (job, broker URL, the training set's ``.npy`` files,
and per device its id, profile and the indices of its samples in them). The main
process writes the training set once as plain ``.npy`` (read here memory-mapped,
without pickle), rather than each worker generating MNIST-1D again (2 s of CPU
each). When the job's ``control`` says stop, every agent's ``history`` goes back
as JSON in RESULT.json. An agent that raises ends the process at once with a
non-zero code, so the main process sees a dead worker instead of waiting for that
device forever.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

# Network-loop wait of each client: see MqttTransport.loop_timeout. Every wake-up of
# hundreds of threads costs a GIL hand-off; a publish wakes the loop anyway, and the
# keepalive needs a pass only every KEEPALIVE seconds.
LOOP_TIMEOUT = 5.0
# Hundreds of clients share one core here, so a network thread can wait seconds for the
# GIL; the usual 15 s would have the broker drop healthy devices (the first 1,000-device
# run lost 2,000 connections that way, and every reconnect re-announced, re-sent a task).
KEEPALIVE = 60
# One agent of a process handles a task at a time (fetching or rebuilding the model,
# training, coding the update). That work holds the GIL anyway; with all 250 agents of
# a process runnable at a round's start, CPython's GIL hand-offs between hundreds of
# threads cost more than the work itself (docs/operations.md, Scale). Reentrant: while an
# agent waits for its model frame it handles other messages, a resent task among them.
_TURN = threading.RLock()


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one; returns the limit in force.

    Each paho client holds three descriptors (its socket and a wake-up socket pair):
    300 clients need 900, close to the usual soft limit of 1024; the main process
    and the Mosquitto it may start need one per connection too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            pass
    return soft


def _agents(spec: dict) -> list:
    from device_runtime.agent import AgentOptions, status_will
    from device_runtime.keys import device_keys
    from device_runtime.local_models import LocalModels
    from device_runtime.topics import Topics
    from device_runtime.transport.mqtt import MqttTransport

    x = np.load(spec["x"], mmap_mode="r", allow_pickle=False)
    y = np.load(spec["y"], mmap_mode="r", allow_pickle=False)
    topics, job = Topics(spec["job"]), spec["job"]
    agent_class = _paced_agent()
    agents, allowed = [], LocalModels.parse(spec.get("allow_custom_model"))
    for d in spec["devices"]:
        key, server_key = device_keys(spec["keys"], d["id"])
        t = MqttTransport(spec["broker"], f"{job}-{d['id']}",
                          will=status_will(topics, d["id"], key),
                          keepalive=KEEPALIVE, loop_timeout=LOOP_TIMEOUT)
        t.connect()
        idx = np.asarray(d["index"], dtype=np.int64)
        agents.append(agent_class(t, AgentOptions(job, d["id"], d["profile"], key=key,
                                                  server_key=server_key,
                                                  custom_models=allowed),
                                  np.array(x[idx]), np.array(y[idx])))
    return agents


def _paced_agent():
    """DeviceAgent that handles a task only in its turn (``_TURN``)."""
    from device_runtime.agent import DeviceAgent

    class PacedAgent(DeviceAgent):
        def _on_task(self, *args) -> None:
            with _TURN:
                super()._on_task(*args)
    return PacedAgent


def _run_agent(agent, failed: list) -> None:
    try:
        agent.run()
    except BaseException:  # noqa: BLE001 (any failure must end the process, loudly)
        failed.append(agent.device)
        sys.stderr.write(f"device {agent.device} crashed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(3)  # other threads would keep the process (and the round) waiting


def run(spec: dict, result: Path) -> None:
    """Run the spec's devices until the job stops; write their histories to ``result``."""
    import torch

    torch.set_num_threads(1)  # hundreds of agents share one core; no intra-op threads
    raise_fd_limit()
    parent = os.getppid()
    agents = _agents(spec)
    failed: list[str] = []
    threads = [threading.Thread(target=_run_agent, args=(a, failed), daemon=True,
                                name=a.device) for a in agents]
    for th in threads:
        th.start()
    for th in threads:
        while th.is_alive():
            th.join(timeout=1.0)
            if os.getppid() != parent:  # the main process is gone: nobody will stop us
                sys.stderr.write("the simulation's main process is gone; exiting\n")
                os._exit(4)
    for a in agents:
        a.t.close(flush_timeout=2.0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"devices": [{"id": a.device, "samples": int(len(a.y)), "history": a.history}
                       for a in agents],
           "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
           "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "pid": os.getpid(),
           "finished": time.time()}
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(result)  # the main process reads only a whole file


def main(argv: list[str]) -> None:
    spec_path, result = argv
    run(json.loads(Path(spec_path).read_text()), Path(result))
    sys.stderr.flush()
    # The result is written and every client closed: skip the interpreter's teardown
    # (torch's exit handlers alone took seconds), which the main process waits for.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
