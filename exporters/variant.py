"""Export one device's prepared model as verified artifacts, and write the manifest.

For each part (full model, head and tail at the split point) an fp32 ONNX
file; for the full model an int8 static QDQ copy; for mobile profiles ORT
format copies, and with ExecuTorch installed XNNPACK ``.pte`` programs of the
full model (``exporters.executorch_pte``). Every file is checked against torch
before it is listed, and a failed check stops the export with an error naming the artifact, with one
exception: an int8 copy that no setting of ``exporters.int8_search`` brings
within its bounds is not shipped, and the fp32 artifacts of that part carry an
``int8_fallback`` record (reason, measured agreement) saying they serve int8
requests too; ``VariantRequest.strict_int8`` makes that an error instead.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from device_runtime.manifest import FORMAT, sha256_file
from device_runtime.session import open_session, run
from exporters.errors import ParityError
from exporters.int8_search import Int8Search, replay_int8, search_int8
from exporters.onnx_fp32 import export_fp32, onnx_opset
from exporters.ort_format import convert_to_ort
from exporters.parity import ParityBounds, check_fp32, check_int8, compare, int8_failure

# Parity is measured on the CPU provider whatever GPU the export machine has: it is
# the reference every device can run, and its results do not vary with the hardware.
CPU = ["CPUExecutionProvider"]
NAMES = {"full": ("x", "logits"), "head": ("x", "act"), "tail": ("act", "logits"),
         "base": ("x", "logits")}


@dataclass
class Part:
    role: str  # "full" | "head" | "tail" | "base"
    module: nn.Module
    macs: int
    params: int
    index: int | None = None


@dataclass
class VariantRequest:
    name: str  # the device profile; also the artifact folder
    parts: list[Part]
    opset: int
    mobile: bool = False
    int8: bool = True
    metadata: dict = field(default_factory=dict)  # model config etc., into every file
    strict_int8: bool = False  # an int8 copy that fails parity fails the export
    search: Int8Search = field(default_factory=Int8Search)
    pte: bool = False  # also ExecuTorch .pte (XNNPACK), fp32 and int8, of full/base parts
    # Search outcomes by (module, opset), shared across a fleet's requests: SplitMix
    # sends the same bases to every profile, and the search need not run again for them.
    int8_memo: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ParityData:
    calib_x: np.ndarray  # training samples for int8 calibration
    test_x: np.ndarray
    test_y: np.ndarray


@torch.no_grad()
def _torch_out(module: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """In the batches ``session.run`` gives ONNX Runtime: a model normalising with each
    batch's statistics (SplitMix's ``batch_stats``) is then compared on the same ones."""
    module.eval()
    return np.concatenate([module(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])))
                           .numpy() for i in range(0, max(len(x), 1), batch_size)])


def _io(path: Path) -> tuple[list, list]:
    s = open_session(path, threads=1, providers=CPU)
    conv = {"tensor(float)": "float32", "tensor(int64)": "int64"}
    io = [[{"name": a.name, "shape": [d if isinstance(d, int) else str(d) for d in a.shape],
            "dtype": conv.get(a.type, a.type)} for a in args]
          for args in (s.get_inputs(), s.get_outputs())]
    return io[0], io[1]


def _record(root: Path, path: Path, part: Part, precision: str, fmt: str, opset: int,
            parity: dict, io: tuple[list, list] | None = None) -> dict:
    inputs, outputs = io or _io(path)  # ORT reads ONNX and .ort; a .pte's io is given
    return {"role": part.role, "index": part.index, "precision": precision, "format": fmt,
            "path": path.relative_to(root).as_posix(), "sha256": sha256_file(path),
            "opset": opset, "params": part.params, "macs": part.macs,
            "inputs": inputs, "outputs": outputs, "parity": parity}


def _stem(part: Part) -> str:
    return part.role if part.index is None else f"{part.role}{part.index}"


def export_variant(req: VariantRequest, data: ParityData, root: str | Path,
                   bounds: ParityBounds = ParityBounds()) -> list[dict]:
    """Write and verify every artifact of one device; manifest records in return."""
    root = Path(root)
    folder = root / req.name
    records, ref_in = [], {"x": data.test_x}
    for part in req.parts:
        inp, outp = NAMES[part.role]
        x = ref_in[inp]
        ref = _torch_out(part.module, x)
        if outp == "act":
            ref_in["act"] = ref
        meta = dict(req.metadata, **{"fedge.role": part.role, "fedge.device": req.name})
        path = export_fp32(part.module, torch.from_numpy(x[:2]), folder /
                           f"{_stem(part)}.fp32.onnx", req.opset, inp, outp, meta)
        out = run(open_session(path, threads=1, providers=CPU), x)
        parity = compare(ref, out, data.test_y if outp == "logits" else None)
        check_fp32(f"{req.name}/{path.name}", parity, bounds)
        fp32 = [_record(root, path, part, "fp32", "onnx", req.opset, parity)]
        if req.mobile:
            fp32.append(_ort_copy(root, path, part, x, ref, data, bounds, check_fp32))
        records += fp32
        if req.int8 and part.role in ("full", "base"):
            q = _int8(root, path, part, data, ref, meta, bounds, req)
            if "int8_fallback" in q:  # fp32 serves the int8 slot; say so where it is
                for r in fp32:
                    r["int8_fallback"] = q["int8_fallback"]
                continue
            records.append(q)
            if req.mobile:
                records.append(_ort_copy(root, root / q["path"], part, x, ref, data,
                                         bounds, check_int8, precision="int8"))
        if req.pte and part.role in ("full", "base"):
            records += _pte(root, folder, part, x, ref, data, bounds, fp32[0], req.int8)
    _check_chain(req, root, records, data, bounds)
    return records


def _int8(root: Path, fp32_path: Path, part: Part, data: ParityData, ref: np.ndarray,
          meta: dict, bounds: ParityBounds, req: VariantRequest) -> dict:
    """The int8 artifact's record, or ``{"int8_fallback": why}`` when none passes."""
    out_path = fp32_path.with_name(f"{_stem(part)}.int8.onnx")
    ref_sq = float(np.mean(ref.astype(np.float64) ** 2)) or 1.0

    def evaluate(path: Path) -> dict:
        out = run(open_session(path, threads=1, providers=CPU), data.test_x)
        parity = compare(ref, out, data.test_y)
        parity["relative_sq_err"] = float(np.mean((out - ref).astype(np.float64) ** 2) / ref_sq)
        return parity

    key = (id(part.module), req.opset)
    known, outcome = req.int8_memo.get(key), None
    if known is not None and known.settings is not None:  # re-make the file that passed
        outcome = replay_int8(fp32_path, out_path, data.calib_x, evaluate, known, meta)
        if int8_failure(outcome.parity, bounds) is not None:
            outcome = None
    elif known is not None:  # the same model failed every setting already
        outcome = known
    if outcome is None:
        outcome = search_int8(fp32_path, out_path, data.calib_x, evaluate, bounds, meta,
                              req.search)
    req.int8_memo[key] = outcome
    name = out_path.relative_to(root)
    if outcome.settings is None:
        if req.strict_int8:
            raise ParityError(f"artifact {name} fails int8 parity with every setting tried "
                              f"({outcome.tried}): {outcome.why}")
        return {"int8_fallback": outcome.fallback_record(bounds)}
    parity = dict(outcome.parity)
    parity.pop("relative_sq_err", None)
    settings = parity.pop("settings")
    parity.update(settings)
    opset = onnx_opset(onnx.load(str(out_path)))
    return _record(root, out_path, part, "int8", "onnx", opset, parity)


def _pte(root: Path, folder: Path, part: Part, x: np.ndarray, ref: np.ndarray,
         data: ParityData, bounds: ParityBounds, onnx_rec: dict, int8: bool) -> list[dict]:
    """ExecuTorch programs of one part, checked in ExecuTorch's runtime: fp32 (must pass),
    int8 if asked and it passes (else the fp32 program records why, as for ONNX)."""
    from exporters.executorch_pte import export_pte, run_pte

    example = torch.from_numpy(x[:2])

    def record(path: Path, precision: str, parity: dict) -> dict:
        return dict(_record(root, path, part, precision, "pte", onnx_rec["opset"], parity,
                            io=(onnx_rec["inputs"], onnx_rec["outputs"])))

    path = export_pte(part.module, example, folder / f"{_stem(part)}.fp32.pte")
    parity = compare(ref, run_pte(path, x), data.test_y)
    check_fp32(f"{path.relative_to(root)}", parity, bounds)
    out = [record(path, "fp32", parity)]
    if int8:
        qpath = export_pte(part.module, example, folder / f"{_stem(part)}.int8.pte",
                           data.calib_x)
        qparity = compare(ref, run_pte(qpath, x), data.test_y)
        why = int8_failure(qparity, bounds)
        if why is None:
            out.append(record(qpath, "int8", qparity))
        else:
            qpath.unlink()
            out[0]["int8_fallback"] = {
                "reason": f"ExecuTorch int8 (XNNPACK quantizer) parity not met: {why}",
                "top1_agreement": qparity.get("top1_agreement", 0.0)}
    return out


def _ort_copy(root: Path, src: Path, part: Part, x: np.ndarray, ref: np.ndarray,
              data: ParityData, bounds: ParityBounds, check, precision: str = "fp32") -> dict:
    dst = convert_to_ort(src, src.with_suffix(".ort"))
    parity = compare(ref, run(open_session(dst, threads=1, providers=CPU), x),
                     data.test_y if ref.ndim == 2 and part.role != "head" else None)
    check(f"{dst.relative_to(root)}", parity, bounds)
    opset = onnx_opset(onnx.load(str(src)))
    return _record(root, dst, part, precision, "ort", opset, parity)


def _check_chain(req: VariantRequest, root: Path, records: list[dict], data: ParityData,
                 bounds: ParityBounds) -> None:
    """Head then tail (both in ONNX Runtime) must equal the full model."""
    paths = {r["role"]: root / r["path"] for r in records
             if r["precision"] == "fp32" and r["format"] == "onnx"}
    if not {"full", "head", "tail"} <= set(paths):
        return
    act = run(open_session(paths["head"], threads=1, providers=CPU), data.test_x)
    chained = run(open_session(paths["tail"], threads=1, providers=CPU), act)
    full = run(open_session(paths["full"], threads=1, providers=CPU), data.test_x)
    parity = compare(full, chained, data.test_y)
    check_fp32(f"{req.name}/head+tail", parity, bounds)
    for r in records:
        if r["role"] == "tail" and r["format"] == "onnx":
            r["parity"]["chain_max_abs_err"] = parity["max_abs_err"]


def write_manifest(root: str | Path, model: dict, devices: dict[str, dict],
                   version: int = 1, job: str | None = None) -> Path:
    """Write ``root/manifest.json`` atomically; ``devices[name]`` has profile, plan, artifacts.
    ``version`` and ``job`` sit in the signed bytes, so a device can refuse a rollback
    or another job's export."""
    root = Path(root)
    path = root / "manifest.json"
    tmp = path.with_name("manifest.json.tmp")
    body = {"format": FORMAT, "version": version, "job": job, "model": model,
            "devices": devices}
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
