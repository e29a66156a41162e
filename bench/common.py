"""What every benchmark here shares: the load average to print beside each figure, and the
one-line JSON result (printed, and appended to --json FILE when given)."""

from __future__ import annotations

import json
import os


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def emit(result: dict, json_path: str | None) -> None:
    line = json.dumps(result)
    print(line)
    if json_path:
        with open(json_path, "a") as f:
            f.write(line + "\n")
