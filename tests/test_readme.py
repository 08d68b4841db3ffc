"""The README's quickstart block runs offline exactly as written, so the README cannot drift from the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- quickstart -->"


def quickstart_block() -> str:
    text = (REPO / "README.md").read_text()
    assert text.count(MARKER) == 1, "README.md must mark exactly one quickstart block with " + MARKER
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.S)
    assert match, "the quickstart marker must be followed by a ```python block"
    return match.group(1)


def test_quickstart_comes_after_install_and_before_the_guide():
    headings = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("## ")]
    assert headings[:3] == ["## Install", "## Quickstart", "## Converting a model"], headings[:3]
    assert headings.index("## Research record") > headings.index("## Training and evaluation")


def test_no_python_snippet_loads_from_the_hub_without_saying_so():
    text = (REPO / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if re.search(r"from_pretrained\(\s*\"gpt2\"", line):
                assert "needs the Hub" in line, line


@pytest.mark.slow
def test_quickstart_runs_offline(tmp_path):
    code = quickstart_block()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "VariantGPT2LMHeadModel neural" in result.stdout
    assert (tmp_path / "quickstart-model" / "config.json").is_file()
    assert (tmp_path / "quickstart-model" / "modeling_variants.py").is_file()
