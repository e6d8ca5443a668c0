"""The device runtime imports and verifies artifacts on a machine without torch."""
import subprocess
import sys

from tests.conftest import ROOT

BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this device")
sys.meta_path.insert(0, _Block())
"""


def test_import_device_runtime_without_torch(fleet_export):
    code = BLOCK_TORCH + f"""
import device_runtime, device_runtime.manifest, device_runtime.session, device_runtime.credentials
from device_runtime.manifest import load_manifest
m = load_manifest({str(fleet_export)!r})
assert m.verify_all() > 0
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
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
