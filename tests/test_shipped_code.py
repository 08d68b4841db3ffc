"""The code a saved checkpoint ships (the flat folder `save_pretrained` copies: modeling_variants.py and every sibling
it imports relatively, as Transformers' custom_object_save finds them) runs where this package is not installed: each
shipped file imports in a process where hf_neural_attention is blocked, importing only torch, transformers,
huggingface_hub, triton (optional) and its siblings; and every sibling a shipped file imports is shipped too."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hf_neural_attention as hfna
from conftest import tiny_llama

PACKAGE = Path(hfna.__file__).resolve().parent
# Top-level modules shipped code may import besides its siblings (the standard library is allowed too).
ALLOWED = {"torch", "transformers", "huggingface_hub", "triton"}

# Copies the shipped files into a package of another name and imports each one, with hf_neural_attention blocked.
IMPORT_EACH = textwrap.dedent(
    """
    import importlib, importlib.abc, json, os, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "hf_neural_attention":
                raise ImportError("hf_neural_attention is blocked in this process")

    sys.meta_path.insert(0, BlockPackage())
    folder, names = sys.argv[1], json.loads(sys.argv[2])
    sys.path.insert(0, folder)
    failures = {}
    for name in names:
        try:
            importlib.import_module("shipped." + name)
        except Exception as error:
            failures[name] = f"{type(error).__name__}: {error}"
    assert not any(name.split(".")[0] == "hf_neural_attention" for name in sys.modules)
    print("REPORT" + json.dumps(failures))
    """
)


def sibling_imports(path: Path) -> set[str]:
    """Every sibling module a file imports relatively, in any form (`from .x import y`, `from . import x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
    return found


def absolute_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint")
    hfna.convert(tiny_llama(), "neural").save_pretrained(folder)
    return folder


def test_every_sibling_a_shipped_file_imports_is_shipped(shipped):
    files = {path.stem: path for path in shipped.glob("*.py")}
    assert {"modeling_variants", "configuration_variants", "variant", "registry"} <= set(files)
    for name, path in files.items():
        assert path.read_text() == (PACKAGE / path.name).read_text(), f"{path.name} differs from the package's"
        missing = sibling_imports(path) - set(files)
        assert not missing, f"{path.name} imports {sorted(missing)}, which the checkpoint does not ship"
        outside = absolute_imports(path) - ALLOWED - set(sys.stdlib_module_names)
        assert not outside, f"{path.name} imports {sorted(outside)}: shipped code needs only {sorted(ALLOWED)}"


@pytest.mark.slow
def test_every_shipped_file_imports_where_the_package_is_blocked(shipped, tmp_path):
    package = tmp_path / "shipped"
    package.mkdir()
    (package / "__init__.py").write_text("")
    names = []
    for path in shipped.glob("*.py"):
        (package / path.name).write_text(path.read_text())
        names.append(path.stem)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH, str(tmp_path), json.dumps(sorted(names))],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.split("REPORT", 1)[1])
    assert not failures, failures
