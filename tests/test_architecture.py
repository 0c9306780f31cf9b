"""The package layers and the method registry, checked on the source itself.

Layers, each importing only from those below: ``triton_kernels`` <- ``calibrate`` <-
``sparseffn`` <- ``bench``/``scripts``. The library and its tests never import the benchmarks
or scripts (the benchmarks' own tests live under ``bench/``), and a method's name appears only
in its module under ``sparseffn/methods/``.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sparseffn
from sparseffn.methods import method_names

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("triton_kernels", "calibrate", "sparseffn", "bench", "scripts")


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    """Top-level packages a file imports (absolute imports, anywhere in the file)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _loaded_after(statement: str) -> list[str]:
    """Our top-level packages loaded in a fresh interpreter after running ``statement``."""
    code = (f"{statement}\nimport sys\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(LAYERS)!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_triton_kernels_loads_no_other_layer():
    assert _loaded_after("import triton_kernels") == ["triton_kernels"]


def test_calibrate_loads_no_sparseffn():
    modules = sorted(p.stem for p in (ROOT / "calibrate").glob("*.py") if p.stem != "__init__")
    loaded = _loaded_after("; ".join(f"import calibrate.{m}" for m in modules))
    assert "sparseffn" not in loaded and "bench" not in loaded, loaded


@pytest.mark.parametrize("layer,forbidden", [
    ("triton_kernels", {"calibrate", "sparseffn", "bench", "scripts"}),
    ("calibrate", {"sparseffn", "bench", "scripts"}),
    ("sparseffn", {"bench", "scripts"}),
    ("tests", {"bench", "scripts"}),
])
def test_imports_go_down_the_layers_only(layer, forbidden):
    bad = {str(p.relative_to(ROOT)): sorted(_imported_roots(p) & forbidden)
           for p in _python_files(layer) if _imported_roots(p) & forbidden}
    assert not bad, f"imports up the layers: {bad}"


def test_bench_is_not_installed_as_a_package():
    text = (ROOT / "setup.py").read_text()
    assert '"bench' not in text and "'bench" not in text


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_method_names_appear_only_in_their_modules():
    """No file outside sparseffn/methods/ names a method (config validation, CLI choices,
    artifact checks and defaults all read the registry)."""
    names = set(method_names())
    methods_dir = ROOT / "sparseffn" / "methods"
    bad = {}
    for path in _python_files("sparseffn", "calibrate", "triton_kernels"):
        if methods_dir in path.parents:
            continue
        hits = _string_constants(path) & names
        if hits:
            bad[str(path.relative_to(ROOT))] = sorted(hits)
    assert not bad, f"method names outside sparseffn/methods/: {bad}"


def test_readme_method_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- methods:begin -->", "<!-- methods:end -->"
    assert begin in readme and end in readme
    table = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    # In a fresh interpreter: tests may register criteria of their own in this one.
    built_in = subprocess.run([sys.executable, "-m", "sparseffn.methods"], capture_output=True,
                              text=True, timeout=300, cwd=ROOT)
    assert built_in.returncode == 0, built_in.stderr[-2000:]
    assert table == built_in.stdout.strip(), ("README's method table is stale: paste the output of "
                                      "`python -m sparseffn.methods` between its markers")


def test_public_api_exports_the_registry():
    assert sparseffn.method_names() == method_names()
    assert sparseffn.register_method is sparseffn.methods.register_method
