"""Export a checkpoint for a fleet: plan, prepare and export every device's variant.

Orchestration only; the decisions live in plan.py, the edits in prepare.py
and pruning.py, the files in exporters/. Everything is written to a staging
folder and moved into place only when every artifact has passed its checks,
so a failed export leaves the output folder as it was. With a signing key the
manifest is signed in the staging folder too (``manifest.json.sig``). The
manifest's ``version`` is ``ExportOptions.version``, by default one more than the
export already in the output folder (1 for a new folder); a version that does
not go up is refused, since devices that took the old one would refuse it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exporters.executorch_pte import available as pte_available
from exporters.parity import ParityBounds
from exporters.variant import ParityData, Part, VariantRequest, export_variant, write_manifest
from device_runtime.splitmix_variants import has_bases
from device_runtime.topics import check_id
from toolkit.model import datasets
from toolkit.model.checkpoint import Checkpoint, example_input
from toolkit.errors import CheckpointError, UsageError
from toolkit.planning.plan import PlanOptions, plan_fleet
from toolkit.planning.prepare import Variant, prepare_variant
from toolkit.planning.profiles import DeviceProfile
from toolkit.deploy.signing import load_key, sign_manifest
from toolkit.model.pruning import count_macs
from toolkit.model.train import TrainOptions
from toolkit.model.zoo import split


@dataclass(frozen=True)
class ExportOptions:
    plan: PlanOptions = field(default_factory=PlanOptions)
    finetune_epochs: int = 5  # short fine-tuning of pruned variants on the server's data
    calib_samples: int = 512
    int8: bool = True
    pte: bool = True  # ExecuTorch programs for mobile profiles, when executorch is installed
    strict_int8: bool = False  # an int8 copy that fails parity fails the export (else fp32)
    bounds: ParityBounds = field(default_factory=ParityBounds)
    seed: int = 0
    signing_key: Path | None = None  # Ed25519 private key file: sign the manifest with it
    version: int | None = None  # default: the version in the output folder, plus one
    job: str | None = None  # the job the export is for; devices of other jobs refuse it


def _parts(v: Variant, example) -> list[Part]:
    parts = [Part("full", v.model, v.plan.macs, v.plan.params)]
    if v.plan.split is not None:
        head, tail = split(v.model, v.plan.split.after)
        hm, hp = count_macs(head, example)
        with torch.no_grad():
            act = head(example)
        tm, tp = count_macs(tail, act)
        parts += [Part("head", head, hm, hp), Part("tail", tail, tm, tp)]
    return parts


def _splitmix_variant(ckpt: Checkpoint, profile: DeviceProfile, plan, example
                      ) -> tuple[Variant, list[Part]]:
    """SplitMix: no pruning and no split; each base is its own artifact (role "base"),
    so the device picks how many to run at inference."""
    from toolkit.model.pruning import PruneRecord

    plan.method, plan.prune_ratio, plan.split, plan.split_candidates = "splitmix", 0.0, None, []
    plan.macs, plan.params = count_macs(ckpt.model, example)
    parts = []
    for i in ckpt.model.indices:
        base = ckpt.model.bases[str(i)]
        macs, params = count_macs(base, example)
        parts.append(Part("base", base, macs, params, index=i))
    return Variant(profile, plan, ckpt.model, PruneRecord()), parts


def export_fleet(ckpt: Checkpoint, profiles: list[DeviceProfile], out: str | Path,
                 ds: datasets.Dataset | None = None, opts: ExportOptions = ExportOptions(),
                 progress: Callable[[str], None] | None = None,
                 on_variant: Callable[[Variant], None] | None = None) -> Path:
    """Write ``out/manifest.json`` and every device's artifacts; returns the manifest path.

    ``on_variant`` sees each prepared torch model (benchmarks compare it with ORT).
    """
    out = Path(out)
    _check_target(out)
    version = export_version(out, opts.version)
    if opts.job is not None:
        check_id("job", opts.job)
    key = load_key(opts.signing_key) if opts.signing_key is not None else None  # fail fast
    if ds is None:
        if ckpt.dataset is None:
            raise CheckpointError("checkpoint records no dataset; name one with --dataset")
        ds = datasets.load(ckpt.dataset)
    if ds.sample_shape != tuple(ckpt.config.input_shape):
        raise UsageError(f"dataset {ds.name} has samples of shape {ds.sample_shape}, the "
                         f"model takes {tuple(ckpt.config.input_shape)}")
    rng = np.random.default_rng(opts.seed)
    calib = ds.x_train[rng.permutation(len(ds.x_train))[:opts.calib_samples]]
    data = ParityData(calib, ds.x_test, ds.y_test)
    example = example_input(ckpt.config)
    full_macs, full_params = count_macs(ckpt.model, example)
    plans = plan_fleet(profiles, full_macs, full_params, opts.plan)
    ft = TrainOptions(epochs=opts.finetune_epochs, lr=2e-3, seed=opts.seed)
    model_json = {"config": ckpt.config.to_json(), "macs": full_macs, "params": full_params,
                  "prune": ckpt.prune.to_json(), "metrics": ckpt.metrics}
    devices, memo = {}, {}
    staging = Path(tempfile.mkdtemp(prefix=".fedge-export-", dir=out.parent))
    try:
        for p in profiles:
            if progress:
                progress(p.name)
            if has_bases(ckpt.config.arch):  # every device gets every base
                v, parts = _splitmix_variant(ckpt, p, plans[p.name], example)
            else:
                v = prepare_variant(ckpt, p, plans[p.name], ft, (ds.x_train, ds.y_train),
                                    opts.plan.split_after)
                parts = _parts(v, example)
            if on_variant:
                on_variant(v)
            meta = {"fedge.config": ckpt.config.to_json(), "fedge.prune": v.record.to_json()}
            req = VariantRequest(p.name, parts, v.plan.opset, p.mobile, opts.int8, meta,
                                 strict_int8=opts.strict_int8, int8_memo=memo,
                                 pte=p.mobile and opts.pte and pte_available())
            devices[p.name] = {"profile": p.to_json(), "plan": v.plan.to_json(),
                               "artifacts": export_variant(req, data, staging, opts.bounds)}
        manifest = write_manifest(staging, model_json, devices, version, opts.job)
        if key is not None:
            sign_manifest(manifest, key)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "manifest.json"


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise UsageError(f"--out {out} is a non-empty folder without a manifest.json; "
                         "refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)


def export_version(out: Path, wanted: int | None) -> int:
    """The new export's version: ``wanted``, or one more than the one in ``out``."""
    previous = 0
    try:
        doc = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        if isinstance(doc, dict) and isinstance(doc.get("version"), int):
            previous = doc["version"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass  # no export there yet (or an unreadable one, which this one replaces)
    if wanted is None:
        return previous + 1
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise UsageError(f"--version: expected an int >= 1, got {wanted!r}")
    if wanted <= previous:
        raise UsageError(f"--version {wanted}: expected more than {previous}, the version "
                         f"of the export in {out} (devices that took it refuse an older one)")
    return wanted


def _replace(staging: Path, out: Path) -> None:
    """Swap the finished staging folder in for ``out`` (an old export is replaced whole)."""
    if out.exists():
        old = out.with_name(out.name + ".old-fedge")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
