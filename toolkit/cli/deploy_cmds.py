"""``fedge bundle`` and ``fedge wheelhouse``: from an export to an installable device."""
from __future__ import annotations

import argparse
from pathlib import Path

from toolkit import strategies
from toolkit.deploy.wheelhouse import TARGETS


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="one device's install bundle: fedge wheel, its "
                       "artifacts and signed manifest, config, systemd unit, install.sh")
    p.add_argument("--manifest", required=True, help="DIR/manifest.json of a signed export")
    p.add_argument("--device", required=True, help="the device's profile in the manifest")
    p.add_argument("--broker", required=True, help="mqtt[s]://host:port the device uses")
    p.add_argument("--job", required=True)
    p.add_argument("--id", help="device id (default: the profile's name)")
    p.add_argument("--strategy", default="fedavg", help="the job's strategy (one of "
                   f"{', '.join(strategies.names())}): torch is installed unless the "
                   "device only runs inference (ecofed)")
    p.add_argument("--signing-key", help="the Ed25519 key that signs the bundle's "
                   "SHA256SUMS, the one that signed the export (default: "
                   "$FEDGE_HOME/signing.key)")
    p.add_argument("--trust", help="the public key the manifest is signed with: the "
                   "signing key's (default: the .pub beside --signing-key)")
    p.add_argument("--credentials", help="DIR/credentials/<id>.json from `fedge secure init`")
    p.add_argument("--data", help="the device's .npz shard, shipped in the bundle")
    p.add_argument("--wheels", help="a wheelhouse (`fedge wheelhouse`) to ship and pin "
                   "by sha256, for devices that install offline")
    p.add_argument("--pin-wheels", help="a wheelhouse to pin by sha256 without shipping it "
                   "(install.sh --wheelhouse DIR, or the same wheels from PyPI)")
    p.add_argument("--out", required=True, help="BUNDLE.tar.gz")
    p.set_defaults(func=bundle)

    p = sub.add_parser("wheelhouse", help="download the third-party wheels a device "
                       "install needs, for the device's platform (uses the network)")
    p.add_argument("--target", default="host", help="the device platform: one of "
                   f"{', '.join(TARGETS)}")
    p.add_argument("--torch", action="store_true", help="also torch (devices that train)")
    p.add_argument("--out", required=True, help="folder for the wheels")
    p.set_defaults(func=wheelhouse)


def bundle(args: argparse.Namespace) -> int:
    from toolkit.deploy.bundle import BundleOptions, make_bundle

    opt = lambda v: Path(v) if v else None  # noqa: E731
    o = BundleOptions(manifest=Path(args.manifest), device=args.device, broker=args.broker,
                      job=args.job, id=args.id or args.device, out=Path(args.out),
                      strategy=args.strategy, trust=opt(args.trust),
                      signing_key=opt(args.signing_key), credentials=opt(args.credentials),
                      data=opt(args.data), wheels=opt(args.wheels),
                      pin_wheels=opt(args.pin_wheels))
    s = make_bundle(o)
    extra = f" + {s['third_party_wheel_bytes'] / 1e6:.1f} MB of third-party wheels" \
        if s["third_party_wheel_bytes"] else ""
    print(f"wrote {s['bundle']}: {s['bytes'] / 1e6:.2f} MB, {s['files']} files for "
          f"{s['device']} ({s['profile']}){extra}; torch: {'yes' if s['torch'] else 'no'}; "
          f"{s['pinned_wheels']} wheels pinned")
    print(f"signed by key {s['key_id']}; on the device: install.sh --fingerprint "
          f"{s['fingerprint']}")
    return 0


def wheelhouse(args: argparse.Namespace) -> int:
    from toolkit.deploy.wheelhouse import download

    wheels = download(args.target, args.out, torch=args.torch)
    mb = sum(w.stat().st_size for w in wheels) / 1e6
    print(f"{args.out}: {len(wheels)} wheels, {mb:.1f} MB for {args.target}")
    return 0
