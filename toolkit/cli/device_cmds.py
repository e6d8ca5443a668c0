"""``fedge infer``: run a device's verified artifact on a .npy array.

``--trust PUBKEY`` is required (or ``--no-verify``, said out loud): the
manifest's signature is verified before it is read, its version is checked
against the newest this machine accepted for its job (``device_runtime.rollback``),
and every artifact is checked against the manifest's sha256 on the bytes that
are loaded. The summary names the ONNX Runtime execution provider really in use.

Runs on a device with only ``fedge[device]`` installed: everything it needs is
imported inside the command from ``device_runtime`` (numpy and onnxruntime),
never torch nor the rest of the toolkit.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="predict labels for a .npy array with a device's "
                       "exported model (no torch needed)")
    p.add_argument("--manifest", required=True, help="DIR/manifest.json of an export")
    p.add_argument("--device", required=True, help="device profile in the manifest")
    trust = p.add_mutually_exclusive_group()
    trust.add_argument("--trust", metavar="PUBKEY", help="public key (PEM) the manifest must "
                       "be signed with; a missing, foreign or broken signature, or an export "
                       "older than one accepted here, exits 6 (required, or --no-verify)")
    trust.add_argument("--no-verify", action="store_true", help="run an unsigned export: "
                       "its sha256 values then prove nothing about who wrote them")
    p.add_argument("--job", help="with --trust: refuse an export made for another job")
    p.add_argument("--allow-rollback", action="store_true", help="with --trust: accept an "
                   "export older than the newest accepted here, and record its version")
    p.add_argument("--input", required=True, help=".npy array, (N, *sample_shape)")
    p.add_argument("--output", help=".npy file for the labels (int64) or --logits "
                   "(float32); without it a summary is printed")
    p.add_argument("--precision", default="fp32", help="fp32 or int8")
    p.add_argument("--logits", action="store_true", help="write logits instead of labels")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--bases", type=int, help="SplitMix: run the first K bases")
    size.add_argument("--budget-ms", type=float, help="SplitMix: the most bases that run "
                      "within X ms per sample (latencies measured at load)")
    size.add_argument("--budget-mb", type=float, help="SplitMix: the most bases whose "
                      "models fit in Y MB")
    p.set_defaults(func=infer)


def load_npy(path: str | Path):
    """The array in ``path``, or InputArrayError naming the file and what is wrong."""
    import numpy as np

    from device_runtime.errors import InputArrayError
    from device_runtime.files import read_bytes

    path = Path(path)
    if not path.is_file():
        why = "not a file" if path.exists() else "no such file"
        raise InputArrayError(f"--input {path}: {why}")
    # Sniff the magic bytes ourselves: numpy's messages for a file that is not
    # .npy talk about pickles and differ between numpy versions.
    magic = read_bytes(path, "--input", InputArrayError, at_most=6)
    if magic[:4] == b"PK\x03\x04":
        raise InputArrayError(f"--input {path}: expected a .npy array, got a .npz archive")
    if magic != b"\x93NUMPY":
        raise InputArrayError(f"--input {path}: not a .npy array (no .npy header)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputArrayError(f"--input {path}: {_load_failure(e)}") from None


def _load_failure(e: Exception) -> str:
    msg = " ".join(str(e).split())  # the CLI prints one line
    if "pickle" in msg.lower() or "object" in msg.lower():
        # with a valid .npy header, the only pickled payload is an object array
        return "an object array (needs pickle), which is refused"
    return f"not a readable .npy array ({msg or type(e).__name__})"


def infer(args: argparse.Namespace) -> int:
    from device_runtime.threads import one_blas_thread

    one_blas_thread()  # before numpy is imported: numpy computes nothing here (start-up)
    import numpy as np

    from device_runtime.errors import TrustError
    from device_runtime.predictor import Predictor
    from device_runtime.rollback import ExportPolicy

    if args.trust is None and not args.no_verify:
        raise TrustError("--trust PUBKEY is required: without a trusted key anyone can "
                         "rewrite the manifest's sha256 values (--no-verify runs it anyway)")
    if args.trust is None and (args.job or args.allow_rollback):
        raise TrustError("--job and --allow-rollback need --trust (an unsigned manifest's "
                         "job and version prove nothing)")
    x = load_npy(args.input)
    pred = Predictor.from_manifest(args.manifest, args.device, args.precision,
                                   trust=args.trust,
                                   policy=ExportPolicy(args.job, args.allow_rollback),
                                   samples=_samples(x))
    if args.bases is not None or args.budget_ms is not None or args.budget_mb is not None:
        pred.set_budget(bases=args.bases, ms=args.budget_ms, mb=args.budget_mb)
    if pred.fallbacks:  # one line, however many: the manifest has each one's reason
        agree = ", ".join(f"{a.path} {a.int8_fallback.get('top1_agreement', 0):.4f}"
                          for a in pred.fallbacks)
        print(f"warning: {len(pred.fallbacks)} of {len(pred.artifacts)} models run fp32 "
              f"in the int8 slot (their int8 copies failed parity; top-1 agreement: "
              f"{agree}; reasons in the manifest's int8_fallback)", file=sys.stderr)
    t0 = time.perf_counter()
    logits = pred.predict_logits(x)
    ms = (time.perf_counter() - t0) * 1000 / len(logits)
    labels = logits.argmax(axis=1).astype(np.int64)
    if args.output:
        out = logits if args.logits else labels
        _save(args.output, out)
        print(f"wrote {args.output}: {'logits' if args.logits else 'labels'} "
              f"{out.dtype} {tuple(out.shape)}")
    values, counts = np.unique(labels, return_counts=True)
    spread = " ".join(f"{v}:{c}" for v, c in zip(values.tolist(), counts.tolist()))
    what = pred.artifact.path if len(pred.sessions) == 1 else \
        f"{pred.active} of {len(pred.sessions)} bases"
    print(f"{len(labels)} samples on {args.device} ({what}, {pred.provider}): "
          f"{ms:.4f} ms per sample")
    if pred.manifest.key_id:
        print(f"manifest signature verified (key {pred.manifest.key_id}), export version "
              f"{pred.manifest.version} for {_job(pred.manifest.job)}")
    else:
        print("manifest NOT verified (--no-verify)")
    print(f"labels {spread}")
    return 0


def _samples(x) -> int:
    """How many samples ``x`` holds, at most: one sample may come without its batch axis
    (then its first axis is counted, which only errs toward more threads)."""
    return len(x) if x.ndim > 1 else 1


def _job(job: str | None) -> str:
    return f"job {job}" if job else "no job"


def _save(path: str, array) -> None:
    import numpy as np

    from toolkit.errors import UsageError  # light: only device_runtime.errors underneath

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object, so numpy does not append ".npy"
            np.save(f, array, allow_pickle=False)
    except OSError as e:
        raise UsageError(f"--output {path}: cannot write ({e.strerror or e})") from None
