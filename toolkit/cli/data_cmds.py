"""``fedge profiles`` and ``fedge partition``."""
from __future__ import annotations

import argparse
import json


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profiles", help="list the device profiles")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--profiles-file", help="TOML file adding or overriding profiles")
    p.set_defaults(func=profiles)

    p = sub.add_parser("partition", help="split a dataset non-IID over devices")
    p.add_argument("--dataset", required=True,
                   help="mnist1d, mnist1d:N (N samples), digits or a .npz file")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--classes-per-device", type=int, default=None,
                   help="instead of Dirichlet: this many classes per device")
    p.add_argument("--public-fraction", type=float, default=0.1,
                   help="share of the training set kept as the server's public split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=partition)


def profiles(args: argparse.Namespace) -> int:
    from toolkit.planning.profiles import ProfileCatalogue

    cat = ProfileCatalogue.load(args.profiles_file)
    rows = [p.to_json() for p in cat.profiles.values()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ["name", "ram_mb", "gflops", "uplink_kbps", "downlink_kbps", "int8_dot",
            "ort_version", "max_opset", "accelerator"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))
    return 0


def partition(args: argparse.Namespace) -> int:
    from toolkit.model import datasets
    from toolkit.model.partition import write_partition

    ds = datasets.load(args.dataset)
    summary = write_partition(ds, args.out, args.devices, args.seed, args.alpha,
                              args.classes_per_device, args.public_fraction)
    sizes = [d["samples"] for d in summary["devices"]]
    print(f"wrote {len(sizes)} device shards ({min(sizes)}..{max(sizes)} samples) and "
          f"server.npz ({summary['public_samples']} public samples) to {args.out}")
    return 0
