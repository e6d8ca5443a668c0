"""Parity: does an artifact compute what the torch model computes?

``compare`` is the pure measurement (numpy in, numbers out); the ``check_*``
functions apply the bounds and raise ParityError naming the artifact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporters.errors import ParityError


@dataclass(frozen=True)
class ParityBounds:
    fp32_max_abs_err: float = 1e-4
    int8_min_top1_agreement: float = 0.99
    int8_max_accuracy_drop: float = 0.01  # one point


def compare(reference: np.ndarray, output: np.ndarray,
            labels: np.ndarray | None = None) -> dict:
    """Max abs error, top-1 agreement and (with labels) both accuracies."""
    if reference.shape != output.shape:
        return {"max_abs_err": float("inf"), "top1_agreement": 0.0,
                "shape_mismatch": [list(reference.shape), list(output.shape)]}
    out = {"max_abs_err": float(np.max(np.abs(reference - output))) if reference.size else 0.0}
    if not np.isfinite(output).all():
        out["max_abs_err"] = float("inf")
    if reference.ndim == 2:
        out["top1_agreement"] = float(np.mean(reference.argmax(1) == output.argmax(1)))
        if labels is not None:
            out["accuracy"] = float(np.mean(output.argmax(1) == labels))
            out["reference_accuracy"] = float(np.mean(reference.argmax(1) == labels))
    return out


def check_fp32(name: str, parity: dict, bounds: ParityBounds) -> None:
    if not parity["max_abs_err"] <= bounds.fp32_max_abs_err:
        raise ParityError(f"artifact {name} fails parity: max abs error "
                          f"{parity['max_abs_err']:.3g} > {bounds.fp32_max_abs_err:g}")


def int8_failure(parity: dict, bounds: ParityBounds) -> str | None:
    """Why an int8 artifact fails its bounds, or None if it passes."""
    if parity.get("error"):
        return f"the quantizer failed: {parity['error']}"
    agree = parity.get("top1_agreement", 0.0)
    if agree < bounds.int8_min_top1_agreement:
        return f"top-1 agreement {agree:.4f} < {bounds.int8_min_top1_agreement}"
    drop = parity.get("reference_accuracy", 0.0) - parity.get("accuracy", 0.0)
    if drop > bounds.int8_max_accuracy_drop:
        return f"accuracy drop {drop * 100:.2f} points > {bounds.int8_max_accuracy_drop * 100:g}"
    return None


def check_int8(name: str, parity: dict, bounds: ParityBounds) -> None:
    why = int8_failure(parity, bounds)
    if why:
        raise ParityError(f"artifact {name} fails parity: {why}")
