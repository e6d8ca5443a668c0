"""Server side of the field loop: a ``ServeJob`` run with a broker, the aggregator, evaluation.

The aggregator (broker_server) works on numpy weights; this module bridges it
to torch checkpoints: the initial weights and config come from a checkpoint,
the global model is evaluated with torch each round, and the final model is
saved as a checkpoint again.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from device_runtime.notice import Notice
from toolkit.console import RoundProgress
from toolkit.strategies.robust import round_note as robust_note
from toolkit.errors import UsageError
from toolkit.field import root_data, scaleout
from toolkit.field.jobs import BrokerSettings, ServeJob
from toolkit.field.summary import publish_summaries


@contextlib.contextmanager
def broker_url(url: str | None, log_file: Path | None = None) -> Iterator[str]:
    """``url`` itself, or the URL of an embedded broker started for the duration (its
    own warnings and errors into ``log_file`` if given, else on the console)."""
    if url:
        yield url
        return
    from broker_server.embedded import EmbeddedBroker

    with EmbeddedBroker(log_file=str(log_file) if log_file else None) as b:
        yield b.url


def evaluator(ckpt, x: np.ndarray, y: np.ndarray) -> Callable[[dict], float]:
    """Test accuracy of numpy weights, computed with the checkpoint's torch model."""
    import copy

    from device_runtime.training.local import load_weights
    from toolkit.model.train import accuracy

    model = copy.deepcopy(ckpt.model)

    def evaluate(weights: dict) -> float:
        load_weights(model, weights)
        return round(accuracy(model, x, y), 4)
    return evaluate


def server_data(ckpt, path: str | Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(public inputs, x_test, y_test): from ``path`` (``fedge partition``'s server.npz:
    the public split as x, y and the test set), else from the checkpoint's dataset
    (the public split ``fedge partition --seed 0`` draws)."""
    from toolkit.model import datasets
    from toolkit.model.partition import public_split

    if path:
        ds = datasets.load_npz(path)
        return ds.x_train, ds.x_test, ds.y_test
    if ckpt.dataset is None:
        raise UsageError("--eval-data: the checkpoint records no dataset; give a .npz")
    ds = datasets.load(ckpt.dataset)
    pub, _ = public_split(len(ds.y_train), 0.1, 0)
    return ds.x_train[pub], ds.x_test, ds.y_test


def run_serve(job: ServeJob, on_round: Callable[[dict], None] | None = None) -> int:
    """Serve ``job`` to the end: the final model goes to ``state_dir/final.safetensors``."""
    from broker_server.downlink import check_downlink
    from broker_server.service import Aggregator
    from device_runtime import codecs
    from device_runtime.local_models import LocalModels
    from device_runtime.training.local import weights_of
    from device_runtime.transport.mqtt import MqttTransport
    from toolkit.field.fleet_keys import server_trust
    from toolkit.model import checkpoint
    from toolkit.planning.profiles import ProfileCatalogue
    from toolkit.strategies.setups import check_strategy, setup_strategy

    fold_options = scaleout.check_job(job) if job.scale_out else None
    creds = _credentials(job.broker)
    check_strategy(job.strategy)
    codecs.get(job.codec)
    check_downlink(job.downlink, job.strategy)
    fleet = ProfileCatalogue.load(job.profiles_file).select(job.profiles)
    allowed = LocalModels.parse(job.custom_models)  # the only factories it may name
    ckpt = checkpoint.load(job.checkpoint, allowed)
    public_x, x, y = _central(job, ckpt)
    cfg, strategy_options = setup_strategy(
        job.strategy, ckpt.config, fleet, public_x, job.codec, job.strategy_options,
        ckpt.model, allowed)
    if cfg != ckpt.config:  # e.g. SplitMix bases of the checkpoint's architecture
        from toolkit.model import zoo

        print(f"{job.strategy}: training a fresh {cfg.arch} model of the checkpoint's "
              f"{ckpt.config.arch}", flush=True)
        ckpt = checkpoint.Checkpoint(cfg, zoo.build_model(cfg, allowed), dataset=ckpt.dataset)
    weights = weights_of(ckpt.model)
    root = _root(job, ckpt)
    if fold_options is not None:
        scaleout.check_size(job.codec, {k: v.shape for k, v in weights.items()},
                            job.broker.max_payload)
    b = job.broker
    trust = server_trust(job.job, job.state_dir, b.signing_key, b.registry, b.credentials)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s aggregator %(message)s")
    with broker_url(b.url) as url:
        t = MqttTransport(url, f"fedge-{job.job}-aggregator", persistent=True,
                          max_payload=b.max_payload, **creds)
        t.connect()
        if on_round is None:
            print(f"aggregator of job {job.job} connected to {url}: {job.rounds.rounds} "
                  f"rounds, quorum {job.rounds.min_devices}", flush=True)
        scale, sup = scaleout.start(job, t, url, fold_options, trust) \
            if fold_options is not None else (None, None)
        progress = None if on_round else RoundProgress(job.rounds.rounds,
                                                        extra=round_extra)
        try:
            agg = Aggregator(t, _serve_options(job, strategy_options), ckpt.config.to_json(),
                             weights, evaluator(ckpt, x, y) if x is not None else None,
                             on_round or progress,
                             scale_out=scale, trust=trust)
            if root is not None:
                root_data.attach(agg, root)
            agg.notice = Notice(progress.note if progress else _say)
            publish_summaries(agg, agg.on_round)  # for fedge dashboard (read-only)
            if sup:
                agg.watch = sup.check  # a worker that exits mid-job is started again
            report = agg.run()
            if scale:
                scale.finish()  # the workers stop on it
                report["scale_out"] = dict(scale.report(), restarts=sup.restarts)
        finally:
            if progress:
                progress.close()
            if sup:  # after a failure, at once
                sup.stop(10.0 if scale.work and scale.work.state == "done" else 0.0)
            t.close()
    report["broker"] = url
    _save(job, ckpt, agg.weights, report)
    print(f"done: {len(report['rounds'])} rounds, final accuracy {report['final_accuracy']}")
    return 0


def _say(text: str) -> None:
    print(text, flush=True)


def _root(job: ServeJob, ckpt):
    """``--root-data`` as the aggregator's RootData (None without), checked up front."""
    if job.root_data is None:
        return None
    if job.scale_out is not None:
        raise UsageError("--root-data: expected without --workers (zeno and fltrust need "
                         "every update on the aggregator), got both")
    from device_runtime.training.local import LocalTrainOptions

    r = job.rounds  # the server trains on it as the devices do (fltrust)
    train = LocalTrainOptions(epochs=r.epochs, batch_size=r.batch_size, lr=r.lr)
    return root_data.RootData(ckpt.model, *root_data.load_root(job.root_data), train)


def _central(job: ServeJob, ckpt) -> tuple:
    """``server_data``, or three Nones with --eval-every and neither --eval-data nor a
    dataset the checkpoint names (the devices' evaluation is then the only one)."""
    if job.eval_data is None and ckpt.dataset is None and job.evaluation.every:
        return None, None, None
    return server_data(ckpt, job.eval_data)


def _serve_options(job: ServeJob, strategy_options: object):
    from broker_server.service import ServeOptions

    r = job.rounds
    return ServeOptions(job.job, job.state_dir, job.strategy, job.codec, r.rounds,
                        r.min_devices, r.round_timeout, r.epochs, r.batch_size, r.lr,
                        strategy_options=strategy_options, downlink=job.downlink,
                        max_samples=job.guard.max_samples, norm_bound=job.guard.norm_bound,
                        eval_every=job.evaluation.every, holdout=job.evaluation.holdout)


def _save(job: ServeJob, ckpt, weights: dict, report: dict) -> None:
    """The final model as a checkpoint in the state dir, and the report where --json says."""
    from device_runtime.training.local import load_weights
    from toolkit.model import checkpoint

    load_weights(ckpt.model, weights)
    ckpt.metrics = {"test_accuracy": report["final_accuracy"], "rounds": job.rounds.rounds,
                    "strategy": job.strategy, "codec": job.codec}
    checkpoint.save(ckpt, job.state_dir / "final.safetensors")
    if job.report:
        job.report.parent.mkdir(parents=True, exist_ok=True)
        job.report.write_text(json.dumps(report, indent=1))


def _credentials(broker: BrokerSettings) -> dict:
    """The aggregator's ``--credentials`` as MqttTransport arguments (``{}`` without)."""
    from device_runtime.credentials import transport_kwargs

    creds = transport_kwargs(broker.credentials)
    if creds and creds["username"] != "aggregator":
        logging.getLogger(__name__).warning(
            "--credentials are for %r: under fedge secure init's ACL only 'aggregator' "
            "may publish plans, models and tasks", creds["username"])
    return creds



def round_extra(rec: dict) -> str:
    """The round line's notes: the robust rule's, and the devices' own evaluation."""
    notes = [robust_note(rec)]
    if "device_eval" in rec:
        notes.append(eval_line(rec["device_eval"]))
    return "  ".join(filter(None, notes))


def eval_line(ev: dict) -> str:
    """One line of a round's evaluation on the devices (``device_eval``)."""
    spread = ev["spread"]
    if not spread:
        return f"on devices: no scores ({ev['devices_reporting']} of {ev['devices_assigned']})"
    profiles = " ".join(f"{p} {v['accuracy']}" for p, v in ev["by_profile"].items()
                        if v["accuracy"] is not None)
    return (f"on devices: accuracy {ev['accuracy']} loss {ev['loss']} over {ev['samples']} "
            f"samples, {ev['devices_reporting']}/{ev['devices_assigned']} devices, spread "
            f"{spread['min']}..{spread['max']} (std {spread['std']}); {profiles}")
