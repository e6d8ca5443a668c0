"""Benchmark the fleet export: sizes, accuracy and latency of every device's variant.

Pre-trains the MNIST-1D CNN (or loads --checkpoint), exports every profile,
then per profile measures params, MACs, file sizes, test accuracy of each
artifact, and latency at batch 1 and 64 for torch eager, ORT fp32 and ORT int8
(median of --repeats timed runs after warm-up, one thread each, side by side in
this process). Writes JSON and a markdown table.

    python bench/export.py --json runs/bench_export.json --md docs/results/export.md
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_results  # noqa: E402

from device_runtime.manifest import load_manifest  # noqa: E402
from device_runtime.session import open_session, run  # noqa: E402
from toolkit.model import checkpoint, datasets, train, zoo  # noqa: E402
from toolkit.planning.fleet import ExportOptions, export_fleet  # noqa: E402
from toolkit.planning.profiles import ProfileCatalogue  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 4)


def pretrain(ds: datasets.Dataset, epochs: int, path: Path) -> tuple[Path, float]:
    cfg = zoo.make_config("cnn", ds.sample_shape, ds.num_classes, 1.0,
                          float(np.mean(ds.x_train)), float(np.std(ds.x_train)))
    torch.manual_seed(0)
    model = zoo.build_model(cfg)
    t = time.time()
    train.train(model, ds.x_train, ds.y_train, train.TrainOptions(epochs=epochs))
    secs = time.time() - t
    acc = train.accuracy(model, ds.x_test, ds.y_test)
    checkpoint.save(checkpoint.Checkpoint(cfg, model, dataset=datasets.DatasetSpec("mnist1d"),
                                          metrics={"test_accuracy": acc}), path)
    return path, secs


def measure(manifest_path: Path, models: dict, ds: datasets.Dataset, repeats: int) -> list:
    m = load_manifest(manifest_path)
    rows = []
    for name, dev in m.devices.items():
        full, q = dev.find(), dev.find(precision="int8")
        sessions = {"ort_fp32": open_session(m.verify(full), threads=1),
                    "ort_int8": open_session(m.verify(q), threads=1)}
        model = models[name]
        row = {"profile": name, "prune_ratio": dev.plan["prune_ratio"], "params": full.params,
               "macs": full.macs, "opset": full.opset,
               "split_after": (dev.plan.get("split") or {}).get("after"),
               "files": {a.path: m.path_of(a).stat().st_size for a in dev.artifacts},
               "accuracy": {f"{a.role}.{a.precision}.{a.format}": a.parity.get("accuracy")
                            for a in dev.artifacts if a.parity.get("accuracy") is not None},
               "latency_ms": {}}
        for batch in (1, 64):
            x = ds.x_test[:batch]
            xt = torch.from_numpy(x)
            with torch.no_grad():
                row["latency_ms"][f"torch_b{batch}"] = median_ms(lambda: model(xt), repeats)
            for key, s in sessions.items():
                row["latency_ms"][f"{key}_b{batch}"] = median_ms(lambda: run(s, x), repeats)
        rows.append(row)
    return rows


def to_markdown(result: dict) -> str:
    lines = ["# Export benchmark\n",
             f"Machine: {result['machine']}; one thread for torch and ORT; medians of "
             f"{result['repeats']} runs. Command: `{result['command']}`.\n",
             f"Pre-training {result['pretrain_seconds']} s; export of "
             f"{len(result['profiles'])} profiles {result['export_seconds']} s.\n",
             "| profile | prune | params | MACs | fp32 KB | int8 KB | acc fp32 | acc int8 "
             "| torch b1 ms | ORT fp32 b1 | ORT int8 b1 | torch b64 | ORT fp32 b64 "
             "| ORT int8 b64 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["profiles"]:
        f = r["files"]
        kb = lambda suffix: round(sum(v for k, v in f.items() if k.endswith(suffix)) / 1024, 1)
        lat = r["latency_ms"]
        lines.append(
            f"| {r['profile']} | {r['prune_ratio']} | {r['params']:,} | {r['macs']:,} "
            f"| {kb('full.fp32.onnx')} | {kb('full.int8.onnx')} "
            f"| {r['accuracy']['full.fp32.onnx']:.4f} | {r['accuracy']['full.int8.onnx']:.4f} "
            + " ".join(f"| {lat[k]:.3f}" for k in ("torch_b1", "ort_fp32_b1", "ort_int8_b1",
                                                   "torch_b64", "ort_fp32_b64", "ort_int8_b64"))
            + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="use this checkpoint instead of pre-training")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--profiles", default="all")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--json", default="runs/bench_export.json")
    ap.add_argument("--md", default=None, help="also write a markdown table here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = datasets.load_mnist1d()
    tmp = Path(tempfile.mkdtemp(prefix="fedge-bench-"))
    pre_s = 0.0
    ckpt_path = Path(args.checkpoint) if args.checkpoint else None
    if ckpt_path is None:
        ckpt_path, pre_s = pretrain(ds, args.epochs, tmp / "cnn.safetensors")
    models = {}
    t = time.time()
    manifest = export_fleet(checkpoint.load(ckpt_path),
                            ProfileCatalogue.load().select(args.profiles), tmp / "export", ds,
                            ExportOptions(), on_variant=lambda v: models.update(
                                {v.profile.name: v.model}))
    export_s = time.time() - t
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, "
                         f"{__import__('os').cpu_count()} cores",
              "command": " ".join(["python", "bench/export.py", *sys.argv[1:]]),
              "repeats": args.repeats, "pretrain_seconds": round(pre_s, 1),
              "export_seconds": round(export_s, 1),
              "profiles": measure(manifest, models, ds, args.repeats)}
    write_results(result, args.json, args.md, to_markdown)


if __name__ == "__main__":
    main()
