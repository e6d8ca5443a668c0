"""What every benchmark shares: the machine line, the command line, the code version,
writing results (every JSON records the code it ran: ``code``)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"


def command(script: str) -> str:
    return " ".join(["python", script, *sys.argv[1:]])


def code_version() -> str:
    """The commit the bench ran (``+dirty`` with uncommitted changes to tracked files);
    ``unknown`` outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def write_results(res: dict, json_path: str, md_path: str | None,
                  to_markdown: Callable[[dict], str]) -> None:
    """JSON always (with the code version), the markdown table when asked; the table is
    printed too."""
    res.setdefault("code", code_version())
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(res, indent=1))
    table = to_markdown(res)
    if md_path:
        Path(md_path).write_text(table)
    print(table)
