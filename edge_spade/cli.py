"""`edge-spade`: a thin command line over the Python API (edge_spade.runtime) and, for `convert`,
`pull` and `calibrate`, over the converter (edge_spade.convert, imported only when asked for)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import IO

from .answer import SIGNALS, Answer
from .errors import EdgeSpadeError, QuestionError

# The runtime (numpy, llama.cpp, onnxruntime) is imported by the commands that load a model, not
# here: `ask --server` must start fast.

log = logging.getLogger("edge_spade")
MODEL_HELP = "registry name, bundle folder or .gguf path (default: the default model; see `models`)"


REUSE_HELP = (
    "keep each completed pass's cache and run only what the next prompt adds to the prefix it shares "
    "(questions behind one fixed few-shot prefix); probabilities may differ a little from a fresh pass's"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-spade", description="Fast single-token answers from quantized LLMs.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ask", help="answer a question (one token: a choice, yes/no, or the next token)")
    p.add_argument("question", nargs="?", help="the question, or the text to continue when there are no choices")
    p.add_argument("--choices", nargs="+", metavar="CHOICE", help="answer options (yes no: the words themselves)")
    p.add_argument("--file", help="JSON lines {id?, question, choices?}; one JSON answer per line ('-': stdin)")
    p.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--server",
        help="ask a running `edge-spade serve` at this URL (also: EDGE_SPADE_SERVER; its "
        "API key from EDGE_SPADE_API_KEY); the model options are then the server's",
    )
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--layer", type=int, help="decode at this layer (0-based) instead of full depth")
    depth.add_argument("--full", action="store_true", help="full-depth answer, even when heads allow an early exit")
    p.add_argument("--lens", choices=["spade", "logit"], default="spade", help="decoder used at --layer")
    p.add_argument(
        "--tail",
        type=int,
        default=None,
        help="SPADE tail width: prompt rows forwarded besides the start (default 1, or the heads' own)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="SPADE-EXIT entropy threshold in nats (default: the calibrated one; negative: never exit)",
    )
    p.add_argument(
        "--signal",
        choices=SIGNALS,
        default=None,
        help="exit rule: L-SPADE heads at the evaluation layers, SPADE probes, or heads then a probe "
        "(cascade; default: calibrated)",
    )
    p.add_argument("--heads", default=None, help="heads folder from `edge-spade calibrate` (default: shipped heads)")
    p.add_argument(
        "--no-guard",
        action="store_true",
        help="check wherever the plans say, even where checks have lost time so far (benchmarks)",
    )
    p.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="use a downloaded model whose sha256 cannot be checked (none pinned, hub unreachable)",
    )
    p.add_argument("--threads", type=int, help="CPU threads (default: all this process may use)")
    p.add_argument("--reuse-prefix", action="store_true", help=REUSE_HELP)
    p.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded to Metal/GPU backends")
    p.add_argument("--ctx", type=int, default=2048, help="context size in tokens (the longest prompt)")

    c = sub.add_parser("calibrate", help="train L-SPADE heads and pick the exit threshold for a model")
    c.add_argument("--model", help=MODEL_HELP)
    c.add_argument(
        "--data",
        action="append",
        required=True,
        help="ARC / BoolQ / HEAD-QA / cloze file (repeatable); only the prompts are used",
    )
    c.add_argument("--out", help="heads folder to write (heads.json + ONNX); default for a bundle: its heads/")
    c.add_argument("--report", help="calibration report folder (curves, lens baselines); default: <out>-calibration")
    c.add_argument("--limit", type=int, default=None, help="questions per data file")
    c.add_argument("--target-agreement", type=float, default=0.99)
    c.add_argument("--confidence", type=float, default=0.95)
    c.add_argument("--holdout", type=float, default=0.3, help="share of prompts held out to pick the threshold")
    c.add_argument(
        "--holdout-by",
        choices=("fact", "prompt"),
        default="fact",
        help="hold out whole cloze facts (all their few-shot variants; default) or single prompts",
    )
    c.add_argument("--min-layer", type=int, default=1, help="first layer with a head")
    c.add_argument(
        "--max-layer", type=int, help="last layer with a head (default: the one before the last); probes use all"
    )
    c.add_argument("--rank", type=int, default=64)
    c.add_argument("--steps", type=int, default=300)
    c.add_argument(
        "--tail",
        type=int,
        nargs="+",
        default=[1],
        help="SPADE tail width(s) for choice questions; several: the best on the held-out frontier",
    )
    c.add_argument(
        "--free-tail", type=int, nargs="+", default=None, help="SPADE tail width(s) for free answers (default: --tail)"
    )
    c.add_argument(
        "--variants", type=int, default=3, help="few-shot prefixes per cloze fact (and per --few-shot count)"
    )
    c.add_argument(
        "--few-shot",
        type=int,
        nargs="+",
        default=[3],
        metavar="N",
        help="examples in each cloze prompt's prefix; several counts calibrate for all of them",
    )
    c.add_argument(
        "--objective",
        choices=("median", "total"),
        default="median",
        help="what SPADE probe layers are chosen to speed up: the median answer or the total time",
    )
    c.add_argument(
        "--cascade",
        action="store_true",
        help="then add a cascade to the free-answer heads (heads first, then SPADE probes) on the same prompts",
    )
    c.add_argument(
        "--cascade-probes",
        type=int,
        default=2,
        metavar="N",
        help="the cascade chooses up to N probe layers after the heads, sharing one threshold (default: 2)",
    )
    c.add_argument(
        "--cascade-min-tokens",
        type=int,
        default=32,
        metavar="N",
        help="the cascade measures prompts over N tokens; shorter ones never check (default: 32)",
    )
    c.add_argument(
        "--merge",
        action="store_true",
        help="keep the answer kinds this data does not cover from the heads already in --out",
    )
    c.add_argument(
        "--max-overhead",
        type=float,
        default=0.03,
        help="most that L-SPADE checks may add to a pass that does not exit (0.03: 3%%)",
    )
    c.add_argument("--threads", type=int)

    v = sub.add_parser("convert", help="Hugging Face model or GGUF -> quantized GGUF in a bundle directory")
    v.add_argument("source", help="Hugging Face folder, hub repo id (owner/name), .gguf file or bundle to requantize")
    v.add_argument("--out", required=True, help="bundle directory to create")
    v.add_argument(
        "--quant",
        default="Q4_K_M",
        help="llama.cpp type: Q8_0, Q6_K, Q5_K_M, Q5_0, Q4_K_M (default), Q4_K_S, Q4_0, F16, BF16, F32",
    )
    v.add_argument("--revision", default="main", help="hub revision (repo id sources)")
    v.add_argument("--threads", type=int, help="quantizer threads")
    v.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    v.add_argument(
        "--no-verify",
        action="store_true",
        help="keep a Hugging Face conversion whose logits differ from the checkpoint's own forward pass",
    )

    u = sub.add_parser("pull", help="download one GGUF file from the Hugging Face Hub (optionally into a bundle)")
    u.add_argument("repo", help="hub repository id, e.g. bartowski/Llama-3.2-1B-Instruct-GGUF")
    u.add_argument("--file", required=True, help="the .gguf file in the repository")
    u.add_argument("--revision", default="main")
    u.add_argument("--out", help="bundle directory to create (default: just download into the hub cache)")
    u.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    u.add_argument(
        "--allow-unverified", action="store_true", help="keep the file even when the hub cannot tell its sha256"
    )

    v = sub.add_parser(
        "serve", help="keep a model loaded and answer over HTTP (needs: pip install 'edge-spade[server]')"
    )
    v.add_argument("--model", help=MODEL_HELP)
    v.add_argument("--heads", default=None, help="heads folder (default: shipped heads)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; others need --api-key)")
    v.add_argument("--port", type=int, default=8080)
    v.add_argument("--parallel", type=int, default=1, help="runtimes answering at once, each with its own context")
    v.add_argument("--queue", type=int, default=16, help="requests that may wait for a runtime (more: 503)")
    v.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait for a runtime (then 504)")
    v.add_argument(
        "--api-key",
        default=os.environ.get("EDGE_SPADE_API_KEY"),
        help="required as 'Authorization: Bearer KEY' (default: EDGE_SPADE_API_KEY)",
    )
    v.add_argument("--threads", type=int)
    v.add_argument("--no-guard", action="store_true", help="the speed guard off (answers independent of history)")
    v.add_argument("--reuse-prefix", action="store_true", help=REUSE_HELP)

    k = sub.add_parser("cache", help="what edge-spade keeps in its cache folder, and clearing it")
    k.add_argument(
        "--clear",
        nargs="*",
        metavar="KIND",
        default=None,
        help="delete these kinds (index, tails, calibration, models); none named: everything",
    )

    b = sub.add_parser(
        "bench",
        help="latency, CPU, memory and energy per answer on this machine: full depth, SPADE-EXIT, llama-cpp-python",
    )
    b.add_argument("--model", help=MODEL_HELP)
    b.add_argument("--heads", default=None, help="heads folder (default: shipped heads)")
    b.add_argument(
        "--set",
        default="mixed",
        help="shipped questions: mixed (default), free-0, free-3, free-8, choice; or an `ask --file` JSONL file",
    )
    length = b.add_mutually_exclusive_group()
    length.add_argument("--n", type=int, help="questions, each answered in every mode (default 100)")
    length.add_argument("--duration", type=float, help="seconds of measured answers instead of a count")
    b.add_argument("--threads", type=int, help="CPU threads for every mode (default: all this process may use)")
    b.add_argument(
        "--energy",
        choices=("auto", "rapl", "apple", "battery", "none"),
        default="auto",
        help="energy sensor: RAPL (Linux, via zeus), apple (zeus-apple-silicon), battery discharge "
        "(needs --duration); auto: the first that can be read, else none",
    )
    b.add_argument("--allow-ac", action="store_true", help="run --energy battery on mains power (energy not reported)")
    b.add_argument("--modes", nargs="+", default=["full", "exit", "llama-cpp"], help="modes to compare (default: all)")
    b.add_argument("--warmup", type=int, default=4, help="questions answered in every mode before measuring")
    b.add_argument("--no-rss", action="store_true", help="skip the per-mode peak memory (one process per mode)")
    b.add_argument("--out", help="folder for bench-<model>.json, .md and .png")
    b.add_argument("--sysfs", default="/sys", help="where sysfs is mounted (RAPL and battery; containers)")

    m = sub.add_parser("models", help="list the models edge-spade knows and where they come from")
    m.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv  # what was typed, for results' provenance
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="edge-spade: %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # gguf's writer narrates every file at INFO
    try:
        if args.command == "models":
            return cmd_models(args)
        if args.command == "cache":
            return cmd_cache(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "calibrate":
            return cmd_calibrate(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "convert":
            return cmd_convert(args)
        if args.command == "pull":
            return cmd_pull(args)
        return cmd_ask(args)
    except EdgeSpadeError as exc:
        if os.environ.get("EDGE_SPADE_DEBUG"):
            raise
        print(f"edge-spade: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # answers already printed stay printed: each line is flushed as it comes
        print("edge-spade: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edge-spade ask --file ... | head -1`: the reader has gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def cmd_ask(args: argparse.Namespace) -> int:
    if (args.question is None) == (args.file is None):
        raise QuestionError("give a question, or --file with JSON lines (not both)")
    stream = None
    if args.file is not None and args.file != "-":  # before loading the model: a typo should not cost a load
        try:
            stream = open(args.file, "rb")  # closed below, after the answers
        except OSError as exc:
            raise QuestionError(f"cannot read --file {args.file}: {exc.strerror}") from None
    server = args.server or os.environ.get("EDGE_SPADE_SERVER")
    if server:
        from .client import Client

        asker = Client(server, api_key=os.environ.get("EDGE_SPADE_API_KEY"))
    else:
        from .runtime import load_model

        # One question: loading a tail model costs about what loading the model does, more than a probe saves.
        asker = load_model(
            args.model,
            threads=args.threads,
            gpu_layers=args.gpu_layers,
            n_ctx=args.ctx,
            heads=args.heads,
            tail_models=args.file is not None,
            speed_guard=not args.no_guard,
            allow_unverified=args.allow_unverified,
            reuse_prefix=args.reuse_prefix,
        )
    options = dict(
        layer=args.layer,
        lens=args.lens,
        tail=args.tail,
        template=False if args.raw else None,
        full=args.full,
        threshold=args.threshold,
        signal=args.signal,
    )
    if args.file is None:
        answer = asker.ask(args.question, args.choices, **options)
        print(json.dumps(answer.to_dict(), ensure_ascii=False) if args.json else format_answer(answer))
        return 0
    with stream or sys.stdin.buffer as stream:
        return ask_lines(asker, stream, options, sys.stdout, json_out=args.json)


def ask_lines(asker, stream: IO[bytes], options: dict, out: IO[str], json_out: bool) -> int:
    """Answer each JSON line as it comes (`asker`: a Runtime, or a Client of a server); report bad
    lines on stderr and keep going."""
    failed = 0
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw.decode("utf-8"))
            if not isinstance(item, dict) or not isinstance(item.get("question"), str):
                raise QuestionError('expected an object with a "question" string')
            choices = item.get("choices")
            if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
                raise QuestionError('"choices" must be a list of strings')
            answer = asker.ask(item["question"], choices, **options)
        except (EdgeSpadeError, ValueError) as exc:  # ValueError covers JSON and UTF-8 errors
            failed += 1
            print(f"edge-spade: line {number}: {exc}", file=sys.stderr)
            continue
        record = {"id": item.get("id"), **answer.to_dict()}
        out.write(
            (
                json.dumps(record, ensure_ascii=False)
                if json_out
                else f"{item.get('id', number)}: " + format_answer(answer).splitlines()[0]
            )
            + "\n"
        )
        out.flush()
    if failed:
        print(f"edge-spade: {failed} line(s) failed", file=sys.stderr)
    return 1 if failed else 0


def format_answer(a: Answer) -> str:
    """Human-readable answer: the answer, each choice's probability, how and how fast."""
    free = a.choice_index is None
    head = repr(a.answer) if free else a.answer if a.label == a.answer else f"{a.label}. {a.answer}"
    lines = [f"answer: {head}"]
    shown = {key: repr(key) if free else key for key in a.probs}
    width = max(map(len, shown.values()), default=0)
    for key, p in a.probs.items():
        lines.append(f"  {shown[key]:<{width}}  {p:6.3f}{' *' if key == a.answer else ''}")
    if a.mode == "full":
        where = "full depth"
    elif a.mode == "spade-exit" and a.guard in ("plan", "does not pay"):
        why = "its plan does not check" if a.guard == "plan" else "the guard found its checks do not pay here"
        where = f"spade-exit, no checks ({a.plan}: {why}): full depth"
    elif a.mode == "spade-exit" and a.exit_layer is None:
        where = f"spade-exit, no exit (threshold {a.threshold:g} nats): full depth"
    elif a.mode == "spade-exit":
        where = f"spade-exit at layer {a.exit_layer} (entropy {a.entropy[a.exit_layer]:.3f} <= {a.threshold:g})"
    else:
        where = f"{a.mode} at layer {a.layer}"
    if a.outside_domain:
        where += f" (outside the heads' calibration domain at layer {', '.join(map(str, a.outside_domain))})"
    t = a.timings_ms
    lines.append(
        f"{where} of {a.n_layers} layers | {a.prompt_tokens} prompt tokens | {a.model} | "
        f"{t['total']:.1f} ms (prefill {t['prefill']:.1f}, tail {t['tail']:.1f})"
    )
    return "\n".join(lines)


# The converter's own dependencies (the `convert` extra); a missing one is the user's to install.
CONVERT_EXTRA = {"onnx", "safetensors", "ml_dtypes"}


def converter(module: str) -> ModuleType:
    """edge_spade.convert.<module>, or a one-line error naming the pip command when the extra is missing."""
    try:
        return importlib.import_module(f"edge_spade.convert.{module}")
    except ImportError as exc:
        if exc.name not in CONVERT_EXTRA:
            raise
        raise EdgeSpadeError(
            f"this command needs the converter's dependencies ({exc.name} is missing); "
            "run: pip install 'edge-spade[convert]'"
        ) from None


def cmd_calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    calibrate = converter("calibrate")
    m, out = calibrate.calibrate_model(
        args.model,
        args.data,
        args.out,
        report=args.report,
        limit=args.limit,
        variants=args.variants,
        few_shot=args.few_shot,
        threads=args.threads,
        min_layer=args.min_layer,
        max_layer=args.max_layer,
        holdout=args.holdout,
        holdout_by=args.holdout_by,
        target_agreement=args.target_agreement,
        confidence=args.confidence,
        rank=args.rank,
        steps=args.steps,
        tail=args.tail,
        free_tail=args.free_tail,
        max_overhead=args.max_overhead,
        merge=args.merge,
        objective=args.objective,
        cascade=args.cascade,
        cascade_min_tokens=args.cascade_min_tokens,
        cascade_probes=args.cascade_probes,
        progress=lambda xs: tqdm(
            xs, desc=f"calibrate {args.model or 'default model'}", file=sys.stderr, disable=args.quiet
        ),
    )
    for kind, head_set in m.sets.items():
        print(
            f"{m.model} {kind} heads (layers {head_set.layers[0]}-{head_set.layers[-1]}, tail {head_set.tail}) in "
            f"{out}; thresholds (nats): " + ", ".join(f"{k} {v:.4g}" for k, v in head_set.thresholds.items())
        )
    free = m.sets.get("free")
    if args.cascade and free is not None:
        rule = free.cascade
        print(
            f"cascade: heads at {rule['head_layers']} (<= {rule['threshold']:.4g} nats), then probes at "
            f"{rule['probe_layers']} (<= {rule['probe_threshold']:.4g})"
            + (
                f", inside the heads' domain at {rule['inside']['probe_layers']} "
                f"(<= {rule['inside']['probe_threshold']:.4g})"
                if "inside" in rule
                else ""
            )
            + f"; default rule: {free.signal}"
            + (f"; heads gated to their calibration's domain ({free.domain['file']})" if free.domain else "")
            if rule
            else "cascade: none added (see the warning above); the heads are as calibrated"
        )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    b = converter("sources").convert(
        args.source,
        args.out,
        args.quant,
        revision=args.revision,
        threads=args.threads,
        force=args.force,
        progress=lambda xs: tqdm(xs, desc="convert", unit="tensor", file=sys.stderr, disable=args.quiet),
        verify=not args.no_verify,
    )
    model = b.meta["model"]
    print(
        f"{b.folder}: {model['architecture']}, {model['n_layers']} layers, {model['quantization']}, "
        f"{model['size'] / 1e6:.1f} MB\nnext: edge-spade calibrate --model {b.folder} --data ...  "
        f'or: edge-spade ask "..." --model {b.folder}'
    )
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    result = converter("sources").pull(
        args.repo,
        args.file,
        args.out,
        revision=args.revision,
        force=args.force,
        allow_unverified=args.allow_unverified,
    )
    path = result.folder if hasattr(result, "folder") else result
    print(f'{path}\nnext: edge-spade ask "..." --model {path}')
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as exc:
        raise EdgeSpadeError(
            f"serve needs the server's dependencies ({exc.name} is missing); run: pip install 'edge-spade[server]'"
        ) from None
    serve(
        args.model,
        heads=args.heads,
        host=args.host,
        port=args.port,
        parallel=args.parallel,
        queue=args.queue,
        timeout=args.timeout,
        api_key=args.api_key,
        threads=args.threads,
        speed_guard=not args.no_guard,
        reuse_prefix=args.reuse_prefix,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import report
    from .bench.run import BenchSettings, run_bench

    settings = BenchSettings(
        model=args.model,
        heads=args.heads,
        set=args.set,
        n=args.n,
        duration=args.duration,
        threads=args.threads,
        energy=args.energy,
        allow_ac=args.allow_ac,
        modes=tuple(args.modes),
        warmup=args.warmup,
        rss=not args.no_rss,
        sysfs=args.sysfs,
        progress=not args.quiet and sys.stderr.isatty(),
        command=shlex.join(["edge-spade", *args.argv]),
    )
    result = run_bench(settings)
    print(report.table(result))
    if args.out:
        for path in report.write(result, Path(args.out)):
            log.info("wrote %s", path)
    return 130 if result["interrupted"] else 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .cache import KINDS, cache_dir, cache_usage, clear_cache, max_cache_bytes

    if args.clear is not None:
        freed = clear_cache(args.clear or None)
        print(f"freed {freed / 1e6:.1f} MB in {cache_dir()}")
        return 0
    usage = cache_usage()
    cap = max_cache_bytes()
    print(
        f"{cache_dir()}  (EDGE_SPADE_CACHE; tail models capped at "
        f"{'no limit' if cap is None else f'{cap / 1e6:.0f} MB'}, EDGE_SPADE_CACHE_MAX_MB)"
    )
    for kind, (files, size) in usage.items():
        print(f"  {kind:<12}{files:>7} files {size / 1e6:>10.1f} MB  {KINDS[kind]}")
    print(
        f"  {'total':<12}{sum(f for f, _ in usage.values()):>7} files "
        f"{sum(b for _, b in usage.values()) / 1e6:>10.1f} MB"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .registry import load_registry

    entries = load_registry()
    if args.json:
        print(json.dumps([{**e.__dict__, "source": e.source.__dict__} for e in entries.values()], indent=1))
        return 0
    for e in entries.values():
        src = e.source
        where = f"pip package {src.package}" if src.kind == "package" else f"hub {src.repo}/{e.file}"
        print(f"{e.name:<24}{' (default)' if e.default else '':<11}{e.arch:<8}{e.n_layers:>3} layers  {where}")
        print(f"{'':<24}{e.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
