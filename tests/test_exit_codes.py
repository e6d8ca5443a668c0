"""README's exit-code table is the error classes' exit codes: every code a fedge error
can exit with has a row, and every row's code is one some error uses (or 0)."""
from __future__ import annotations

import importlib
import re

from device_runtime.errors import FedgeError
from testkit import ROOT
from tests.conftest import assert_one_line_error


def _all_errors() -> set[type]:
    for pkg in ("device_runtime", "exporters", "broker_server", "toolkit"):
        importlib.import_module(f"{pkg}.errors")
    seen, todo = set(), [FedgeError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
    return seen


def test_the_readme_table_lists_exactly_the_codes_errors_exit_with():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Exit codes"):].split("\n\n")[1]
    rows = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    used = {cls.exit_code for cls in _all_errors()}
    assert rows == used | {0}, (sorted(rows), sorted(used))


def test_unknown_names_are_usage_errors():
    from device_runtime.errors import EXIT_USAGE
    from toolkit.errors import UnknownDatasetError, UnknownModelError

    assert UnknownDatasetError.exit_code == UnknownModelError.exit_code == EXIT_USAGE


def test_the_issue_s_unknown_names_exit_2_from_the_cli(tmp_path, capsys):
    """Issue 27's two examples, through the CLI's own entry (in process: a subprocess
    each cost ~3 s of torch import in the quick tier): one line, exit 2."""
    from toolkit.cli.main import main

    code = main(["partition", "--dataset", "mnist1D", "--devices", "2",
                 "--out", str(tmp_path / "parts")])
    assert_one_line_error(code, capsys.readouterr().err, 2, "unknown dataset 'mnist1D'")
    code = main(["pretrain", "--dataset", "mnist1d", "--model", "resnet",
                 "--out", str(tmp_path / "m.safetensors")])
    assert_one_line_error(code, capsys.readouterr().err, 2, "unknown model 'resnet'")
    assert not (tmp_path / "parts").exists() and not (tmp_path / "m.safetensors").exists()
