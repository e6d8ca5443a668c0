"""A device command builds only its own parser: ``fedge infer`` and ``fedge device`` load
neither the strategy table nor broker_server (nor onnxruntime before they need it), and
every subcommand is registered with the module that defines it."""
import subprocess
import sys

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
