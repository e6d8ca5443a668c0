"""What ``fedge demo`` shows at the end: the variant each profile of its fleet gets,
and its traffic beside what FedAvg with fp32 both ways would have sent.

The fp32 figure is computed, not run: the size of the model's fp32 wire frame (the
run's own final weights, encoded as a round's model is) times the frames FedAvg
sends, one model down to every device assigned a task and one model up from every
device that reported, round by round as this run's records count them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from device_runtime import wire


@dataclass(frozen=True)
class Traffic:
    sent: int  # bytes this run's frames carried, up and down
    fp32: int  # what FedAvg with fp32 both ways would have sent in the same rounds

    @property
    def ratio(self) -> float:
        return self.fp32 / self.sent if self.sent else float("inf")


def fp32_frame_bytes(job: str, weights: dict) -> int:
    """The size of one signed fp32 model frame of ``weights``, as a round sends it."""
    from device_runtime.keys import Signer

    frame = wire.Frame("model", job, 1, "server", "fp32", weights, nonce="0" * 32)
    return len(wire.encode(frame, signer=Signer.generate()))


def traffic(history: list[dict], model_bytes: int) -> Traffic:
    """This run's bytes against FedAvg fp32's, from the rounds' records."""
    sent = sum(r["uplink_bytes"] + r["downlink_bytes"] for r in history)
    fp32 = sum((r["devices_assigned"] + r["devices_reporting"]) * model_bytes
               for r in history)
    return Traffic(sent, fp32)


def traffic_line(t: Traffic, codec: str, downlink: str, rounds: int, accuracy: float) -> str:
    mb = 1e6
    return (f"traffic: {t.sent / mb:.1f} MB sent ({codec} up, {downlink} down) over "
            f"{rounds} rounds, final accuracy {accuracy:.4f}; FedAvg with fp32 both ways "
            f"would have sent {t.fp32 / mb:.1f} MB for the same rounds: {t.ratio:.1f}x less")


def variant_rows(manifest_path: Path, shared: dict[str, str] | None = None) -> list[dict]:
    """One row per profile: its plan and its artifacts as measured in ONNX Runtime
    when they were exported (``parity``); ``shared``: profile -> the exported profile
    whose variant it gets (the row names it in ``same_as``)."""
    from device_runtime.manifest import load_manifest

    m = load_manifest(manifest_path)
    size = lambda a: (Path(manifest_path).parent / a.path).stat().st_size / 1024  # noqa: E731
    rows = []
    for name, dev in m.devices.items():
        full = dev.serving("full", "fp32") or dev.artifacts[0]
        q = dev.serving(full.role, "int8", full.index, ("onnx",))
        int8 = None if q is None or q.int8_fallback else q
        rows.append({"profile": name, "prune_ratio": dev.plan["prune_ratio"],
                     "params": full.params, "macs": full.macs,
                     "fp32_kb": round(size(full), 1),
                     "int8_kb": round(size(int8), 1) if int8 else None,
                     "accuracy_fp32": full.parity.get("accuracy"),
                     "accuracy_int8": int8.parity.get("accuracy") if int8 else None,
                     "same_as": None})
    by_name = {r["profile"]: r for r in rows}
    return [dict(by_name[rep], profile=name, same_as=None if rep == name else rep)
            for name, rep in (shared or {r["profile"]: r["profile"] for r in rows}).items()]


def variant_lines(rows: list[dict]) -> list[str]:
    out = ["variant per profile (fedge export; accuracy measured in ONNX Runtime):"]
    for r in rows:
        if r["same_as"]:
            out.append(f"  {r['profile']:17s} the same variant as {r['same_as']}")
            continue
        int8 = (f"int8 {r['int8_kb']:.0f} KB acc {r['accuracy_int8']:.4f}"
                if r["int8_kb"] is not None else "int8 -")
        out.append(f"  {r['profile']:17s} pruned {100 * r['prune_ratio']:3.0f}%  "
                   f"{r['params']:>7,} params  {r['macs']:>8,} MACs  fp32 {r['fp32_kb']:.0f} KB "
                   f"acc {r['accuracy_fp32']:.4f}  {int8}")
    return out
