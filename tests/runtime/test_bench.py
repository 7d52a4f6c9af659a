"""`edge-spade bench` on the tiny generated model: every mode for real, the JSON with and without
energy (a fake RAPL counter and a fake battery that move while it runs), the refusals."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from edge_spade.bench import report
from edge_spade.bench.run import SCHEMA, BenchError, BenchSettings, load_bench, run_bench
from edge_spade.cli import main
from tests.support.heads import free_items, items
from tests.support.sysfs import battery_tree, rapl_tree, write

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    """Choice and free questions in the tiny vocabulary, as an `ask --file` JSONL."""
    path = tmp_path_factory.mktemp("bench") / "questions.jsonl"
    rows = [{"id": q.id, "question": q.question, "choices": list(q.choices)} for q in items(4)]
    rows += [{"id": q.id, "question": q.question} for q in free_items()[:4]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def settings(tiny_model, tiny_heads, questions, **kwargs) -> BenchSettings:
    base = dict(
        model=str(tiny_model[0]), heads=str(tiny_heads), set=str(questions), n=6, warmup=1, rss=False, progress=False
    )
    return BenchSettings(**(base | kwargs))


class Counter(threading.Thread):
    """A sensor file that moves while the benchmark runs, like the kernel's."""

    def __init__(self, path: Path, start: int, step: int, wrap: int | None = None) -> None:
        super().__init__(daemon=True)
        self.path, self.value, self.step, self.wrap = path, start, step, wrap
        self.moved = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.002):
            self.value += self.step
            self.moved += abs(self.step)
            if self.wrap is not None and self.value >= self.wrap:
                self.value -= self.wrap
            write(self.path, self.value)


def test_all_three_modes_for_real(tiny_model, tiny_heads, questions):
    result = run_bench(settings(tiny_model, tiny_heads, questions, rss=True, energy="none"))
    assert result["schema"] == SCHEMA
    assert list(result["modes"]) == ["full", "exit", "llama-cpp"]
    assert result["questions"] == {"set": str(questions), "distinct": 8, "answered": 6}
    assert len(result["records"]) == 18 and not result["interrupted"]
    for stats in result["modes"].values():
        assert stats["answers"] == 6
        assert stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
        assert stats["cpu_s_per_answer"] > 0 and stats["peak_rss_mb"] > 0
        assert stats["energy_j_per_answer"] is None
    assert result["modes"]["full"]["agreement_with_full"] == 1.0
    assert 0 <= result["modes"]["exit"]["exit_share"] <= 1
    # llama-cpp-python reads the same file: its free answers are the full model's next tokens
    full = {r["id"]: r["decision"] for r in result["records"] if r["id"].startswith("f") and r["mode"] == "full"}
    theirs = {r["id"]: r["decision"] for r in result["records"] if r["id"].startswith("f") and r["mode"] == "llama-cpp"}
    assert full and theirs == full
    assert result["energy"] == {
        "source": None,
        "detail": None,
        "unavailable": "not measured (--energy none)",
        "schedule": "per answer",
    }
    prov = result["provenance"]
    assert prov["models"][0]["model_sha256"] and prov["cpus"] and prov["llama_cpp_python"]
    assert set(result["by_kind"]) == {"choice", "free"}
    json.dumps(result)  # JSON-ready as it is


def test_energy_per_answer_from_rapl(tiny_model, tiny_heads, questions, tmp_path):
    powercap = rapl_tree(tmp_path / "class" / "powercap", package_uj=9_000_000)
    counter = Counter(powercap / "intel-rapl:0" / "energy_uj", 9_000_000, step=1_000, wrap=10_000_000)
    counter.start()
    try:
        result = run_bench(
            settings(tiny_model, tiny_heads, questions, energy="rapl", sysfs=str(tmp_path), modes=("full", "exit"))
        )
    finally:
        counter.done.set()
        counter.join()
    assert result["energy"]["source"] == "rapl" and result["energy"]["unavailable"] is None
    per_answer = [r["joules"] for r in result["records"]]
    assert all(j >= 0 for j in per_answer)
    assert 0 < sum(per_answer) <= counter.moved / 1e6  # wraps included, nothing counted twice
    for stats in result["modes"].values():
        assert stats["energy_j_per_answer"] >= 0
    md = report.markdown(result)
    assert "RAPL via zeus" in md and "| exit |" in md


def test_battery_blocks(tiny_model, tiny_heads, questions, tmp_path):
    battery_tree(tmp_path / "class" / "power_supply")
    counter = Counter(tmp_path / "class" / "power_supply" / "BAT0" / "energy_now", 30_000_000, step=-100)
    counter.start()
    try:
        result = run_bench(
            settings(tiny_model, tiny_heads, questions, n=None, duration=0.6, energy="battery", sysfs=str(tmp_path))
        )
    finally:
        counter.done.set()
        counter.join()
    assert result["energy"]["source"] == "battery" and result["energy"]["schedule"] == "blocks"
    assert [b["mode"] for b in result["blocks"]] == ["full", "exit", "llama-cpp"] * 3
    for mode, stats in result["modes"].items():
        assert stats["answers"] == sum(b["answers"] for b in result["blocks"] if b["mode"] == mode)
        assert stats["energy_j_per_answer"] > 0 and "battery_pct_per_1000" in stats


def test_refusals_before_loading(tiny_model, tiny_heads, questions, tmp_path):
    battery_tree(tmp_path / "class" / "power_supply", mains=True)
    on_ac = dict(energy="battery", n=None, duration=1.0, sysfs=str(tmp_path))
    with pytest.raises(BenchError, match="mains power.*--allow-ac"):
        load_bench(settings(tiny_model, tiny_heads, questions, **on_ac))
    for wrong, message in [
        (dict(n=3, duration=2.0), "not both"),
        (dict(n=0), "at least 1"),
        (dict(modes=("exit", "llama-cpp")), "must include full"),
        (dict(modes=("full", "fast")), "modes must be"),
        (dict(energy="battery"), "needs --duration"),
        (dict(set="no-such-set"), "neither a question set"),
    ]:
        with pytest.raises(BenchError, match=message):
            load_bench(settings(tiny_model, tiny_heads, questions, **wrong))


def test_on_mains_with_allow_ac_reports_no_energy(tiny_model, tiny_heads, questions, tmp_path):
    battery_tree(tmp_path / "class" / "power_supply", mains=True)
    result = run_bench(
        settings(
            tiny_model,
            tiny_heads,
            questions,
            n=None,
            duration=0.3,
            energy="battery",
            allow_ac=True,
            sysfs=str(tmp_path),
            modes=("full",),
        )
    )
    assert result["energy"]["source"] is None and "on mains power" in result["energy"]["unavailable"]
    assert result["modes"]["full"]["energy_j_per_answer"] is None and result["modes"]["full"]["answers"] > 0


def test_cli(tiny_model, tiny_heads, questions, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["bench", "--model", str(tiny_model[0]), "--heads", str(tiny_heads), "--set", str(questions)]
    code = main([*args, "--n", "3", "--modes", "full", "exit", "--energy", "none", "--no-rss", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "p50 ms" in printed.out and "energy: not measured" in printed.out
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-tiny-llama.json", "bench-tiny-llama.md", "bench-tiny-llama.png"]
    saved = json.loads((out / "bench-tiny-llama.json").read_text())
    assert saved["provenance"]["command"].startswith("edge-spade bench") and saved["modes"]["exit"]["answers"] == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine"}\n{"choices": ["a", "b"]}\n')
    for extra, message in [
        (["--set", str(bad)], "line 2: expected"),
        (["--set", "nope"], "neither a question set"),
        (["--energy", "battery"], "needs --duration"),
    ]:
        code = main(["bench", "--model", str(tiny_model[0]), *extra, "--no-rss"])
        err = capsys.readouterr().err
        assert code == 1 and message in err and "Traceback" not in err


def test_provenance_marks_changed_code_dirty_but_not_written_results(tmp_path):
    import subprocess

    from edge_spade.bench.provenance import git_commit

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "init", "--allow-empty")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "files")
    clean = git_commit(tmp_path)
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"new": 1}\n')  # an earlier benchmark's output
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "-dirty"
