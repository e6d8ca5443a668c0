"""Scale-out for the toolkit: a ``ServeJob`` with ``scale_out`` is checked to split, N
``fedge worker`` processes are started and the aggregator gets a ``ScaleOut``;
``run_worker`` runs one worker (also on another machine, against the same broker).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from toolkit.errors import UsageError
from toolkit.field.jobs import ServeJob, WorkerJob

HEADER = 1024  # bytes an update frame's header may take beyond its tensors (+64 a tensor)


def check_job(job: ServeJob) -> dict:
    """Before anything is loaded: can the job's strategy and codec be split over workers?
    Returns the fold options the workers need."""
    from broker_server.scaleout import ScaleOutError, check_split

    try:
        return check_split(job.strategy, job.codec, job.strategy_options)
    except ScaleOutError as e:
        raise UsageError(str(e)) from None


def check_size(codec_name: str, shapes: dict, max_payload: int) -> None:
    """A frame over ``max_payload`` travels as chunks on sub-topics, and a shared
    subscription hands each chunk to any worker: refuse a job whose updates would."""
    from device_runtime import codecs

    spec = codecs.get(codec_name).wire_spec(shapes)
    size = HEADER + sum(64 + len(name) + _nbytes(t) for name, t in spec.items())
    if size > max_payload:
        raise UsageError(f"--workers: an update of this model with --codec {codec_name} is "
                         f"up to {size} bytes, over --max-payload {max_payload}: its chunks "
                         f"would reach different workers; raise --max-payload here and on "
                         f"every device, or use a smaller codec (fedmrn, sign)")


def _nbytes(spec) -> int:
    import numpy as np

    return int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize


def supervisor(job: ServeJob, url: str):
    """The job's local ``fedge worker`` processes (not yet started), logs and state under
    ``state_dir/workers/w<i>``."""
    from toolkit.field.supervisor import Supervisor

    b = job.broker
    cmds, logs = {}, {}
    for i in range(job.scale_out.workers):
        name, d = f"w{i}", job.state_dir / "workers" / f"w{i}"
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "toolkit", "worker", "--broker", url, "--job", job.job,
               "--id", name, "--state-dir", str(d), "--parent-pid", str(os.getpid())]
        if b.credentials:
            cmd += ["--credentials", b.credentials]
        for flag, value in (("--signing-key", b.signing_key), ("--registry", b.registry)):
            if value:  # else the credentials' (or the default key), as serve found them
                cmd += [flag, str(Path(value).resolve())]
        cmds[name], logs[name] = cmd, d / "worker.log"
    from device_runtime import threads

    return Supervisor(cmds, logs, env=threads.child_env(job.scale_out.workers + 1))


def start(job: ServeJob, transport, url: str, fold_options: dict, trust):
    """The aggregator's ScaleOut and the Supervisor of its worker processes, started."""
    from broker_server.coordinator import ScaleOut, ScaleOutOptions

    sup = supervisor(job, url)
    sup.start()
    scale = ScaleOut(transport, job.job, ScaleOutOptions(job.scale_out.workers, job.strategy,
                                                         job.codec, fold_options),
                     trust, alive=sup.check_started)
    return scale, sup


def run_worker(w: WorkerJob) -> int:
    """One worker of a scaled-out job, until the job ends (or its parent is gone)."""
    from broker_server.scaleout import check_worker_id, status
    from broker_server.workers import Worker, WorkerOptions
    from device_runtime.credentials import payload_limit, transport_kwargs
    from device_runtime.topics import Topics, check_id
    from device_runtime.transport.mqtt import MqttTransport
    from toolkit import strategies
    from toolkit.field.fleet_keys import server_trust

    strategies.register_rules()
    check_id("job", w.job)
    check_worker_id(w.worker)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {w.worker} %(message)s")
    trust = server_trust(w.job, None, w.signing_key, w.registry, w.credentials)
    will = (Topics(w.job).worker(w.worker, "status"),
            status(w.worker, "offline", trust.signer, w.job))
    t = MqttTransport(w.broker, f"fedge-{w.job}-worker-{w.worker}", persistent=True,
                      will=will, max_payload=payload_limit(None, w.credentials),
                      **transport_kwargs(w.credentials))
    t.connect()
    try:
        counts = Worker(t, WorkerOptions(w.job, w.worker, w.state_dir, w.idle_timeout,
                                         w.parent_pid), trust).run()
    finally:
        t.close()
    print(f"worker {w.worker}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0
