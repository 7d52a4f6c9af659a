"""Converter: tiny random HF checkpoints -> GGUF -> llama.cpp, against an HF-convention numpy forward.

Also: tokenization against the `tokenizers` library, llama.cpp quantization, requantizing, bundles
(format, verification, heads), `pull` and the hub path with the download replaced at its boundary,
and bad input (no partial bundle left behind).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from edge_spade import Engine, load_model
from edge_spade.bundle import open_bundle
from edge_spade.cache import sha256_file
from edge_spade.cli import main
from edge_spade.convert.bundle_writer import record_heads
from edge_spade.convert.hf_to_gguf import convert_checkpoint
from edge_spade.convert.sources import convert
from edge_spade.errors import BundleError, CheckpointError, UnsupportedArchitectureError
from tests.support import EXACT, hf_tiny

pytestmark = pytest.mark.slow

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
PROMPT = "The capital of France is Paris. Question: is the sky blue? Answer:"
SPECIAL = {
    "llama": "<|im_start|>user\nHi there<|im_end|>",
    "qwen2": "<|im_start|>system\n<|im_end|>",
    "gemma3": "<start_of_turn>user\nhello<end_of_turn>",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in ARCHS:
        hf_tiny.write_checkpoint(root / arch, arch, shards=2 if arch == "llama" else 1)
        out[arch] = root / arch
    hf_tiny.write_checkpoint(root / "smollm", "llama", tokenizer="smollm", seed=3)
    out["smollm"] = root / "smollm"
    return out


@pytest.fixture(scope="module")
def f32(checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {name: convert_checkpoint(folder, root / f"{name}.gguf", "F32") for name, folder in checkpoints.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_match_the_hf_forward(arch, checkpoints, f32):
    tok = Tokenizer.from_file(str(checkpoints[arch] / "tokenizer.json"))
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    assert len(ids) > hf_tiny.ARCH_CONFIG["gemma3"]["sliding_window"]  # gemma's window is exercised
    with Engine(f32[arch], EXACT) as engine:
        for n in (3, len(ids)):
            ref = hf_tiny.hf_forward(checkpoints[arch], ids[:n])[-1]
            got = engine.full(ids[:n], None).logits
            # ggml's GELU goes through an f16 table (gemma3): ~1e-5 of the logit scale; the rest is ~1e-7.
            assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max(), (arch, n)
            assert got.argmax() == ref.argmax()


@pytest.mark.parametrize("arch", ARCHS)
def test_runtime_drives_every_converted_architecture(arch, checkpoints, f32):
    """Graph node names work for each architecture: a SPADE tail covering the whole prompt is the full model."""
    tok = Tokenizer.from_file(str(checkpoints[arch] / "tokenizer.json"))
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    with Engine(f32[arch], EXACT) as engine:
        full = engine.full(ids, None).logits
        for layer in range(engine.n_layers):
            got = engine.spade(ids, layer, None, tail=len(ids)).logits
            assert np.abs(got - full).max() < 1e-4 * np.abs(full).max(), (arch, layer)


@pytest.mark.parametrize("arch", ARCHS)
def test_tail_models_of_every_converted_architecture(arch, checkpoints, f32, tmp_path, monkeypatch):
    """Tail models keep each architecture's per-layer metadata right (gemma3: its explicit sliding-window
    pattern, sliced; the 8-row tail is wider than the 6-token window): bit-identical tails."""
    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path))
    tok = Tokenizer.from_file(str(checkpoints[arch] / "tokenizer.json"))
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    with Engine(f32[arch], EXACT) as engine:
        trace = engine.trace(ids, None, tail=7)
        want = {layer: engine.spade_tail(trace.states[layer], layer, None) for layer in (0, 1)}
        engine.use_tail_models(list(want))
        # gemma3's layers are [local, local, global]: above layer 1 only a global one is left, which
        # llama.cpp refuses (it asserts); that layer keeps its whole-model tail.
        assert sorted(engine._tails) == ([0] if arch == "gemma3" else [0, 1])
        for layer, logits in want.items():
            np.testing.assert_array_equal(engine.spade_tail(trace.states[layer], layer, None), logits)


@pytest.mark.parametrize("name", ARCHS + ["smollm"])
def test_tokenization_matches_the_tokenizers_library(name, checkpoints, f32):
    tok = Tokenizer.from_file(str(checkpoints[name] / "tokenizer.json"))
    with Engine(f32[name], EXACT) as engine:
        for text in hf_tiny.TRICKY + [SPECIAL.get(name, SPECIAL["llama"])]:
            want = tok.encode(text, add_special_tokens=False).ids
            assert engine.tokenize(text, add_special=False, parse_special=True) == want, text


def test_special_tokens_and_template_are_carried(f32):
    with Engine(f32["gemma3"], EXACT) as engine:
        assert engine.adds_bos and engine.bos_text == "<bos>"
    with Engine(f32["llama"], EXACT) as engine:
        assert not engine.adds_bos and engine.chat_template == hf_tiny.CHATML


def test_quantized_files_load_and_answer(checkpoints, tmp_path):
    folder = tmp_path / "wide"
    hf_tiny.write_checkpoint(folder, "llama", hidden=256, ff=512, layers=2)  # K-quants need rows of 256
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    ref = hf_tiny.hf_forward(folder, ids)[-1]
    errors, sizes = {}, {}
    for quant in ("F32", "F16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0"):
        bundle = convert(str(folder), tmp_path / quant, quant)
        assert bundle.meta["model"]["quantization"] == quant
        with Engine(bundle.model, EXACT) as engine:
            got = engine.full(ids, None).logits
        errors[quant] = np.abs(got - ref).max() / np.abs(ref).max()
        sizes[quant] = bundle.model.stat().st_size
    assert errors["F32"] < 1e-5 and errors["F16"] < 1e-2 and errors["Q8_0"] < 0.05
    assert errors["Q4_0"] < 0.5 and errors["Q8_0"] < errors["Q4_0"]
    assert sizes["F32"] > sizes["F16"] > sizes["Q8_0"] > sizes["Q5_K_M"] > sizes["Q4_K_M"] > sizes["Q4_0"]


def test_requantizing_a_gguf_and_a_bundle(f32, tmp_path, capsys):
    assert main(["convert", str(f32["qwen2"]), "--out", str(tmp_path / "q8"), "--quant", "Q8_0"]) == 0
    assert main(["convert", str(tmp_path / "q8"), "--out", str(tmp_path / "q4"), "--quant", "Q4_0"]) == 0
    capsys.readouterr()
    q4 = open_bundle(tmp_path / "q4")
    assert q4.meta["source"]["kind"] == "bundle" and q4.meta["model"]["quantization"] == "Q4_0"
    assert q4.meta["model"]["architecture"] == "qwen2" and q4.meta["model"]["n_layers"] == 3
    assert main(["ask", "The capital of France is", "--model", str(tmp_path / "q4"), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["mode"] == "full" and answer["model"] == "q4"


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_bad_checkpoints_give_clear_errors_and_leave_nothing(checkpoints, tmp_path, capsys):
    def broken(name: str, edit) -> Path:
        folder = tmp_path / "src" / name
        shutil.copytree(checkpoints["qwen2"], folder)
        edit(folder)
        return folder

    weights = "model.safetensors"
    cases = {
        "corrupt": (lambda f: (f / weights).write_bytes(os.urandom(2000)), "not a readable safetensors"),
        "truncated": (
            lambda f: (f / weights).write_bytes((f / weights).read_bytes()[:-5000]),
            "not a readable safetensors",
        ),
        "no-tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer.json"),
        "no-config": (lambda f: (f / "config.json").unlink(), "has no config.json"),
        "no-weights": (lambda f: (f / weights).unlink(), "has no .safetensors"),
        "gpt2": (
            lambda f: (f / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]})),
            "cannot convert GPT2LMHeadModel; supported: LlamaForCausalLM",
        ),
        "activation": (
            lambda f: (f / "config.json").write_text((f / "config.json").read_text().replace('"silu"', '"relu"')),
            "activation 'relu'",
        ),
        "yarn": (
            lambda f: (f / "config.json").write_text(
                json.dumps(
                    {**json.loads((f / "config.json").read_text()), "rope_scaling": {"type": "yarn", "factor": 4}}
                )
            ),
            "rope_scaling type 'yarn'",
        ),
    }
    out = tmp_path / "out"
    out.mkdir()
    for name, (edit, message) in cases.items():
        code = main(["convert", str(broken(name, edit)), "--out", str(out / name), "--quant", "Q8_0"])
        err = capsys.readouterr().err
        assert code == 1 and message in err and "Traceback" not in err, (name, err)
        assert not (out / name).exists() and leftovers(out) == [], name
    with pytest.raises(UnsupportedArchitectureError):
        convert_checkpoint(broken("gpt2-again", cases["gpt2"][0]), tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match="choose one of"):
        convert_checkpoint(checkpoints["qwen2"], tmp_path / "x.gguf", "Q4_0")
    assert not (tmp_path / "x.gguf").exists()


def test_bad_gguf_sources_and_existing_bundles(f32, tmp_path, tiny_model, capsys):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_model[0].read_bytes()[:5000])
    for source, message in ((truncated, "truncated"), (tmp_path / "nope.gguf", "neither a file")):
        code = main(["convert", str(source), "--out", str(tmp_path / "b"), "--quant", "Q8_0"])
        err = capsys.readouterr().err
        assert code == 1 and message in err and not (tmp_path / "b").exists() and leftovers(tmp_path) == [], err
    assert main(["convert", str(f32["llama"]), "--out", str(tmp_path / "b"), "--quant", "Q8_0"]) == 0
    assert main(["convert", str(f32["llama"]), "--out", str(tmp_path / "b"), "--quant", "Q8_0"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(f32["llama"]), "--out", str(tmp_path / "b"), "--quant", "Q4_0", "--force"]) == 0
    assert open_bundle(tmp_path / "b").meta["model"]["quantization"] == "Q4_0"


def test_bundles_are_verified(f32, tmp_path, capsys):
    b = convert(str(f32["llama"]), tmp_path / "b", "Q8_0")
    model = b.model
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the sha256"):
        load_model(str(tmp_path / "b"))
    model.write_bytes(bytes(data) + b"\0")
    assert main(["ask", "hi", "--model", str(tmp_path / "b")]) == 1
    assert "replaced or damaged" in capsys.readouterr().err
    (tmp_path / "b" / "bundle.json").write_text("{}")
    with pytest.raises(BundleError, match="not an edge-spade bundle"):
        open_bundle(tmp_path / "b")


def arc_file(path: Path, n: int) -> Path:
    words = ["sky", "water", "paris", "blue", "france", "capital", "answer", "question"]
    with path.open("w") as f:
        for i in range(n):
            stem = f"which {words[i % 8]} is the {words[(i * 3 + 1) % 8]} of {words[(i * 5 + 2) % 8]}?"
            choices = [{"label": lab, "text": words[(i + k) % 8]} for k, lab in enumerate("ABCD")]
            row = {"id": f"q{i}", "question": {"stem": stem, "choices": choices}, "answerKey": "A"}
            f.write(json.dumps(row) + "\n")
    return path


def test_calibrate_adds_heads_to_a_bundle(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path / "cache"))
    bundle = convert(str(tiny_model[0]), tmp_path / "tiny", "F32")
    data = arc_file(tmp_path / "arc.jsonl", 30)
    code = main(
        [
            "calibrate",
            "--model",
            str(bundle.folder),
            "--data",
            str(data),
            "--rank",
            "4",
            "--steps",
            "30",
            "--target-agreement",
            "0.5",
        ]
    )
    assert code == 0, capsys.readouterr().err
    b = open_bundle(bundle.folder)
    assert b.heads_dir == bundle.folder / "heads" and "heads.json" in b.meta["heads"]
    rt = load_model(str(bundle.folder), n_ctx=EXACT.n_ctx, kv_type="f32")
    answer = rt.ask("which sky is blue?", ["sky", "water"], threshold=float("inf"))
    choice = rt.manifest.sets["choice"]
    rt.close()
    first = (choice.probe_layers if choice.signal == "spade" else choice.eval_layers)[0]
    assert answer.mode == "spade-exit" and answer.exit_layer == first
    (b.heads_dir / "lspade-choice.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="heads/lspade-choice.onnx is missing or differs"):
        open_bundle(bundle.folder)
    shutil.rmtree(b.heads_dir)
    with pytest.raises(BundleError, match="heads/heads.json is missing"):
        open_bundle(bundle.folder)
    record_heads(b)  # the heads folder is gone: recording again leaves a bundle without heads
    assert open_bundle(bundle.folder).heads_dir is None


def test_pull_verifies_against_the_hub_sha(monkeypatch, tmp_path, tiny_model, capsys):
    """hf_hub_download and the hub's file info are replaced at huggingface-hub's boundary."""
    import huggingface_hub

    from edge_spade import registry

    calls = []
    monkeypatch.setattr(
        huggingface_hub,
        "hf_hub_download",
        lambda repo_id, filename, revision: calls.append((repo_id, filename)) or str(tiny_model[0]),
    )
    monkeypatch.setattr(registry, "hub_sha256", lambda repo, file, rev: sha256_file(tiny_model[0]))
    assert main(["pull", "someone/Tiny-GGUF", "--file", "tiny.gguf", "--out", str(tmp_path / "p")]) == 0
    assert calls == [("someone/Tiny-GGUF", "tiny.gguf")]
    b = open_bundle(tmp_path / "p")
    assert b.meta["source"] == {
        "kind": "hub-gguf",
        "repo": "someone/Tiny-GGUF",
        "file": "tiny.gguf",
        "revision": "main",
    }
    assert b.model.read_bytes() == tiny_model[0].read_bytes()
    monkeypatch.setattr(registry, "hub_sha256", lambda repo, file, rev: "0" * 64)
    assert main(["pull", "someone/Tiny-GGUF", "--file", "tiny.gguf"]) == 1
    assert "expected 0000" in capsys.readouterr().err
    assert main(["pull", "someone/Tiny", "--file", "model.safetensors"]) == 1
    assert "edge-spade convert someone/Tiny" in capsys.readouterr().err


def test_convert_from_a_hub_repo_id(monkeypatch, checkpoints, tmp_path):
    import huggingface_hub

    seen = {}

    def fake_snapshot(repo_id, revision, allow_patterns, cache_dir=None):
        seen.update(repo=repo_id, revision=revision, patterns=allow_patterns)
        return str(checkpoints["gemma3"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    b = convert("google/tiny-gemma", tmp_path / "g", "Q8_0", revision="v1")
    assert seen["repo"] == "google/tiny-gemma" and seen["revision"] == "v1"
    assert "*.safetensors" in seen["patterns"] and "*.bin" not in seen["patterns"]
    verification = b.meta["source"].pop("verification")
    assert b.meta["source"] == {"kind": "hub", "repo": "google/tiny-gemma", "revision": "v1", "quant": "Q8_0"}
    assert verification["against"] == "F16" and verification["relative_error"] <= verification["tolerance"]
    assert b.meta["model"]["architecture"] == "gemma3"


def test_streamed_tensors_are_byte_identical(checkpoints, f32, tmp_path, monkeypatch):
    """Large tensors are converted in row chunks; force that path on a tiny model and compare bytes."""
    from edge_spade.convert import hf_to_gguf as converter

    streamed_sources = []
    stream_init = converter._RowStream.__init__

    def spy(self, ckpt, plan):
        streamed_sources.append(plan.source)
        stream_init(self, ckpt, plan)

    monkeypatch.setattr(converter._RowStream, "__init__", spy)
    from edge_spade.convert.checkpoint import Checkpoint

    reads = []
    rows = Checkpoint.rows
    monkeypatch.setattr(Checkpoint, "rows", lambda self, name, a, b: reads.append(name) or rows(self, name, a, b))
    monkeypatch.setattr(converter, "STREAM_BYTES", 4096)  # every untransformed matrix streams, in many chunks
    streamed = convert_checkpoint(checkpoints["llama"], tmp_path / "streamed.gguf", "F32")
    assert streamed.read_bytes() == f32["llama"].read_bytes()
    assert "model.embed_tokens.weight" in streamed_sources and reads.count("model.embed_tokens.weight") > 10
    assert "model.layers.0.self_attn.q_proj.weight" not in streamed_sources  # permuted: converted whole
    for outtype in ("F16", "BF16"):
        a = convert_checkpoint(checkpoints["gemma3"], tmp_path / f"s-{outtype}.gguf", outtype)
        monkeypatch.setattr(converter, "STREAM_BYTES", 1 << 40)
        b = convert_checkpoint(checkpoints["gemma3"], tmp_path / f"w-{outtype}.gguf", outtype)
        monkeypatch.setattr(converter, "STREAM_BYTES", 4096)
        assert a.read_bytes() == b.read_bytes(), outtype


def transformers5_config(cfg: dict) -> dict:
    """The same settings as transformers 5 saves them: RoPE in `rope_parameters` (one dict, or one per
    attention kind for gemma3), the top-level rope keys gone or null."""
    out = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_local_base_freq")}
    out["rope_scaling"] = None
    full = {"rope_type": "default", **(cfg.get("rope_scaling") or {}), "rope_theta": cfg["rope_theta"]}
    if "rope_local_base_freq" in cfg:
        local = {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]}
        out["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    else:
        out["rope_parameters"] = full
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers5_configs_convert_to_the_same_gguf(arch, checkpoints, f32, tmp_path):
    """llama with Llama 3 RoPE, qwen2, gemma3 with two RoPE bases: the 5.x config gives the very GGUF
    the 4.x config gives (before, 5.x configs silently got base 10000 and no Llama 3 factors)."""
    folder = tmp_path / arch
    shutil.copytree(checkpoints[arch], folder)
    v4 = json.loads((folder / "config.json").read_text())
    v5 = transformers5_config(v4)
    assert "rope_theta" not in v5 and v5["rope_parameters"]
    (folder / "config.json").write_text(json.dumps(v5))
    written = convert_checkpoint(folder, tmp_path / "v5.gguf", "F32")
    assert written.read_bytes() == f32[arch].read_bytes()
    # and the numpy forward, reading the 5.x config on its own, agrees with llama.cpp on the written file
    from edge_spade.convert.verify import verify_conversion

    assert verify_conversion(folder, written, "F32")["relative_error"] < 1e-3


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: {**c, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_parameters type 'yarn' is not supported",
        ),
        (
            lambda c: {**c, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            "rope_parameters type 'dynamic'",
        ),
        (
            lambda c: {**c, "rope_parameters": {"full_attention": {"rope_theta": 1e6}, "chunked_attention": {}}},
            "rope_parameters.chunked_attention: unknown attention kind",
        ),
        (
            lambda c: {**c, "rope_theta": 5e5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
            "rope_theta 500000.0 and rope_parameters.rope_theta 10000.0 disagree",
        ),
        (lambda c: {**c, "rope_parameters": {"rope_type": "default"}}, "rope_parameters.rope_theta is missing"),
        (lambda c: {**c, "rope_scaling": {"rope_type": "longrope", "factor": 4}}, "rope_scaling type 'longrope'"),
        (lambda c: {**c, "use_sliding_window": True, "sliding_window": 4}, "use_sliding_window is set"),
        (
            lambda c: {**c, "layer_types": ["full_attention", "chunked_attention"]},
            "layer_types[1] 'chunked_attention': unknown attention kind",
        ),
    ],
)
def test_rope_settings_that_change_the_math_are_refused_by_key(checkpoints, tmp_path, edit, message):
    folder = tmp_path / "qwen2"
    shutil.copytree(checkpoints["qwen2"], folder)
    cfg = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "rope_theta"}
    if "disagree" in message:
        cfg["rope_theta"] = 5e5
    (folder / "config.json").write_text(json.dumps(edit(cfg)))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert_checkpoint(folder, tmp_path / "x.gguf", "F32")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_conversion_is_verified_and_recorded(arch, checkpoints, tmp_path):
    """The bundle records the relative error of llama.cpp's logits on the written file against the
    checkpoint's own forward pass (numpy, convert/verify.py), with top-1 agreement."""
    for quant, against in (("F32", "F32"), ("Q8_0", "F16")):
        v = convert(str(checkpoints[arch]), tmp_path / f"{arch}-{quant}", quant).meta["source"]["verification"]
        assert v["against"] == against and v["top1_agrees"] and v["sentence_tokens"] > 10
        assert v["relative_error"] <= v["tolerance"] and (against != "F32" or v["relative_error"] < 1e-3)


def test_a_conversion_that_corrupts_a_tensor_is_refused(checkpoints, tmp_path, monkeypatch, capsys):
    """A deliberately wrong tensor (as a converter bug would write it): refused with the error named,
    no bundle left; --no-verify keeps it and records that nothing was checked."""
    from edge_spade.convert import hf_to_gguf

    transform = hf_to_gguf._transform

    def corrupting(src, dst, spec, hp):
        inner = transform(src, dst, spec, hp)
        return (lambda w: inner(w) * 1.5) if src == "model.layers.0.mlp.down_proj.weight" else inner

    monkeypatch.setattr(hf_to_gguf, "_transform", corrupting)
    argv = ["convert", str(checkpoints["llama"]), "--out", str(tmp_path / "bad"), "--quant", "F32"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "differ from the checkpoint's own by" in err and "--no-verify" in err and not (tmp_path / "bad").exists()
    assert main([*argv, "--no-verify"]) == 0
    assert open_bundle(tmp_path / "bad").meta["source"]["verification"] is None


@pytest.mark.parametrize("key", ["final_logit_softcapping", "attn_logit_softcapping"])
def test_gemma_softcapping_is_refused_by_key(checkpoints, tmp_path, key):
    folder = tmp_path / "gemma3"
    shutil.copytree(checkpoints["gemma3"], folder)
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), key: 30.0}))
    with pytest.raises(CheckpointError, match=f"{key} is set"):
        convert_checkpoint(folder, tmp_path / "x.gguf", "F32")
