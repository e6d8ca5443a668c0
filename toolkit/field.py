"""Server side of the field loop for the CLI: the broker, the aggregator, evaluation.

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

from toolkit import scaleout
from toolkit.errors import UsageError


@contextlib.contextmanager
def broker_url(url: str | None) -> Iterator[str]:
    """``url`` itself, or the URL of an embedded broker started for the duration."""
    if url:
        yield url
        return
    from broker_server.embedded import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b.url


def evaluator(ckpt, x: np.ndarray, y: np.ndarray) -> Callable[[dict], float]:
    """Test accuracy of numpy weights, computed with the checkpoint's torch model."""
    import copy

    from device_runtime.training.local import load_weights
    from toolkit.train import accuracy

    model = copy.deepcopy(ckpt.model)

    def evaluate(weights: dict) -> float:
        load_weights(model, weights)
        return round(accuracy(model, x, y), 4)
    return evaluate


def server_data(ckpt, path: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(public inputs, x_test, y_test): from ``path`` (``fedge partition``'s server.npz:
    the public split as x, y and the test set), else from the checkpoint's dataset
    (the public split ``fedge partition --seed 0`` draws)."""
    from toolkit import datasets
    from toolkit.partition import public_split

    if path:
        ds = datasets.load_npz(path)
        return ds.x_train, ds.x_test, ds.y_test
    if ckpt.dataset is None:
        raise UsageError("--eval-data: the checkpoint records no dataset; give a .npz")
    ds = datasets.load(ckpt.dataset)
    pub, _ = public_split(len(ds.y_train), 0.1, 0)
    return ds.x_train[pub], ds.x_test, ds.y_test


def _check(args) -> None:
    for name in ("rounds", "min_devices", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected >= 1, got "
                             f"{getattr(args, name)}")
    for name in ("round_timeout", "lr"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')}: expected > 0, got "
                             f"{getattr(args, name)}")
    if getattr(args, "max_samples", 1) < 1:
        raise UsageError(f"--max-samples: expected >= 1, got {args.max_samples}")
    if not getattr(args, "norm_bound", 1.0) >= 1.0:  # NaN too
        raise UsageError(f"--norm-bound: expected a factor >= 1 (or inf), got "
                         f"{args.norm_bound}")


def _guard_options(args) -> dict:
    """``--max-samples`` and ``--norm-bound`` (fedge demo has neither: the defaults)."""
    return {k: getattr(args, k) for k in ("max_samples", "norm_bound") if hasattr(args, k)}


def run_serve(args, on_round: Callable[[dict], None] | None = None,
              broker: str | None = None) -> int:
    from broker_server.downlink import check_downlink
    from broker_server.service import Aggregator, ServeOptions
    from device_runtime import codecs
    from device_runtime.topics import check_id
    from device_runtime.training.local import weights_of
    from device_runtime.transport.mqtt import MqttTransport
    from toolkit import checkpoint
    from toolkit.cli import strategy_args
    from toolkit.cli.model_cmds import local_models
    from toolkit.fleet_keys import server_trust
    from toolkit.profiles import ProfileCatalogue
    from toolkit.setups import check_strategy, setup_strategy

    _check(args)
    check_id("job", args.job)
    workers = getattr(args, "workers", None)  # fedge demo's arguments have none
    fold_options = scaleout.check_args(args, broker or args.broker) if workers is not None \
        else None
    creds = _credentials(args, broker or args.broker)
    check_strategy(args.strategy)
    codecs.get(args.codec)
    check_downlink(args.downlink, args.strategy)
    cat = ProfileCatalogue.load(args.profiles_file)
    fleet = cat.select(args.profiles)
    allowed = local_models(args)  # the only custom factories the checkpoint may name
    ckpt = checkpoint.load(args.checkpoint, allowed)
    public_x, x, y = server_data(ckpt, args.eval_data)
    cfg, strategy_options = setup_strategy(
        args.strategy, ckpt.config, fleet, public_x, args.codec,
        strategy_args.options(args, cat, [p.name for p in fleet]), ckpt.model, allowed)
    if cfg != ckpt.config:  # e.g. SplitMix bases of the checkpoint's architecture
        from toolkit import zoo

        print(f"{args.strategy}: training a fresh {cfg.arch} model of the checkpoint's "
              f"{ckpt.config.arch}", flush=True)
        ckpt = checkpoint.Checkpoint(cfg, zoo.build_model(cfg, allowed), dataset=ckpt.dataset)
    opts = ServeOptions(args.job, Path(args.state_dir), args.strategy, args.codec, args.rounds,
                        args.min_devices, args.round_timeout, args.epochs, args.batch_size,
                        args.lr, strategy_options=strategy_options,
                        downlink=args.downlink, **_guard_options(args))
    weights = weights_of(ckpt.model)
    if fold_options is not None:
        scaleout.check_size(args.codec, {k: v.shape for k, v in weights.items()},
                            args.max_payload)
    trust = server_trust(args.job, Path(args.state_dir), args.signing_key, args.registry,
                         getattr(args, "credentials", None))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s aggregator %(message)s")
    with broker_url(broker or args.broker) as url:
        t = MqttTransport(url, f"fedge-{args.job}-aggregator", persistent=True,
                          max_payload=args.max_payload, **creds)
        t.connect()
        scale, sup = scaleout.start(args, t, url, fold_options, trust) \
            if fold_options is not None \
            else (None, None)
        try:
            agg = Aggregator(t, opts, ckpt.config.to_json(), weights, evaluator(ckpt, x, y),
                             on_round or _print_round, scale_out=scale, trust=trust)
            if sup:
                agg.watch = sup.check  # a worker that exits mid-job is started again
            report = agg.run()
            if scale:
                scale.finish()  # the workers stop on it
                report["scale_out"] = dict(scale.report(), restarts=sup.restarts)
        finally:
            if sup:  # after a failure, at once
                sup.stop(10.0 if scale.work and scale.work.state == "done" else 0.0)
            t.close()
    report["broker"] = url
    from device_runtime.training.local import load_weights

    load_weights(ckpt.model, agg.weights)
    ckpt.metrics = {"test_accuracy": report["final_accuracy"], "rounds": args.rounds,
                    "strategy": args.strategy, "codec": args.codec}
    checkpoint.save(ckpt, Path(args.state_dir) / "final.safetensors")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"done: {len(report['rounds'])} rounds, final accuracy {report['final_accuracy']}")
    return 0


def _credentials(args, url: str | None) -> dict:
    """The aggregator's ``--credentials`` as MqttTransport arguments (``{}`` without)."""
    from device_runtime.credentials import transport_kwargs

    path = getattr(args, "credentials", None)  # fedge demo's arguments have none
    if path and not url:
        raise UsageError("--credentials needs --broker: the embedded broker has no TLS")
    creds = transport_kwargs(path)
    if creds and creds["username"] != "aggregator":
        logging.getLogger(__name__).warning(
            "--credentials are for %r: under fedge secure init's ACL only 'aggregator' "
            "may publish plans, models and tasks", creds["username"])
    return creds


def _print_round(rec: dict) -> None:
    print(f"round {rec['round']:3d}  accuracy {rec['accuracy']}  up {rec['uplink_bytes']:,} B  "
          f"down {rec['downlink_bytes']:,} B  devices {rec['devices_reporting']}", flush=True)
