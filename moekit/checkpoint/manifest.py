"""Checkpoint manifests: every file's size and sha256, written LAST, verified before any resume.

A training checkpoint (`<out>/checkpoints/step-XXXXXXX/`) is complete only when its
`manifest.json` exists and every file it lists has the recorded size and checksum. The manifest is
written after all other files (atomically), so a save killed at any point leaves either no manifest
(incomplete) or a manifest that matches; a file truncated, removed or corrupted later (disk full,
a copy gone wrong, bit rot) no longer matches. `resolve_resume` walks the checkpoints newest first
and returns the first that verifies, warning with the name of each damaged one and why.

A checkpoint written before manifests existed (LATEST names it, it has no manifest) is accepted
as "unverified", as before, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

from moekit.checkpoint.native import atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "moekit-checkpoint-manifest/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (damaged or incomplete) or could not be verified."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _payload_files(ck: Path) -> list[Path]:
    """Every regular file of the checkpoint except the manifest and leftover temp files."""
    return sorted(p for p in ck.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(ck: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Record size and sha256 of every file in `ck`; call after the last file is in place."""
    ck = Path(ck)
    files = {p.relative_to(ck).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _payload_files(ck)}
    doc = {"format": FORMAT, "files": files, **(extra or {})}
    atomic_write_text(ck / MANIFEST, json.dumps(doc, indent=1, sort_keys=True))
    return ck / MANIFEST


def remove_manifest(ck: str | Path) -> None:
    """Mark `ck` incomplete before rewriting it (a re-save of the same step after a fallback)."""
    (Path(ck) / MANIFEST).unlink(missing_ok=True)


def verify(ck: str | Path) -> str | None:
    """None when `ck` matches its manifest, else why not (first problem found)."""
    ck = Path(ck)
    mf = ck / MANIFEST
    if not mf.is_file():
        return f"no {MANIFEST} (the save did not finish)"
    try:
        doc = json.loads(mf.read_text())
        files = doc["files"]
        if doc.get("format") != FORMAT or not isinstance(files, dict) or not files:
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for rel, want in sorted(files.items()):
        p = ck / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
        if sha256_file(p) != want["sha256"]:
            return f"{rel} fails its sha256 check (corrupted)"
    return None


def step_dirs(out: str | Path) -> list[Path]:
    """The run's `step-N` checkpoint directories, newest (highest step) first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def resolve_resume(out: str | Path, warn: bool = True) -> Path | None:
    """The newest checkpoint of run `out` that verifies against its manifest, or None.

    Plan: 1. newest first, verify each; skip (and warn about) the damaged ones; 2. return the first
    that verifies; 3. a run with no manifest at all (written by an older moekit) falls back to the
    LATEST pointer, unverified."""
    dirs = step_dirs(out)
    damaged: list[tuple[Path, str]] = []
    for ck in dirs:
        why = verify(ck)
        if why is None:
            if damaged and warn:
                for bad, reason in damaged:
                    warnings.warn(f"checkpoint {bad} is damaged: {reason}; resuming from {ck.name} instead",
                                  CheckpointWarning, stacklevel=2)
            return ck
        damaged.append((ck, why))
    # moekit writes LATEST only after the manifest, so LATEST naming a checkpoint without one means
    # an older moekit wrote it.
    legacy = _legacy_latest(Path(out))
    if legacy is not None and not (legacy / MANIFEST).is_file():
        if warn:
            warnings.warn(f"checkpoint {legacy} has no {MANIFEST} (written by an older moekit): loading it "
                          "unverified", CheckpointWarning, stacklevel=2)
        return legacy
    if damaged and warn:
        for bad, reason in damaged:
            warnings.warn(f"checkpoint {bad} is damaged: {reason}", CheckpointWarning, stacklevel=2)
    return None


def _legacy_latest(out: Path) -> Path | None:
    """What the LATEST pointer names (the pre-manifest rule), if that checkpoint has its state file."""
    ptr = out / "checkpoints" / "LATEST"
    if not ptr.is_file():
        return None
    ck = ptr.parent / ptr.read_text().strip()
    return ck if (ck / "trainer_state.json").is_file() else None


def describe_damage(out: str | Path) -> str:
    """One line per checkpoint that fails verification (for error messages)."""
    return "; ".join(f"{d.name}: {why}" for d in step_dirs(out) if (why := verify(d)) is not None)
