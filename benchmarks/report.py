"""benchmarks/RESULTS.md and the README's results table, generated from the result JSON files.

    python -m benchmarks.report            # rewrite RESULTS.md and the README table from benchmarks/results/*.json
    python -m benchmarks.report --check    # exit 1 if either is out of date (a test runs this)

Only results with provenance are used; the text is made from the numbers, so it cannot drift
from them. Each exit result contributes its shipped rule (`spade-exit`), the cost of checks that
never exit (`never-exit`) and the oracle (every prompt at its earliest agreeing layer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_spade.bench import report as bench_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
README = ROOT / "README.md"
START, END = "<!-- results:start (python -m benchmarks.report) -->", "<!-- results:end -->"


def load_results(folder: Path = RESULTS) -> list[tuple[Path, dict]]:
    """Exit results with provenance, in a stable order (model, then file name)."""
    out = []
    for path in sorted(folder.glob("exit-*.json")):
        if path.name.startswith("exit-frontier-"):  # benchmarks/exit_frontier.py: modelled bounds, its own section
            continue
        result = json.loads(path.read_text())
        if "provenance" not in result:
            raise SystemExit(f"{path.relative_to(ROOT)} has no provenance: rerun it, or delete it")
        out.append((path, result))
    return sorted(out, key=lambda pr: (pr[1]["model"], pr[0].name))


def prompts(row: dict) -> str:
    name = Path(row["data"]).stem
    if name == "facts":
        return f"cloze facts, {row['few_shot']}-shot"
    if name == "cloze-broad-test":
        return f"unseen test facts, {row['few_shot']}-shot"
    return {"ARC-Easy-Test": "ARC-Easy test", "dev": "BoolQ dev"}.get(name, name)


def _formats_facts(r: dict) -> str:
    """Which facts a formats check asked."""
    if r.get("data") == "cloze-broad-test.jsonl":
        return "unseen test facts (asked once every choice was made)"
    return "calibration-side facts (never the test split)"


def rule(row: dict) -> str:
    """The rule a row ran, in words."""
    if row["signal"] == "cascade":
        probe, tau = row["probe_layers"], row["probe_threshold"]
        at = f"{'probes' if len(probe) > 1 else 'a probe'} at layer {', '.join(map(str, probe))} ({tau:.3g} nats)"
        at = at if probe else ""
        if row["threshold"] < 0:  # the heads never exit: the probe alone
            return f"{at or 'no exit'}, K={row['tail_k']}"
        layers = ", ".join(map(str, row["eval_layers"]))
        then = f", then {at}" if at else ""
        return f"L-SPADE at layer {layers} ({row['threshold']:.3g} nats){then}, K={row['tail_k']}"
    if row["threshold"] < 0:
        return "full depth (no exit certified)"
    where = "probe" if row["signal"] == "spade" else "L-SPADE"
    layers = ", ".join(map(str, row["eval_layers"]))
    return f"{where} K={row['tail_k']} at layer {layers}, {row['threshold']:.3g} nats"


def shipped_rows(result: dict) -> list[tuple[dict, dict | None]]:
    """(the shipped rule's row, the never-exit row) per data set."""
    rows = result["rows"]
    out = []
    for row in rows:
        if row["method"] == "spade-exit":
            never = next((r for r in rows if r["method"] == "never-exit" and r["data"] == row["data"]), None)
            out.append((row, never))
    return out


def summary_table(results: list[tuple[Path, dict]]) -> str:
    lines = [
        "| model | prompts | n | agreement (kappa) | constant answer | exits | median speedup | total speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, result in results:
        for row, _ in shipped_rows(result):
            lines.append(
                f"| {result['model']} | {prompts(row)} | {row['n']} | {row['agreement']:.3f} ({row['kappa']:.3f}) | "
                f"{row['constant_agreement']:.3f} | {row['exit_rate']:.0%} | {row['speedup_median']:.2f}x | "
                f"{row['speedup_total']:.2f}x |"
            )
    return "\n".join(lines)


def detail(path: Path, result: dict) -> str:
    p = result["provenance"]
    lines = [
        f"### {result['model']}: {', '.join(dict.fromkeys(prompts(r) for r, _ in shipped_rows(result)))}",
        "",
        f"`{p['command']}`",
        "",
        "| prompts | rule | n | prompt tokens | agreement | kappa | constant answer | agreement off it | "
        "accuracy (full) | exits | "
        "mean exit layer | median speedup | total speedup | L-SPADE checks, no exit | oracle median |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, never in shipped_rows(result):
        cost = f"x{1 / never['speedup_median']:.3f}" if never and row["threshold"] >= 0 else "-"
        lines.append(
            f"| {prompts(row)} | {rule(row)} | {row['n']} | {row['prompt_tokens_median']:.0f} | "
            f"{row['agreement']:.3f} | {row['kappa']:.3f} | {row['constant_agreement']:.3f} | "
            f"{_num(row.get('nonconstant_agreement'))} | "
            f"{row['accuracy']:.3f} ({row['full_accuracy']:.3f}) | {row['exit_rate']:.0%} | "
            f"{row['mean_exit_layer']:.2f} | {row['speedup_median']:.2f}x | {row['speedup_total']:.2f}x | {cost} | "
            + (f"{row['oracle_speedup']:.2f}x |" if row.get("oracle_speedup") else "- |")
        )
    lines += ["", _provenance_line(path, p)]
    return "\n".join(lines)


def _section(path: Path, title: str, intro: list[str], columns: list[str], rows: list[list[str]]) -> list[str]:
    """One result file as Markdown: title, the command that made it, what it measures, a table, provenance."""
    r = json.loads(path.read_text())
    p = r["provenance"]
    model = r.get("model") or (p["models"][0]["model"] if p.get("models") else "the converter")
    return [
        f"### {model}: {title}",
        "",
        f"`{p['command']}`",
        "",
        *intro,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cells) + " |" for cells in rows),
        "",
        _provenance_line(path, p),
        "",
    ]


def _answer_path_rows(r: dict) -> list[list[str]]:
    rows = []
    for row in r["rows"]:
        m = row["median_ms"]
        if "/" not in row["data"]:
            name = f"bench set {row['data']}"
        else:
            name = f"{Path(row['data']).stem} {row['few_shot']}-shot" if row["kind"] == "free" else "ARC-Easy test"
        fa = "llama_cpp_fa" in m
        rows.append(
            [
                name,
                f"{row['prompt_tokens_median']:.0f}",
                *(f"{m[k]:.1f}" if k in m else "-" for k in ("llama_cpp", "llama_cpp_fa", "full", "default", "pass")),
                f"{m['topk']:.2f}",
                f"{m['topk_before']:.2f}",
                *(
                    f"{row[k]:.2f}x" if k in row else "-"
                    for k in (
                        "full_vs_llama_cpp_total",
                        "default_vs_llama_cpp_total",
                        "full_vs_llama_cpp_fa_total" if fa else "-",
                        "default_vs_llama_cpp_fa_total" if fa else "-",
                        "default_vs_full_total",
                    )
                ),
                f"{row['exit_rate']:.0%}",
            ]
        )
    return rows


def _frontier_rows(r: dict) -> list[list[str]]:
    """Each probe layer's row, then per few-shot count and formats the best pair of probes."""

    def bounds(x: dict) -> list[str]:
        return [
            f"{x[k]['median']:.2f}x ({x[k]['exit_share']:.0%}; {x[k]['max_exit_share']:.0%})"
            for k in ("certified", "loose")
        ]

    def chosen(x: dict | None) -> str:
        return "-" if x is None else f"{x['median']:.2f}x / {x['total']:.2f}x ({x['exit_share']:.0%})"

    out = []
    for x in r["rows"]:
        group = (x["shots"], x["formats"])
        head = [str(x["shots"]), x["formats"]]
        out.append(
            [*head, str(x["probe_layer"]), str(x["prompts"]), f"{x['prompt_tokens_median']:.0f}"]
            + [f"{x['exit_speedup']:.2f}x", f"{x['oracle']:.0%}", *bounds(x)]
            + [chosen(x.get("chosen"))]
        )
        pairs = [y for y in r.get("pairs", []) if (y["shots"], y["formats"]) == group]
        last = [z for z in r["rows"] if (z["shots"], z["formats"]) == group][-1]
        if pairs and x is last:
            y = max(pairs, key=lambda y: (y["certified"]["median"], y["certified"]["total"]))
            layers = "+".join(map(str, y["probe_layers"]))
            out.append(
                [*head, f"{layers} (best of {len(pairs)} pairs)", str(y["prompts"]), "", "-", "-", *bounds(y), "-"]
            )
    return out


def _prefix_reuse_rows(r: dict) -> list[list[str]]:
    return [
        [
            x["category"],
            str(x["shots"]),
            str(x["n"]),
            f"{x['prompt_tokens_median']:.0f}",
            *(f"{x['median_ms'][k]:.1f}" for k in ("completion", "eval_reset", "full", "default", "reuse")),
            f"{x['default_vs_completion_total']:.2f}x",
            f"{x['reuse_vs_completion_total']:.2f}x",
            f"{x['full_vs_eval_reset_total']:.2f}x",
            f"{x['same_answer_as_completion']:.3f}, {x['reuse_same_answer_as_full']:.3f}",
        ]
        for x in r["rows"]
    ]


def _question_cell(question: str) -> str:
    """A question as one table cell: a few-shot prompt shows its last line and how many came before."""
    lines = question.split("\n")
    return question if len(lines) == 1 else f"({len(lines) - 1} lines of examples) {lines[-1]}"


def _one_question_rows(r: dict) -> list[list[str]]:
    return [
        [
            _question_cell(row["question"]),
            f"{row['wall_ms_full']:.0f}",
            f"{row['wall_ms_default']:.0f}",
            f"{row['answer_ms_full']:.1f}",
            f"{row['answer_ms_default']:.1f}",
            f"{row['plan'] or '-'} ({row['guard'] or 'no checks'})",
            "yes" if row["same_answer"] else "no",
        ]
        for row in r["rows"]
    ]


def _memory_rows(r: dict) -> list[list[str]]:
    return [
        [
            row["mode"],
            f"{row['peak_rss_mb']:.0f}",
            f"x{row['vs_llama_cpp']:.2f}",
            _num(row.get("rss_after_close_mb"), 0),
            _num(row.get("exits"), 0),
        ]
        for row in r["rows"]
    ]


def other_results_md(folder: Path = RESULTS) -> list[str]:
    """Our answers against llama-cpp-python on the same tokens, where an answer's time goes, one question
    per process, peak memory, the server, the converter."""
    parts = []
    for path in sorted(folder.glob("answer-path-*.json")):
        parts += _section(
            path,
            "against llama-cpp-python, and the answer path",
            [
                "Median ms per answer; ratios are summed llama-cpp-python time over ours (above 1: ours is faster).",
                "`Llama.eval` on our prompt's tokens and the argmax of its last logits is what a user would run",
                "instead: with its default, flash attention off, and with it on (*FA*), as our engine lets",
                "llama.cpp choose on the CPU. *Top-k* is the shipped top-5 with probabilities; *before*, the",
                "former float64 softmax and full sort of the vocabulary, timed on the same logits.",
            ],
            [
                "prompts",
                "tokens",
                "llama-cpp-python",
                "llama-cpp-python FA",
                "ours, full depth",
                "ours, default",
                "the pass",
                "top-k",
                "before",
                "full vs llama-cpp",
                "default vs llama-cpp",
                "full vs FA",
                "default vs FA",
                "default vs full",
                "exits",
            ],
            _answer_path_rows(json.loads(path.read_text())),
        )
    for path in sorted(folder.glob("signal-frontier-*.json")):
        r = json.loads(path.read_text())
        parts += _section(
            path,
            "what any confidence signal can let exit",
            [
                f"Share of the calibration's {r['heldout_prompts']} held-out prompts (free answers, "
                f"{'/'.join(map(str, r['few_shot']))} shots) that exit at one layer with the agreement certified at "
                f"{r['target_agreement']:.0%} ({r['confidence']:.0%} confidence), per signal: the shipped L-SPADE "
                "head's entropy, SPADE's own entropy (a probe), a logistic gate fitted on the hidden state for this "
                "question alone, and the oracle (every prompt whose SPADE answer agrees). A median speedup needs "
                "more than half of the prompts to exit."
            ],
            ["layer", "prompt tokens", "prompts", "oracle", "L-SPADE", "SPADE probe", "gate"],
            [
                [str(x["layer"]), x["tokens"], str(x["prompts"])]
                + [f"{x[name]:.0%}" for name in ("oracle", "lspade", "spade", "gate")]
                for x in r["rows"]
            ],
        )
    for path in sorted(folder.glob("exit-frontier-*.json")):
        r = json.loads(path.read_text())
        parts += _section(
            path,
            "the best median a head-and-probe rule could reach",
            [
                f"On {r['data']}: {r['heldout_prompts']} prompts, grouped by few-shot count. For each probe layer, "
                f"every pair of thresholds (the head at layer {'/'.join(map(str, r['head_layers']))}, then the probe) "
                "is tried on these prompts themselves, so each figure bounds rules of that shape from above. "
                f"`certified`: the best median whose agreement is certified at {r['target_agreement']:.0%} "
                f"({r['confidence']:.0%} confidence, by fact, as calibration certifies); `loose`: the best median at "
                "the plain agreement, no margin; `most exits`: the largest exit share of any rule at that agreement (a "
                "median above 1x needs more than half). `exit speedup`: what a prompt of the median length gains "
                "when the probe lets it exit (the cost model: pass to the layer, check, tail); `oracle`: the share "
                "whose SPADE answer at the probe agrees. `best of N pairs`: two probes sharing a threshold (a coarser "
                "grid), the pair with the best certified median. `chosen`: no bound but the rule the cascade tool "
                "would make of that probe alone: thresholds chosen on the training facts' prompts of the same view "
                "(best median), scaled until certified on these, judged here (median / total, exits). Modelled, "
                "not timed."
            ],
            [
                "shots",
                "formats",
                "probe layer",
                "prompts",
                "median tokens",
                "exit speedup",
                "oracle",
                "certified: best median (its exits; most exits)",
                "loose: best median (its exits; most exits)",
                "chosen: median / total (exits)",
            ],
            _frontier_rows(r),
        )
    for path in sorted(folder.glob("prefix-reuse-*.json")):
        r = json.loads(path.read_text())
        parts += _section(
            path,
            "questions behind one fixed few-shot prefix",
            [
                "Per category of calibration-side cloze facts: its first facts solved as the prefix, the next ones",
                "asked behind it, interleaved in one process. llama-cpp-python's `create_completion` (one greedy",
                "token; it tokenizes the text itself) reuses the prefix's KV cache from the call before;",
                "`Llama.eval` after `reset()` runs the same tokens anew, as our passes do by default. *Reuse*: our",
                "default with `load_model(reuse_prefix=True)` (`--reuse-prefix`), which keeps each completed pass's",
                "cache and answers the rest of a reused prompt by a plain pass. Median ms per answer; ratios are",
                "summed times (above 1: ours is faster).",
            ],
            [
                "category",
                "shots",
                "questions",
                "tokens",
                "completion (reused prefix)",
                "eval after reset",
                "ours, full depth",
                "ours, default",
                "ours, reuse",
                "default vs completion",
                "reuse vs completion",
                "full vs eval after reset",
                "same answer: completion, reuse (as full)",
            ],
            _prefix_reuse_rows(r),
        )
    for path in sorted(folder.glob("one-question-*.json")):
        r = json.loads(path.read_text())
        parts += _section(
            path,
            "one question per process",
            [f"Whole `edge-spade ask` processes, the default against `--full`, alternating, medians of {r['repeat']}."],
            [
                "question",
                "wall ms, --full",
                "wall ms, default",
                "answer ms, --full",
                "answer ms, default",
                "plan",
                "same answer",
            ],
            _one_question_rows(r),
        )
    for path in sorted(folder.glob("formats-*.json")):
        r = json.loads(path.read_text())
        parts += _section(
            path,
            "prompt formats",
            [
                f"Agreement with full depth on {_formats_facts(r)} ({r.get('per_category', 5)} per category)",
                "written in three formats, prefixes from the fact's own category; each rule",
                "the heads carry (`default`: the shipped rule with its plans, the speed guard off; `ungated`:",
                "without the heads' domain gate). No timing.",
            ],
            ["shots", "format", "rule", "n", "agreement", "exits"],
            [
                [str(x["shots"]), x["format"], x["rule"], str(x["n"]), f"{x['agreement']:.3f}", f"{x['exit_rate']:.0%}"]
                for x in sorted(r["rows"], key=lambda x: (x["shots"], x["format"], x["rule"]))
            ],
        )
    for path in sorted(folder.glob("memory-*.json")):
        parts += _section(
            path,
            "peak memory",
            [
                "Peak RSS of one process per mode (the kernel's ru_maxrss), against llama-cpp-python's `Llama`",
                "evaluating the same prompt.",
            ],
            ["mode", "peak RSS (MB)", "vs llama-cpp-python", "after close() (MB)", "exits"],
            _memory_rows(json.loads(path.read_text())),
        )
    for path in sorted(folder.glob("server-*.json")):
        r = json.loads(path.read_text())
        one = r["one_question_ms"]
        parts += _section(
            path,
            "the resident server",
            [
                f"One question (`edge-spade ask ... --server URL` against a process that loads the model, paired): "
                f"{one['server']:.0f} ms against {one['process']:.0f} ms wall, {one['speedup']:.1f}x. Load: 8 loopback "
                "clients, choice and free questions mixed, each answer compared with the same question answered "
                "in-process; the server's RSS sampled every 0.5 s; then SIGTERM. Latency CDF and RSS over time: "
                f"`{path.with_suffix('.png').name}`."
            ],
            [
                "--parallel",
                "requests",
                "errors",
                "answers differing",
                "p50 ms",
                "p95 ms",
                "answers/s",
                "RSS MB (min-max)",
                "exit on SIGTERM",
            ],
            [
                [
                    str(x["parallel"]),
                    str(x["requests"]),
                    str(x["errors"]),
                    str(x["mismatches"]),
                    f"{x['p50_ms']:.1f}",
                    f"{x['p95_ms']:.1f}",
                    f"{x['answers_per_s']:.1f}",
                    f"{x['rss_mb_min']:.0f}-{x['rss_mb_max']:.0f}",
                    str(x["exit_code_on_sigterm"]),
                ]
                for x in r["load"]
            ],
        )
    for path in sorted(folder.glob("bench/bench-*.json")):
        r = json.loads(path.read_text())
        energy = r["energy"]
        measured = energy["detail"] if energy["source"] else f"not measured: {energy['unavailable']}"
        speed = ", ".join(
            f"{name.replace('_vs_', ' against ')} {s['total']:.2f}x by total time ({s['median']:.2f}x by median)"
            for name, s in r["speedups"].items()
        )
        kinds = "; ".join(
            f"{kind}: " + ", ".join(f"{m} {v['p50_ms']:.0f}" for m, v in modes.items())
            for kind, modes in r["by_kind"].items()
        )
        parts += _section(
            path,
            "`edge-spade bench`",
            [
                f"The user's benchmark on the shipped `{r['questions']['set']}` set ({r['questions']['answered']} "
                f"questions, each in every mode, interleaved). {speed}. Median ms by kind: {kinds}. "
                f"Energy: {measured}. Plot: `bench/{path.with_suffix('.png').name}`."
            ],
            [name for name, _ in bench_report.COLUMNS],
            bench_report.rows(r),
        )
    for path in sorted(folder.glob("convert*.json")):
        r = json.loads(path.read_text())
        large = r["large"]
        parts += _section(
            path,
            "converting and verifying",
            [
                "`edge-spade convert` of a random bf16 checkpoint of Llama-3.2-1B's shape "
                f"({large['n_params'] / 1e9:.2f} B parameters, {large['checkpoint_mb'] / 1e3:.2f} GB), in a child "
                "process; "
                "the verification (the checkpoint's own forward pass in numpy against llama.cpp on the written "
                "file, the F16 intermediate for Q4_K_M) is part of the time. Peak RSS includes the written file "
                "mapped by llama.cpp during the check."
            ],
            ["output", "seconds", "of which verification", "peak RSS MB", "file MB", "relative error", "top-1 agrees"],
            [
                [
                    x["quant"],
                    f"{x['seconds']:.1f}",
                    f"{x['verification'].get('seconds', 0):.1f}",
                    str(x["peak_rss_mb"]),
                    f"{x['file_mb']:.0f}",
                    f"{x['verification'].get('relative_error', float('nan')):.1e}",
                    str(x["verification"].get("top1_agrees")),
                ]
                for x in large["runs"]
            ],
        )
    return parts


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _provenance_line(path: Path, p: dict) -> str:
    model = p["models"][0] if p.get("models") else None
    used = (
        f"model sha256 `{model['model_sha256'][:12]}`, "
        f"heads.json sha256 `{(model.get('heads_sha256') or 'none')[:12]}`, {model['threads']} threads, "
        if model
        else ""
    )
    return (
        f"{path.name}: edge-spade {p['edge_spade']}, commit `{(p['commit'] or 'none')[:12]}`, {used}{p['cpu']} "
        f"({p['cpus']} CPUs), dated {p['date']}."
    )


def results_md(results: list[tuple[Path, dict]]) -> str:
    parts = [
        "# Results",
        "",
        "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`; do not edit by hand.",
        "",
        "The shipped exit rules of both default models, measured by `benchmarks/exit.py`: every",
        "configuration runs question by question, interleaved with the full-depth answer, in one",
        "process with the same threads. Speedups are full-depth time over the rule's time: the median",
        "of per-question ratios, and the ratio of summed times (total). Agreement is with the full",
        "model's own answer; kappa and the agreement of always giving the most common answer stand",
        "beside it, and so does the agreement on the prompts whose full answer is not the most common",
        "one (*agreement off it*; Gemma's first token of every number is a space, so arithmetic facts all",
        "share one answer). *L-SPADE checks, no exit*: the time of a pass that runs the L-SPADE checks at",
        "the set's evaluation layers but never exits, over the full-depth time (a probe that does not",
        "exit costs its tail). *Oracle*: every prompt answered by SPADE at its earliest agreeing layer,",
        "the most any exit rule at that tail width could give.",
        "",
        "*Cloze facts*, ARC and BoolQ (../shared/data) are the project's benchmark sets: they have been",
        "looked at while choosing rules. *Unseen test facts* are the test split of our broad corpus",
        "(convert/cloze/cloze-broad-test.jsonl), which no calibration, threshold or plan has seen; the",
        "shipped heads were calibrated before it existed. Absolute times vary between machines and runs;",
        "the ratios were measured on the machine in each file's provenance.",
        "",
        "## Summary",
        "",
        summary_table(results),
        "",
        "## Per result file",
        "",
    ]
    for path, result in results:
        parts += [detail(path, result), ""]
    previous = load_results(RESULTS / "previous")
    if previous:
        parts += [
            "## Rules replaced, measured beside their successors",
            "",
            "A default rule that was replaced, run by the same command on the same machine as the rule",
            "that replaced it (above), so that the two compare without a change of machine between them.",
            "Its heads are the shipped ones of an earlier commit: `--heads` names a copy of `models/<model>/`",
            "with that commit's heads.json (the sha256 in the provenance; Gemma's L-SPADE rule: commit 7ce3e3a).",
            "The cascades without a domain gate (`-cascade`: a head at layer 1, then a probe; shipped at commits",
            "2728673 and 7a57be2) were replaced for fidelity across prompt formats, not speed (the prompt formats",
            "below); the probes alone that replaced them (`-probe-alone`, commit 01d64cf) by the gated cascades.",
            "`-by-gate`: a rule per side of the heads' domain gate (`convert/cascade.py --by-gate --objective robust`,",
            "the heads of commit 997725e), measured on the test facts and not shipped (convert/README.md).",
            "",
        ]
        for path, result in previous:
            parts += [detail(path, result), ""]
    parts += ["## The answer path, one question per process, memory, the server", "", *other_results_md()]
    return "\n".join(parts).rstrip() + "\n"


def readme_with_table(readme: str, table: str) -> str:
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if RESULTS.md or the README table is out of date")
    args = p.parse_args(argv)
    results = load_results()
    wanted = {RESULTS_MD: results_md(results), README: readme_with_table(README.read_text(), summary_table(results))}
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run python -m benchmarks.report", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
