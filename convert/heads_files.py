"""Writing a heads folder (never half-written) and keeping the head sets a merge does not replace."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from edge_spade.manifest import HeadSet, HeadsManifest, HeadsMismatchError, load_manifest

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"


def kept_heads(
    folder: Path, fingerprint: str, rank: int, replaced: set[str]
) -> tuple[dict[str, HeadSet], dict[str, bytes]]:
    """The head sets (and their ONNX and domain files) of `folder` that a calibration of `replaced` kinds keeps.

    Checked before any work: the heads must be this model's (output fingerprint), of the same rank
    (the manifest records one), and their files must match their sha256.
    """
    if not (folder / "heads.json").exists():
        return {}, {}
    old = load_manifest(folder)
    if old.output_fingerprint != fingerprint:
        raise HeadsMismatchError(
            f"the heads in {folder} were made for another model's output matrix: merge only into this model's heads"
        )
    if old.rank != rank:
        raise HeadsMismatchError(
            f"the heads in {folder} have rank {old.rank}: calibrate with --rank {old.rank} to merge into them"
        )
    sets = {kind: head_set for kind, head_set in old.sets.items() if kind not in replaced}
    files = {}
    for head_set in sets.values():
        for name in [head_set.file, *([head_set.domain["file"]] if head_set.domain else [])]:  # heads, domain gate
            try:
                data = (folder / name).read_bytes()
            except OSError as exc:
                raise HeadsMismatchError(f"cannot read {folder / name}: {exc}") from None
            if hashlib.sha256(data).hexdigest() != old.hashes.get(name):
                raise HeadsMismatchError(f"{folder / name} does not match its sha256 in heads.json")
            files[name] = data
    return sets, files


def write_heads(out_dir: Path, manifest: HeadsManifest, files: dict[str, bytes]) -> Path:
    """Write into a temporary sibling folder, then swap it in: never a half-written heads folder."""
    manifest.hashes = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return _swap_in(out_dir, {**files, "heads.json": json.dumps(manifest.to_dict(), indent=1).encode()})


def default_report_dir(out_dir: Path) -> Path:
    """The calibration report beside the heads folder, not in it: the heads folder ships."""
    return out_dir.with_name(f"{out_dir.name}-calibration")


def kept_reports(folder: Path, kinds: set[str]) -> tuple[dict[str, dict], dict[str, bytes]]:
    """The report entries (and tuned-lens files) of head sets a merge keeps; none if the report is gone."""
    try:
        old = json.loads((folder / REPORT_JSON).read_text())
    except (OSError, ValueError):
        if kinds:
            log.warning(
                "no calibration report in %s: the kept head sets' curves and baselines are not carried over", folder
            )
        return {}, {}
    entries, files = {}, {}
    for kind in kinds & set(old.get("sets", {})):
        entry = old["sets"][kind]
        try:
            files[entry["tuned_file"]] = (folder / entry["tuned_file"]).read_bytes()
        except (OSError, KeyError):
            log.warning("the tuned-lens file of the kept %s set is missing from %s", kind, folder)
        entries[kind] = entry
    return entries, files


def rewrite_manifest(heads_dir: Path, report_dir: Path, manifest: HeadsManifest) -> None:
    """heads.json rewritten in place (the ONNX files untouched) and its new sha256 recorded in the
    calibration report, where there is one: tools that add to calibrated heads without retraining."""
    path = heads_dir / "heads.json"
    path.write_text(json.dumps(manifest.to_dict(), indent=1))
    report_path = report_dir / REPORT_JSON
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report["heads_json_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        report["heads_hashes"] = manifest.hashes  # a tool may add files (a domain gate) beside the heads
        report_path.write_text(json.dumps(report, indent=1))


def write_report(folder: Path, manifest: HeadsManifest, sets: dict[str, dict], files: dict[str, bytes]) -> Path:
    """The calibration report: per answer kind, the threshold curves of L-SPADE, the probes and the lens
    baselines, per-layer statistics and the tail-width frontier, with the tuned-lens heads beside it."""
    report = {
        "model": manifest.model,
        "model_file": manifest.model_file,
        "output_fingerprint": manifest.output_fingerprint,
        "heads_hashes": manifest.hashes,
        "sets": sets,
    }
    return _swap_in(folder, {**files, REPORT_JSON: json.dumps(report, indent=1).encode()})


def _swap_in(out_dir: Path, files: dict[str, bytes]) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        if out_dir.exists():
            out_dir.replace(old)
        tmp.chmod(0o755)
        tmp.replace(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", out_dir)
    return out_dir
