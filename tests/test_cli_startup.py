"""A device command builds only its own parser: ``fedge infer`` and ``fedge device`` load
neither the strategy table nor broker_server (nor onnxruntime before they need it), and
every subcommand is registered with the module that defines it. ``fedge infer`` loads no
OpenSSL (hashlib's; cryptography's once the signature is remembered), nor logging, and
starts no OpenBLAS pool."""
import os
import subprocess
import sys

from device_runtime.errors import EXIT_DATA
from testkit.timing import scaled
from tests.conftest import ROOT
from tests.test_device_runtime_no_torch import BLOCK_TORCH
from toolkit.cli.main import MODULES, build_parser


def _subcommands(parser) -> set[str]:
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


def test_every_subcommand_is_registered_with_its_module():
    assert _subcommands(build_parser()) == set(MODULES)
    for command, module in MODULES.items():
        assert command in _subcommands(build_parser(command)), (command, module)


def test_device_commands_import_no_server_module():
    code = BLOCK_TORCH + """
from toolkit.cli.main import build_parser
build_parser("infer").parse_args(["infer", "--manifest", "m", "--device", "d", "--input", "x",
                                  "--no-verify"])
build_parser("device").parse_args(["device", "--check"])
heavy = sorted(m for m in sys.modules if m.startswith(("toolkit.strategies", "broker_server",
                                                        "onnxruntime", "toolkit.cli.field")))
print(heavy)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=scaled(120))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", p.stdout


def test_infer_loads_no_openssl_nor_logging_nor_a_blas_pool(fleet_export, export_key,
                                                                    tmp_path):
    """Through the console script: its quick exit still runs the atexit handlers and
    flushes, and skips the teardown (a module global's __del__ is not called)."""
    import numpy as np

    x = tmp_path / "one.npy"
    np.save(x, np.zeros((1, 40), np.float32))
    code = BLOCK_TORCH + """
import atexit, os
atexit.register(lambda: print(sorted(m for m in sys.modules if m in (
    "hashlib", "_hashlib", "logging", "cryptography")), os.environ.get("OPENBLAS_NUM_THREADS")))
class _Teardown:
    def __del__(self):
        os.write(1, b"teardown ran\\n")
kept = _Teardown()
from toolkit.cli.main import console
sys.exit(console())
"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS")}
    env["FEDGE_HOME"] = str(tmp_path / "home")
    args = ["infer", "--manifest", str(fleet_export), "--device", "rpi4",
            "--trust", str(export_key.public_path), "--input"]
    # The first start checks the signature (cryptography); the next ones remember it.
    for loaded in ("['cryptography'] 1", "[] 1", "[] 1"):
        p = subprocess.run([sys.executable, "-c", code, *args, str(x)], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=scaled(120))
        assert p.returncode == 0, p.stderr
        assert "manifest signature verified" in p.stdout
        assert p.stdout.strip().splitlines()[-1] == loaded, p.stdout
        assert "teardown ran" not in p.stdout
    p = subprocess.run([sys.executable, "-c", code, *args, str(tmp_path / "none.npy")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=scaled(120))
    assert p.returncode == EXIT_DATA and "no such file" in p.stderr, (p.returncode, p.stderr)


def test_the_quick_exit_waits_for_a_running_thread():
    code = """import sys, threading, time
from toolkit.cli import main as cli
t = threading.Thread(target=time.sleep, args=(0.5,))
t.start()
cli._quick_exit(3)
print("ordinary exit")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=scaled(60))
    assert p.returncode == 0 and p.stdout.strip() == "ordinary exit", (p.returncode, p.stderr)


def test_the_parser_does_not_import_shutil():
    # -S: this machine's site may import shutil itself; the parser needs only the stdlib
    code = f"""import sys
sys.path.insert(0, {str(ROOT)!r})
from toolkit.cli.main import build_parser
build_parser("infer").parse_args(["infer", "--manifest", "m", "--device", "d", "--input", "x",
                                  "--no-verify"])
print("shutil" in sys.modules)
"""
    p = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       timeout=scaled(60))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"
