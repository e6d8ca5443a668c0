"""On-device inference from a verified manifest, with ONNX Runtime only (no torch).

A ``Predictor`` holds one ONNX Runtime session per loaded model and averages
the logits of the active ones. Today that is one full model; SplitMix bases
(artifacts with role "base" and an index) will load several and let
``set_budget`` switch how many run, without reloading anything.

Every artifact is checked against the manifest's sha256 before ONNX Runtime
opens it, and every input array is checked (dtype, shape, finiteness) before
it reaches a session, so a mistake gets an error naming it, not an ORT trace.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from device_runtime.errors import ArtifactVerificationError, InputArrayError, ManifestError
from device_runtime.manifest import PRECISIONS, Artifact, DeviceEntry, Manifest, load_manifest
from device_runtime.session import open_session, run

# Kinds numpy can cast to float32 without losing what the values mean: float,
# signed and unsigned int. bool, complex, strings, objects and dates are refused.
_NUMERIC_KINDS = "fiu"


class Predictor:
    """Labels and logits for input arrays, from a device's verified artifacts."""

    def __init__(self, manifest: Manifest, entry: DeviceEntry, artifacts: list[Artifact],
                 sessions: list[ort.InferenceSession], batch_size: int = 1024) -> None:
        if not artifacts or len(artifacts) != len(sessions):
            raise ValueError(f"expected one session per artifact, got {len(artifacts)} "
                             f"artifacts and {len(sessions)} sessions")
        self.manifest = manifest
        self.entry = entry  # the device's profile and plan
        self.artifacts = artifacts
        self.artifact = artifacts[0]
        self.sessions = sessions
        self.batch_size = batch_size
        self.sample_shape: tuple = tuple(self.artifact.inputs[0]["shape"][1:])
        self._active = len(sessions)

    @classmethod
    def from_manifest(cls, path: str | Path, device: str, precision: str = "fp32",
                      threads: int = 0, batch_size: int = 1024) -> "Predictor":
        """A predictor on ``device``'s full model of ``precision`` from ``path``.

        ``path`` is a manifest.json or its folder. The ONNX artifact is
        preferred; the ORT-format one is used where it is the only one.
        """
        if threads < 0:
            raise ValueError(f"threads: expected >= 0, got {threads}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise ManifestError(f"precision: expected one of {', '.join(PRECISIONS)}, "
                                f"got {precision!r}")
        manifest = load_manifest(path)
        entry = manifest.device(device)
        artifact = _pick_full(entry, precision)
        session = _open_verified(manifest, artifact, threads)
        return cls(manifest, entry, [artifact], [session], batch_size)

    @property
    def active(self) -> int:
        """How many sessions ``predict_logits`` runs and averages."""
        return self._active

    def set_budget(self, *, bases: int) -> None:
        """Run the first ``bases`` loaded models from now on (nothing is reloaded)."""
        n = len(self.sessions)
        if isinstance(bases, bool) or not isinstance(bases, int) or not 1 <= bases <= n:
            raise ManifestError(f"bases: expected an int in 1..{n} (device {self.entry.name} "
                                f"has {n} loaded model{'s' if n > 1 else ''}), got {bases!r}")
        self._active = bases

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        """Float32 logits, shape (batch, classes): the mean over the active models."""
        x = self.check_input(x)
        out = run(self.sessions[0], x, self.batch_size)
        for session in self.sessions[1:self._active]:
            out = out + run(session, x, self.batch_size)
        return out / np.float32(self._active) if self._active > 1 else out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Int64 labels, shape (batch,)."""
        return self.predict_logits(x).argmax(axis=1).astype(np.int64)

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """``x`` as a C-contiguous float32 batch, or InputArrayError naming the problem."""
        x = np.asarray(x)
        if x.dtype.kind not in _NUMERIC_KINDS:
            raise InputArrayError(f"input dtype: expected a numeric array (float or int), "
                                  f"got {x.dtype}")
        if _fits(x.shape, self.sample_shape):
            x = x[np.newaxis]
        elif not (x.ndim >= 1 and _fits(x.shape[1:], self.sample_shape)):
            want = ", ".join(str(d) for d in ("N", *self.sample_shape))
            raise InputArrayError(f"input shape: expected ({want}) or one sample "
                                  f"{_fmt(self.sample_shape)}, got {_fmt(x.shape)}")
        if len(x) == 0:
            raise InputArrayError(f"input shape: expected at least one sample, "
                                  f"got {_fmt(x.shape)}")
        # Check after the cast: float64 values beyond float32's range become inf,
        # which the check below reports, so numpy's overflow warning is noise.
        with np.errstate(over="ignore"):
            x = np.ascontiguousarray(x, dtype=np.float32)
        bad = ~np.isfinite(x)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputArrayError(f"input values: expected finite float32 values, got "
                                  f"{int(bad.sum())} NaN/inf (first at index {first})")
        return x


def _pick_full(entry: DeviceEntry, precision: str) -> Artifact:
    """The full model of ``precision``: ONNX if listed, else ORT format (mobile)."""
    for fmt in ("onnx", "ort"):
        for a in entry.artifacts:
            if (a.role, a.precision, a.format, a.index) == ("full", precision, fmt, None):
                return a
    # find() builds the error that lists what the device does have.
    return entry.find("full", precision, "onnx")


def _open_verified(manifest: Manifest, artifact: Artifact,
                   threads: int) -> ort.InferenceSession:
    path = manifest.verify(artifact)  # before ORT parses a single byte of it
    try:
        return open_session(path, threads)
    except Exception as e:  # ORT raises its own pybind types, with no common base
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactVerificationError(
            f"artifact {artifact.path} passed its sha256 check but onnxruntime "
            f"{ort.__version__} cannot load it: {why}") from None


def _fits(shape: tuple, sample_shape: tuple) -> bool:
    """Whether ``shape`` matches ``sample_shape``; named (dynamic) dims match any size."""
    return len(shape) == len(sample_shape) and all(
        not isinstance(want, int) or got == want for got, want in zip(shape, sample_shape))


def _fmt(shape: tuple) -> str:
    return f"({shape[0]},)" if len(shape) == 1 else f"({', '.join(map(str, shape))})"
