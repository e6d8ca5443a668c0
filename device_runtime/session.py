"""ONNX Runtime sessions: choose an execution provider, open an artifact, run it in
batches (no torch).

Providers are preferred in the order TensorRT, CUDA, CPU, restricted to what
this onnxruntime build offers; ``FEDGE_ORT_PROVIDERS`` (a comma list) replaces
that order. When a session cannot be created with a GPU provider (on a Jetson
TensorRT often lacks a library), it is created again with the next one, and a
warning says so. ``session.get_providers()[0]`` is the provider really in use.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from device_runtime.errors import ProviderError
from device_runtime.threads import budget as thread_budget

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDERS_ENV = "FEDGE_ORT_PROVIDERS"
_SUFFIX = "ExecutionProvider"


def choose_providers(available: list[str], prefer: list[str] | None = None) -> list[str]:
    """The providers to try, best first.

    Without ``prefer``: ``PREFERENCE`` restricted to ``available``. With it:
    those names in that order; a name may drop the "ExecutionProvider" suffix and
    is matched without regard to case ("cuda", "tensorrt"), and one that is not in
    ``available`` raises ProviderError listing what is.
    """
    if prefer is None:
        chosen = [p for p in PREFERENCE if p in available]
        if not chosen:
            raise ProviderError(f"onnxruntime offers none of {', '.join(PREFERENCE)}; "
                                f"it has: {', '.join(available) or 'nothing'}")
        return chosen
    by_name = {}
    for p in available:
        by_name[p.lower()] = p
        by_name[p[:-len(_SUFFIX)].lower() if p.endswith(_SUFFIX) else p.lower()] = p
    chosen = []
    for name in prefer:
        p = by_name.get(name.strip().lower())
        if p is None:
            raise ProviderError(f"execution provider {name.strip()!r} is not available; "
                                f"onnxruntime {ort.__version__} has: {', '.join(available)}")
        if p not in chosen:
            chosen.append(p)
    if not chosen:
        raise ProviderError("expected at least one execution provider, got none")
    return chosen


def default_providers() -> list[str]:
    """``choose_providers`` for this machine, with ``FEDGE_ORT_PROVIDERS`` if set."""
    raw = os.environ.get(PROVIDERS_ENV, "")
    prefer = [n for n in raw.split(",") if n.strip()] if raw.strip() else None
    if raw.strip() and not prefer:
        raise ProviderError(f"{PROVIDERS_ENV}={raw!r}: expected a comma list of "
                            "execution providers")
    try:
        return choose_providers(ort.get_available_providers(), prefer)
    except ProviderError as e:
        raise ProviderError(f"{PROVIDERS_ENV}={raw!r}: {e}" if prefer else str(e)) from None


def open_session(model: str | Path | bytes, threads: int = 0,
                 providers: list[str] | None = None,
                 optimize: bool = True) -> ort.InferenceSession:
    """A session on ``model`` (a path, or the model's bytes); ``threads`` = 0: this
    process's share of the cores (``device_runtime.threads``; ONNX Runtime's own
    default takes every core in every process); ``providers`` defaults to
    ``default_providers()``. ``optimize=False`` skips ONNX Runtime's graph rewrites:
    for a run of a few samples they cost more than they save (docs/results/startup.md).

    If creating it fails with a provider other than the last, it is tried again
    with the rest of the list; the last failure is raised as it is.
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    so.intra_op_num_threads = threads or thread_budget()
    so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    chain = list(providers) if providers else default_providers()
    src = model if isinstance(model, bytes) else str(model)
    what = "the model" if isinstance(model, bytes) else Path(model).name
    for i in range(len(chain)):
        try:
            return ort.InferenceSession(src, so, providers=chain[i:])
        except Exception as e:  # ORT raises its own pybind types, with no common base
            if i == len(chain) - 1:
                raise
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _log().warning("onnxruntime cannot open %s with %s (%s); falling back to %s",
                           what, chain[i], why, chain[i + 1])
    raise AssertionError("unreachable: the loop returns or raises")


def _log():
    # Imported on the fallback only: logging (with threading, traceback, string) costs a
    # device start 0.6-0.75 MB and a few ms for a warning most starts never give.
    import logging

    return logging.getLogger("fedge.session")


def provider_of(session: ort.InferenceSession) -> str:
    """The execution provider a session really uses (the first it was given that loaded)."""
    return session.get_providers()[0]


def run(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The first output for ``x``, computed in batches."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: np.ascontiguousarray(x[i:i + batch_size])})[0]
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)
