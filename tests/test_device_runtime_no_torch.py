"""The device runtime imports and verifies artifacts and signatures without torch."""
import subprocess
import sys

from testkit.timing import scaled
from tests.conftest import ROOT

BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this device")
sys.meta_path.insert(0, _Block())
"""


def test_import_device_runtime_without_torch(fleet_export, export_key):
    code = BLOCK_TORCH + f"""
import device_runtime, device_runtime.manifest, device_runtime.session, device_runtime.signing
import device_runtime.config, device_runtime.credentials
from device_runtime.manifest import load_manifest
from device_runtime.preflight import check_device
from device_runtime.signing import verify_manifest
pub = {str(export_key.public_path)!r}
assert verify_manifest({str(fleet_export)!r}, pub) == {export_key.key_id!r}
m = load_manifest({str(fleet_export)!r}, trust=pub)
assert m.key_id == {export_key.key_id!r}
assert m.verify_all() > 0
assert check_device({str(fleet_export)!r}, "rpi4", pub).artifacts > 0
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was importable")
assert "torch" not in sys.modules
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=scaled(120))
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
