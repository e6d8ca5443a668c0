"""Find int8 settings that meet the parity bounds, or say why none does.

A narrow model (a SplitMix base, a heavily pruned variant) can lose too much
in int8 with the default settings. The search tries, in order, until one
passes: every calibration method with per-channel weights, then with
per-tensor weights; then, with the best of those, leaves the most sensitive
layers in float, one more at a time, up to a share of the weighted layers.
Settings the quantizer itself fails on (ONNX Runtime's histogram calibrations raise
on some pruned variants' activations) count as failed attempts, not as a failed
export. A layer's sensitivity is measured, not guessed: the model is quantized with
that layer alone and the relative squared error of the logits taken. If
nothing passes, the outcome carries the best attempt's figures, which the
exporter records as the reason it shipped fp32 in the int8 slot.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from exporters.errors import ExportError
from exporters.int8 import CALIBRATIONS, Int8Settings, preprocess, quantize_pre, weighted_nodes
from exporters.onnx_fp32 import onnx_opset
from exporters.parity import ParityBounds, int8_failure


@dataclass(frozen=True)
class Int8Search:
    """How far the search goes before it gives up on int8 for an artifact."""

    max_excluded_fraction: float = 0.5  # at most this share of weighted layers left fp32


@dataclass
class Int8Outcome:
    settings: Int8Settings | None  # the settings that passed, or None
    parity: dict  # of the passing file, or of the best failing attempt
    why: str | None  # the best attempt's failure, None when one passed
    tried: int = 0
    sensitive: list[str] = field(default_factory=list)  # most sensitive first

    def fallback_record(self, bounds: ParityBounds) -> dict:
        """What the manifest says about an artifact shipped fp32 in the int8 slot."""
        p = self.parity
        drop = p.get("reference_accuracy", 0.0) - p.get("accuracy", 0.0)
        return {"reason": f"int8 parity not met by any of {self.tried} settings tried; "
                          f"best: {self.why}",
                "top1_agreement": p.get("top1_agreement", 0.0),
                "accuracy_drop": round(drop, 6),
                "min_top1_agreement": bounds.int8_min_top1_agreement,
                "best_settings": p.get("settings"), "tried": self.tried,
                "sensitive_layers": self.sensitive[:3]}


def _rank(parity: dict) -> tuple[float, float]:
    """Higher is better: agreement first, then the smaller accuracy drop."""
    return (parity.get("top1_agreement", 0.0),
            parity.get("accuracy", 0.0) - parity.get("reference_accuracy", 0.0))


def search_int8(fp32_path: Path, out_path: Path, calib_x: np.ndarray,
                evaluate: Callable[[Path], dict], bounds: ParityBounds,
                metadata: dict | None = None, opts: Int8Search = Int8Search()) -> Int8Outcome:
    """Quantize ``fp32_path`` into ``out_path`` with the first settings that pass.

    ``evaluate(path)`` runs a quantized file on the test set and returns its
    parity (``exporters.parity.compare``). On failure ``out_path`` is removed.
    """
    opset = onnx_opset(onnx.load(str(fp32_path)))
    best: tuple[Int8Settings, dict] | None = None
    tried = 0
    sensitive: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        pre = preprocess(fp32_path, Path(tmp) / "pre.onnx")

        def attempt(s: Int8Settings) -> dict:
            nonlocal best, tried
            tried += 1
            try:
                quantize_pre(pre, out_path, calib_x, s, opset, metadata)
            except ExportError as e:  # e.g. a histogram calibration on a constant tensor
                parity = {"top1_agreement": 0.0, "error": str(e), "settings": s.to_json()}
                best = best or (s, parity)
                return parity
            parity = dict(evaluate(out_path), settings=s.to_json())
            if best is None or _rank(parity) > _rank(best[1]):
                best = (s, parity)
            return parity

        for s in _first_round():
            if int8_failure(parity := attempt(s), bounds) is None:
                return Int8Outcome(s, parity, None, tried)
        base = best[0]
        nodes = weighted_nodes(pre)
        sensitive[:] = _sensitivity(pre, Path(tmp) / "probe.onnx", calib_x, base, nodes, opset,
                                 evaluate)
        k_max = int(len(nodes) * opts.max_excluded_fraction)
        for k in range(1, k_max + 1):
            for method in CALIBRATIONS:
                s = replace(base, method=method, exclude=tuple(sensitive[:k]))
                if int8_failure(parity := attempt(s), bounds) is None:
                    return Int8Outcome(s, parity, None, tried, sensitive)
    out_path.unlink(missing_ok=True)
    return Int8Outcome(None, best[1], int8_failure(best[1], bounds), tried, sensitive)


def _first_round() -> list[Int8Settings]:
    return [Int8Settings(m, per_channel) for per_channel in (True, False) for m in CALIBRATIONS]


def _sensitivity(pre: Path, probe: Path, calib_x: np.ndarray, base: Int8Settings,
                 nodes: list[str], opset: int, evaluate: Callable[[Path], dict]) -> list[str]:
    """Weighted layers, the one whose quantization alone hurts the logits most first."""
    errs = {}
    for n in nodes:
        try:
            quantize_pre(pre, probe, calib_x, replace(base, only=(n,)), opset)
        except ExportError:  # a layer the quantizer cannot take: the first to leave fp32
            errs[n] = float("inf")
            continue
        errs[n] = evaluate(probe).get("relative_sq_err", 0.0)
    return sorted(nodes, key=lambda n: -errs[n])


def replay_int8(fp32_path: Path, out_path: Path, calib_x: np.ndarray,
                evaluate: Callable[[Path], dict], known: Int8Outcome,
                metadata: dict | None = None) -> Int8Outcome:
    """Quantize with settings a search already found for the same model; parity is
    measured again on the new file (its metadata differ, its numbers should not)."""
    opset = onnx_opset(onnx.load(str(fp32_path)))
    with tempfile.TemporaryDirectory() as tmp:
        pre = preprocess(fp32_path, Path(tmp) / "pre.onnx")
        quantize_pre(pre, out_path, calib_x, known.settings, opset, metadata)
    parity = dict(evaluate(out_path), settings=known.settings.to_json())
    return Int8Outcome(known.settings, parity, None, known.tried, known.sensitive)
