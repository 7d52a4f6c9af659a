"""Converter costs: time and peak memory of a 1B-shaped conversion; size and logit error per quant type.

    python -m benchmarks.convert                      # both parts (needs ~6 GB of free disk in --workdir)
    python -m benchmarks.convert --skip-large         # only the quantization table on tiny models
    python -m benchmarks.convert --skip-small         # only the 1B-shaped conversion (keeps the table in --out)

Part 1 writes a random bf16 checkpoint of Llama-3.2-1B's shape (16 layers, hidden 2048, vocab
128,256, tied embeddings, Llama 3 RoPE scaling) and converts it with `edge-spade convert` in a
child process (peak RSS from the child's rusage), to F16 and to Q4_K_M.
Part 2 converts tiny random checkpoints of each architecture (hidden 256, so K-quants apply)
and compares each quantization's llama.cpp logits with the F32 file's on a set of prompts.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import progress, save_json

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import hf_tiny  # the tiny checkpoint writer and tokenizers of the test suite

log = logging.getLogger("benchmarks")

LLAMA_1B = {"hidden": 2048, "ff": 8192, "layers": 16, "heads": 32, "kv_heads": 8, "head_dim": 64, "vocab": 128256}
QUANTS = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]


def write_large_checkpoint(folder: Path, shape: dict) -> int:
    """One safetensors shard per layer, generated and written one at a time (bounded memory)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tok, tok_config = hf_tiny.byte_level_tokenizer("llama3")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    h, ff, hd = shape["hidden"], shape["ff"], shape["head_dim"]
    config = {
        **hf_tiny.ARCH_CONFIG["llama"],
        "tie_word_embeddings": True,
        "hidden_size": h,
        "intermediate_size": ff,
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "head_dim": hd,
        "vocab_size": shape["vocab"],
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    rng = np.random.default_rng(0)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(ml_dtypes.bfloat16)

    weight_map, n_params = {}, 0
    shards = [("embed", None)] + [("layer", i) for i in range(shape["layers"])]
    for s, (kind, i) in enumerate(progress(shards, len(shards), "write random checkpoint")):
        if kind == "embed":
            w = {
                "model.embed_tokens.weight": mat(shape["vocab"], h),
                "model.norm.weight": np.ones(h, ml_dtypes.bfloat16),
            }
        else:
            p = f"model.layers.{i}."
            w = {
                p + "input_layernorm.weight": np.ones(h, ml_dtypes.bfloat16),
                p + "post_attention_layernorm.weight": np.ones(h, ml_dtypes.bfloat16),
                p + "self_attn.q_proj.weight": mat(shape["heads"] * hd, h),
                p + "self_attn.k_proj.weight": mat(shape["kv_heads"] * hd, h),
                p + "self_attn.v_proj.weight": mat(shape["kv_heads"] * hd, h),
                p + "self_attn.o_proj.weight": mat(h, shape["heads"] * hd),
                p + "mlp.gate_proj.weight": mat(ff, h),
                p + "mlp.up_proj.weight": mat(ff, h),
                p + "mlp.down_proj.weight": mat(h, ff),
            }
        name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(w, str(folder / name))
        weight_map |= dict.fromkeys(w, name)
        n_params += sum(a.size for a in w.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return n_params


def timed_convert(source: Path, out: Path, quant: str) -> dict:
    """`edge-spade convert` in a fresh child process: wall time, its peak RSS, output size.

    Peak RSS is the child's own VmHWM (Linux): getrusage's ru_maxrss would also carry the RSS the
    parent had when it forked (this script holds the generated checkpoint's arrays by then)."""
    code = (
        "import re, sys; from edge_spade.cli import main; "
        f"rc = main(['-q', 'convert', {str(source)!r}, '--out', {str(out)!r}, '--quant', {quant!r}, '--force']); "
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"convert failed: {proc.stderr}")
    peak_kb = int(proc.stdout.split()[-1])
    verification = json.loads((out / "bundle.json").read_text())["source"].get("verification") or {}
    row = {
        "quant": quant,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_kb / 1024),
        "file_mb": round((out / "model.gguf").stat().st_size / 1e6, 1),
        "verification": verification,  # its seconds are part of the conversion's
    }
    log.info("%s", row)
    return row


def quant_table(workdir: Path) -> list[dict]:
    from tokenizers import Tokenizer

    from edge_spade import Engine, EngineSettings
    from edge_spade.convert.sources import convert

    settings = EngineSettings(n_ctx=256, kv_type="f32", flash_attn=False)
    rows = []
    for arch in ("llama", "qwen2", "gemma3"):
        folder = workdir / f"tiny-{arch}"
        hf_tiny.write_checkpoint(folder, arch, hidden=256, ff=512, layers=4, heads=4, kv_heads=2)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        prompts = [tok.encode(t, add_special_tokens=False).ids for t in hf_tiny.CORPUS[:7] + hf_tiny.TRICKY[:6]]
        prompts = [p for p in prompts if p]
        reference = None
        for quant in QUANTS:
            bundle = convert(str(folder), workdir / f"tiny-{arch}-{quant}", quant, force=True)
            with Engine(bundle.model, settings) as engine:
                logits = np.stack([engine.full(p, None).logits for p in prompts])
            if reference is None:
                reference = logits
            scale = np.abs(reference).max(axis=1)
            err = np.abs(logits - reference).max(axis=1) / scale
            rows.append(
                {
                    "arch": arch,
                    "quant": quant,
                    "file_kb": round(bundle.model.stat().st_size / 1024, 1),
                    "rel_max_logit_error_median": float(np.median(err)),
                    "top1_agreement": float(np.mean(logits.argmax(1) == reference.argmax(1))),
                    "n_prompts": len(prompts),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/edge-spade-convert-bench")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-small", action="store_true", help="keep the quant table already in --out")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", default="benchmarks/results/convert.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.skip_small:
        result: dict = {"quant_table": json.loads(Path(args.out).read_text())["quant_table"]}
    else:
        result = {"quant_table": quant_table(workdir)}
    print(f"{'arch':<8}{'quant':<8}{'size KB':>9}{'rel err':>10}{'top-1':>7}")
    for r in result["quant_table"]:
        print(
            f"{r['arch']:<8}{r['quant']:<8}{r['file_kb']:>9.1f}{r['rel_max_logit_error_median']:>10.2e}"
            f"{r['top1_agreement']:>7.2f}"
        )
    if not args.skip_large:
        folder = workdir / "llama-3.2-1b-shape"
        n_params = write_large_checkpoint(folder, LLAMA_1B)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        runs = [timed_convert(folder, workdir / f"large-{q}", q) for q in ("F16", "Q4_K_M")]
        result["large"] = {"shape": LLAMA_1B, "n_params": n_params, "checkpoint_mb": round(size / 1e6), "runs": runs}
        print(f"Llama-3.2-1B shape, {n_params / 1e9:.2f} B params, bf16 checkpoint {size / 1e9:.2f} GB:")
        for r in runs:
            print(
                f"  -> {r['quant']:<7} {r['seconds']:>7.1f} s  peak RSS {r['peak_rss_mb']} MB  file {r['file_mb']} MB"
            )
    save_json(result, args.out)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
