"""``fedge pretrain`` and ``fedge export``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="centralized training (EcoFed's public "
                       "pre-training and the centralized baseline)")
    p.add_argument("--dataset", required=True,
                   help="mnist1d, mnist1d:N (N samples), digits or a .npz file")
    p.add_argument("--model", default="cnn", help="cnn, cnn1d, cnn2d, cnn-wide or "
                   "module:callable (a custom nn.Module factory; commands that load the "
                   "checkpoint then need --allow-custom-model module:callable)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint file (.safetensors)")
    p.set_defaults(func=pretrain)

    p = sub.add_parser("export", help="per-device variants as verified ONNX artifacts")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--profiles", default="all", help="comma list of profiles, or all")
    p.add_argument("--profiles-file", help="TOML file adding or overriding profiles")
    p.add_argument("--dataset", help="calibration/test data (default: the checkpoint's)")
    p.add_argument("--out", required=True)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--split-after", type=int, default=None,
                   help="force the split point (stage boundary) for every device")
    p.add_argument("--min-macs-fraction", type=float, default=0.2)
    p.add_argument("--reference-gflops", type=float, default=None,
                   help="compute at which a device gets the full model "
                        "(default: the strongest device of the fleet)")
    p.add_argument("--no-int8", action="store_true")
    strict_int8_arg(p)
    version_args(p)
    signing_key_arg(p)
    allow_arg(p)
    p.set_defaults(func=export)


def allow_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-custom-model", action="append", metavar="MODULE:CALLABLE",
                   help="build this custom nn.Module factory when the checkpoint or job "
                   "names it (repeatable); with no kwargs, or exactly the JSON object after "
                   "'=' (module:callable={\"hidden\": 64}). Without it a model config from a "
                   "file or the network may name a zoo model only: a custom one names code")


def local_models(args: argparse.Namespace):
    """``--allow-custom-model`` as a ``LocalModels`` allowlist (empty without it)."""
    from device_runtime.local_models import LocalModels

    return LocalModels.parse(getattr(args, "allow_custom_model", None))


def version_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", help="the job the export is for (signed): a device running "
                   "another job refuses it")
    p.add_argument("--version", type=int, help="the export's version (signed; default: "
                   "the version in --out plus one, 1 for a new folder); devices refuse a "
                   "version older than one they accepted")


def signing_key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--signing-key", metavar="FILE", help="Ed25519 private key (PEM) that "
                   "signs manifest.json (default: $FEDGE_HOME/signing.key, FEDGE_HOME "
                   "defaulting to ~/.fedge); created if missing, its public key beside it")


def signing_key(args: argparse.Namespace):
    """The export's signing key (``toolkit.deploy.signing.SigningKey``), created if missing."""
    from toolkit.deploy.signing import ensure_key

    key = ensure_key(args.signing_key)
    if key.created:
        print(f"created signing key {key.path}; devices trust its public key "
              f"{key.public_path}", flush=True)
    return key


def _positive(name: str, value: float) -> None:
    from toolkit.errors import UsageError

    if value <= 0:
        raise UsageError(f"--{name}: expected > 0, got {value}")


def pretrain(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from toolkit.model import checkpoint, datasets, train, zoo

    for name in ("epochs", "batch_size", "lr", "width"):
        _positive(name.replace("_", "-"), getattr(args, name))
    spec = datasets.spec_for(args.dataset)
    zoo.check_name(args.model)
    ds = datasets.load(spec)
    cfg = zoo.make_config(args.model, ds.sample_shape, ds.num_classes, args.width,
                          float(np.mean(ds.x_train)), float(np.std(ds.x_train)) or 1.0)
    torch.manual_seed(args.seed)
    model = zoo.build_model(cfg, zoo.named_locally(args.model))
    t0 = time.time()
    opts = train.TrainOptions(args.epochs, args.batch_size, args.lr, seed=args.seed)
    train.train(model, ds.x_train, ds.y_train, opts,
                on_epoch=lambda e, loss: print(f"\repoch {e + 1}/{args.epochs} loss {loss:.4f}",
                                               end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    acc = train.accuracy(model, ds.x_test, ds.y_test)
    metrics = {"test_accuracy": acc, "train_seconds": round(time.time() - t0, 2),
               "epochs": args.epochs, "seed": args.seed}
    checkpoint.save(checkpoint.Checkpoint(cfg, model, dataset=spec, metrics=metrics), args.out)
    print(f"{cfg.arch} width {cfg.width} on {ds.name}: test accuracy {acc:.4f}; "
          f"wrote {args.out}")
    return 0


def export(args: argparse.Namespace) -> int:
    from toolkit.model import checkpoint, datasets
    from device_runtime.topics import check_id
    from toolkit.planning.fleet import ExportOptions, export_fleet, export_version
    from toolkit.planning.plan import PlanOptions
    from toolkit.planning.profiles import ProfileCatalogue

    profiles = ProfileCatalogue.load(args.profiles_file).select(args.profiles)
    ckpt = checkpoint.load(args.checkpoint, local_models(args))
    ds = datasets.load(args.dataset) if args.dataset else None
    if args.reference_gflops is not None:
        _positive("reference-gflops", args.reference_gflops)
    if not 0 < args.min_macs_fraction <= 1:
        from toolkit.errors import UsageError

        raise UsageError(f"--min-macs-fraction: expected in (0, 1], got {args.min_macs_fraction}")
    export_version(Path(args.out), args.version)  # a bad --version or --job: no key made
    if args.job is not None:
        check_id("job", args.job)
    key = signing_key(args)  # after the argument checks: a typo creates no key
    opts = ExportOptions(plan=PlanOptions(min_macs_fraction=args.min_macs_fraction,
                                          reference_gflops=args.reference_gflops,
                                          split_after=args.split_after),
                         finetune_epochs=args.finetune_epochs, int8=not args.no_int8,
                         strict_int8=args.strict_int8,
                         signing_key=key.path, version=args.version, job=args.job)
    t0 = time.time()
    path = export_fleet(ckpt, profiles, args.out, ds, opts,
                        progress=lambda name: print(f"exporting {name}", flush=True))
    m = _summary(path)
    print(f"wrote {path} (version {m.version}, {f'job {m.job}' if m.job else 'no job'}) in "
          f"{time.time() - t0:.1f}s, signed by key {key.key_id} "
          f"(devices: --trust {key.public_path})")
    return 0


def strict_int8_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict-int8", action="store_true", help="fail the export when an "
                   "int8 artifact cannot meet its parity bounds with any setting (default: "
                   "ship the fp32 artifact in its place, the reason in the manifest)")


def int8_warnings(manifest) -> None:
    """One line on stderr per fp32 artifact standing in for a failed int8 copy."""
    for name, dev in manifest.devices.items():
        for a in dev.fallbacks():
            if a.format == "onnx":
                fb = a.int8_fallback
                print(f"warning: {a.path} ships in the int8 slot (top-1 agreement "
                      f"{fb.get('top1_agreement', 0):.4f}): {fb.get('reason', '?')}",
                      file=sys.stderr, flush=True)


def _summary(path):
    """Print one line per device; returns the manifest (``Manifest``)."""
    from device_runtime.manifest import load_manifest

    m = load_manifest(path)
    int8_warnings(m)
    for name, dev in m.devices.items():
        full = dev.serving("full", "fp32") or dev.artifacts[0]  # SplitMix: base 0
        acc = full.parity.get("accuracy", float("nan"))
        q = dev.serving(full.role, "int8", full.index, ("onnx",))
        qacc = "-" if q is None else "fp32" if q.int8_fallback else \
            f"{q.parity['accuracy']:.4f}"
        print(f"{name:18s} prune {dev.plan['prune_ratio']:.2f}  MACs {full.macs:>9,}  "
              f"params {full.params:>7,}  opset {full.opset}  acc fp32 {acc:.4f} int8 {qacc}  "
              f"split after {dev.plan['split']['after'] if dev.plan.get('split') else '-'}")
    return m
