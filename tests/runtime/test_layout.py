"""The two stages stay apart: the runtime imports nothing of the converter or its dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import edge_spade

RUNTIME = Path(edge_spade.__file__).parent
CONVERT_ONLY = {"onnx", "safetensors", "ml_dtypes"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included), made absolute."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "edge_spade." * (node.level > 0) + (node.module or "")
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_runtime_modules_import_nothing_from_the_converter():
    files = sorted(RUNTIME.glob("*.py"))
    assert len(files) > 10
    for path in files:
        imports = imported_modules(path)
        assert not {m for m in imports if m.startswith("edge_spade.convert")}, path.name
        assert not {m.split(".")[0] for m in imports} & CONVERT_ONLY, path.name


def test_answering_loads_no_converter_dependency(tiny_model):
    code = (
        f"import sys; from edge_spade import load_model; rt = load_model({str(tiny_model[0])!r}, n_ctx=64); "
        "rt.ask('the sky is', ['blue', 'wet']); rt.ask('the sky is'); rt.close(); "
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(CONVERT_ONLY)!r} "
        "or m.startswith('edge_spade.convert')); print(loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_converter_commands_without_the_extra_say_what_to_install(tmp_path):
    """With onnx unimportable, `calibrate` is one line naming the pip command and exit 1, no traceback."""
    code = (
        "import sys; sys.modules['onnx'] = None; from edge_spade.cli import main; "
        f"sys.exit(main(['calibrate', '--data', 'x.jsonl', '--out', {str(tmp_path / 'h')!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "edge-spade: error: this command needs the converter's dependencies (onnx is "
        "missing); run: pip install 'edge-spade[convert]'"
    )


def test_results_md_and_the_readme_table_are_generated_from_the_result_files():
    """benchmarks/RESULTS.md and the README's table are what `python -m benchmarks.report` makes of the
    committed result JSON (every one with provenance): the text cannot drift from the data."""
    from benchmarks import report

    assert report.load_results(), "no result files"
    assert report.main(["--check"]) == 0, "run: python -m benchmarks.report"
