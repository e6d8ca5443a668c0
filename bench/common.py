"""What every benchmark shares: the machine line, the command line, writing results."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Callable


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"


def command(script: str) -> str:
    return " ".join(["python", script, *sys.argv[1:]])


def write_results(res: dict, json_path: str, md_path: str | None,
                  to_markdown: Callable[[dict], str]) -> None:
    """JSON always, the markdown table when asked; the table is printed too."""
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(res, indent=1))
    table = to_markdown(res)
    if md_path:
        Path(md_path).write_text(table)
    print(table)
