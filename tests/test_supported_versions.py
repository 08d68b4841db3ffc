"""The CI floor job (`make test-floor`, run by .ci/run) installs exactly the lower bounds pyproject states for the
library's dependencies (torch excepted, and said so), and the README states the same versions."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from conftest import load_repo_file

REPO = Path(__file__).resolve().parents[1]


def floor_module():
    return load_repo_file(".ci/floor_requirements.py", "floor_requirements")


def test_the_floor_job_pins_every_lower_bound_of_pyproject():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = dict(re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d).groups() for d in dependencies)
    pins = dict(pin.split("==") for pin in floor_module().floor_pins(REPO / "pyproject.toml"))
    assert pins.keys() == bounds.keys()
    for name, lowest in bounds.items():
        assert pins[name] == ("2.13.0" if name == "torch" else lowest), name
    readme = (REPO / "README.md").read_text()
    for name in ("transformers", "huggingface_hub", "safetensors"):
        assert f"{name} ≥ {bounds[name]}" in readme, name


def test_ci_runs_the_readme_test_command_and_the_floor_job():
    commands = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert "make test" in commands and "make test-floor" in commands
    assert commands.index("make test") < commands.index("make test-floor")
