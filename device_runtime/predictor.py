"""On-device inference from a verified manifest, with ONNX Runtime only (no torch).

A ``Predictor`` holds one ONNX Runtime session per loaded model and averages
the logits of the active ones: one full model, or SplitMix bases (artifacts
with role "base" and an index), all loaded once, of which ``set_budget`` picks
how many run (a number, a latency budget from each base's latency measured at
load, or a memory budget from each base's artifact size) without reloading.

Every artifact is read once, checked against the manifest's sha256, and those
very bytes are given to ONNX Runtime. Given a trusted key, the manifest is
checked against its signature before it is read, and its job and version as
``device_runtime.rollback`` says (recorded once the models loaded). Every input
array is checked (dtype, shape, finiteness) before it reaches a session, so a
mistake gets an error naming it, not an ORT trace.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from device_runtime.errors import (
    ArtifactVerificationError,
    BudgetError,
    FedgeError,
    InputArrayError,
    ManifestError,
)
from device_runtime.manifest import PRECISIONS, Artifact, DeviceEntry, Manifest, load_manifest
from device_runtime.rollback import ExportPolicy, check_binding, record
from device_runtime.session import open_session, provider_of, run
from device_runtime.threads import forced as threads_forced

# Kinds numpy can cast to float32 without losing what the values mean: float,
# signed and unsigned int. bool, complex, strings, objects and dates are refused.
_NUMERIC_KINDS = "fiu"
# A run of at most this many multiply-accumulates (the model's MACs times the samples the
# caller will run) gets one intra-op thread: a pool's start and its threads' spinning cost
# more than they can save on a few milliseconds of work (one sample with the rpi4 model
# here: 28 ms less wall time with one thread, identical logits; docs/results/startup.md).
SMALL_RUN_MACS = 20_000_000


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
        # Artifacts that run fp32 although int8 was asked for (the manifest says why).
        self.fallbacks: list[Artifact] = []
        self.provider = provider_of(sessions[0])  # e.g. CPUExecutionProvider after a fallback
        self.batch_size = batch_size
        self.sample_shape: tuple = tuple(self.artifact.inputs[0]["shape"][1:])
        self._active = len(sessions)
        self.base_ms = [self._latency_ms(s) for s in sessions] if len(sessions) > 1 else []
        self.base_mb = [manifest.path_of(a).stat().st_size / 1e6 for a in artifacts]

    @classmethod
    def from_manifest(cls, path: str | Path, device: str, precision: str = "fp32",
                      threads: int = 0, batch_size: int = 1024,
                      trust: str | Path | None = None,
                      policy: ExportPolicy | None = None,
                      samples: int | None = None) -> "Predictor":
        """A predictor on ``device``'s full model of ``precision`` from ``path``.

        ``path`` is a manifest.json or its folder. The ONNX artifact is
        preferred; the ORT-format one is used where it is the only one. With
        ``trust`` (a public key file) the manifest's signature is verified first,
        then its job and version against ``policy`` (default ``ExportPolicy()``),
        and the version is recorded as accepted once the models loaded. ``samples``:
        how many samples the caller will run, if it knows: a model whose run is small
        (``SMALL_RUN_MACS``) then skips ONNX Runtime's graph rewrites and, with
        ``threads`` = 0 and no ``FEDGE_THREADS``, gets one thread.
        """
        if threads < 0:
            raise ValueError(f"threads: expected >= 0, got {threads}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise ManifestError(f"precision: expected one of {', '.join(PRECISIONS)}, "
                                f"got {precision!r}")
        policy = policy or ExportPolicy()
        manifest = load_manifest(path, trust=trust, verified=policy.verified_path)
        if trust is not None:  # an unsigned manifest's version proves nothing
            check_binding(manifest, policy)
        entry = manifest.device(device)
        artifacts = _pick_bases(entry, precision) or [_pick_full(entry, precision)]
        sessions = [open_verified(manifest, a, _threads_for(a, threads, samples),
                                  optimize=not _small_run(a, samples)) for a in artifacts]
        if trust is not None:
            record(manifest, policy)
        pred = cls(manifest, entry, artifacts, sessions, batch_size)
        if precision == "int8":
            pred.fallbacks = [a for a in artifacts if a.precision == "fp32"]
        return pred

    @property
    def active(self) -> int:
        """How many sessions ``predict_logits`` runs and averages."""
        return self._active

    def set_budget(self, *, bases: int | None = None, ms: float | None = None,
                   mb: float | None = None) -> int:
        """Run the first k loaded models from now on (nothing is reloaded); returns k.

        Exactly one of: ``bases`` = k; ``ms``: the most bases whose latencies
        (per sample, measured at load) add up to at most ``ms``; ``mb``: the most
        whose artifacts add up to at most ``mb`` megabytes.
        """
        given = {k: v for k, v in (("bases", bases), ("ms", ms), ("mb", mb)) if v is not None}
        if len(given) != 1:
            raise BudgetError(f"budget: expected exactly one of bases, ms, mb, got "
                              f"{', '.join(given) or 'none'}")
        (kind, value), = given.items()
        n = len(self.sessions)
        if kind == "bases":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n:
                raise BudgetError(f"bases: expected an int in 1..{n} (device "
                                  f"{self.entry.name} holds {n} model{'s' if n > 1 else ''}), "
                                  f"got {value!r}")
            self._active = value
            return value
        costs = self.base_ms if kind == "ms" else self.base_mb
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not np.isfinite(value) or value <= 0:
            raise BudgetError(f"{kind}: expected a positive number, got {value!r}")
        if not costs:  # one model: nothing to choose
            costs = [0.0]
        k = int(np.searchsorted(np.cumsum(costs), value, side="right"))
        if k == 0:
            raise BudgetError(f"{kind}: {value:g} is below what the smallest model needs "
                              f"({costs[0]:.3g} {kind})")
        self._active = k
        return k

    @staticmethod
    def _latency_ms(session: ort.InferenceSession, repeats: int = 15) -> float:
        """Median milliseconds of one single-sample run on this device."""
        inp = session.get_inputs()[0]
        shape = [1] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
        x = np.zeros(shape, np.float32)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(None, {inp.name: x})
            times.append(time.perf_counter() - t0)
        return float(np.median(times[2:]) * 1e3)

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


def _pick_bases(entry: DeviceEntry, precision: str) -> list[Artifact]:
    """SplitMix bases of ``precision``, by index (ONNX where listed, else ORT format); a
    base whose int8 copy failed parity is served by its fp32 artifact, as the manifest
    records."""
    indices = sorted({a.index for a in entry.artifacts
                      if a.role == "base" and a.index is not None})
    picked = [entry.serving("base", precision, i) for i in indices]
    if any(a is None for a in picked):
        missing = [i for i, a in zip(indices, picked) if a is None]
        raise ManifestError(f"device {entry.name}: no {precision} artifact for base "
                            f"{', '.join(map(str, missing))}")
    return picked


def _pick_full(entry: DeviceEntry, precision: str) -> Artifact:
    """The full model of ``precision``: ONNX if listed, else ORT format (mobile); for int8
    the fp32 one if the manifest says it stands in for a failed int8 copy."""
    a = entry.serving("full", precision)
    # find() builds the error that lists what the device does have.
    return a if a is not None else entry.find("full", precision, "onnx")


def _small_run(artifact: Artifact, samples: int | None) -> bool:
    """Whether the caller's run is known to be small (``SMALL_RUN_MACS``)."""
    return samples is not None and artifact.macs > 0 and \
        samples * artifact.macs <= SMALL_RUN_MACS


def _threads_for(artifact: Artifact, threads: int, samples: int | None) -> int:
    """``threads``, or 1 for a small known run (``SMALL_RUN_MACS``) unless the caller or
    ``FEDGE_THREADS`` chose a number, or the manifest does not know the model's MACs."""
    if threads or threads_forced():
        return threads
    return 1 if _small_run(artifact, samples) else threads


def open_verified(manifest: Manifest, artifact: Artifact, threads: int = 0,
                  optimize: bool = True) -> ort.InferenceSession:
    """A session on ``artifact``'s bytes, once they match the manifest's sha256
    (``optimize``: ``open_session``'s).

    ONNX Runtime gets the bytes that were hashed, never the path: a file swapped
    between the check and the load cannot be what runs."""
    data = manifest.read_verified(artifact)  # before ORT parses a single byte of it
    try:
        return open_session(data, threads, optimize=optimize)
    except FedgeError:  # e.g. FEDGE_ORT_PROVIDERS names a provider this machine lacks
        raise
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
