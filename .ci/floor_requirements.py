"""Prints the lowest versions pyproject.toml allows for the library's dependencies, one pin per line, for the CI job
that tests against them (`make test-floor`). torch is the exception: its floor (>= 2.4, Transformers' own) would be a
multi-GB CUDA build from PyPI, so the job pins the CPU build this project's machines have (TORCH below); the job
therefore tests the floors of transformers, huggingface_hub and safetensors, with torch 2.13."""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    sys.exit("make test-floor reads pyproject.toml with tomllib: run it with Python >= 3.11 (PYTHON=python3.11)")

TORCH = "torch==2.13.0"


def floor_pins(pyproject: Path) -> list[str]:
    pins = []
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(,.*)?", requirement)
        if match is None:
            sys.exit(f"no lower bound to test in dependency {requirement!r}")
        name, lowest = match.group(1), match.group(2)
        pins.append(TORCH if name == "torch" else f"{name}=={lowest}")
    return pins


if __name__ == "__main__":
    print("\n".join(floor_pins(Path(__file__).resolve().parents[1] / "pyproject.toml")))
