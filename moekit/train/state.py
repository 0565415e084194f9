"""Training checkpoints: model + optimizer + schedule + RNG + data position, never pickled.

Layout of one checkpoint, `<out>/checkpoints/step-XXXXXXX/`:
    manifest.json                    size + sha256 of every file, written last (moekit.checkpoint.manifest)
    config.json, model.safetensors   the model (a normal moekit model directory: loadable anywhere)
    optimizer.safetensors            AdamW moments and step counts, keyed "<param index>.<name>"
    rng.safetensors                  torch CPU generator state
    trainer_state.json               step, tokens, schedule, sampler state, param groups, history
    tokenizer.json                   the tokenizer the model was trained with
`<out>/checkpoints/LATEST` names the newest complete checkpoint. It is rewritten atomically only
after every file of the new checkpoint is in place, so a write interrupted at any point leaves the
previous checkpoint as the one that loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moekit.checkpoint.manifest import remove_manifest, write_manifest
from moekit.checkpoint.native import CheckpointError, atomic_write, atomic_write_text, save_model

LATEST = "LATEST"


def _ckpt_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    root = _ckpt_root(Path(out))
    ptr = root / LATEST
    if not ptr.is_file():
        return None
    ck = root / ptr.read_text().strip()
    return ck if (ck / "trainer_state.json").is_file() else None


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"{idx}.{k}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, file: Path, groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = f.get_tensor(key)
    gs = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    opt.load_state_dict({"state": state, "param_groups": gs})


def save_checkpoint(out: Path, step: int, model, opt, state: dict[str, Any], tokenizer_path: Path | None,
                    keep: int = 2) -> Path:
    """Write a complete checkpoint for `step`, then point LATEST at it and prune old ones."""
    # Plan: 1. every file into step-N/ (each atomic); 2. LATEST -> step-N atomically; 3. prune.
    root = _ckpt_root(out)
    name = f"step-{step:07d}"
    ck = root / name
    remove_manifest(ck)  # a re-save of this step (after a fallback) is incomplete until its manifest
    save_model(model, ck)
    tensors, groups = optimizer_tensors(opt)
    atomic_write(ck / "optimizer.safetensors", lambda tmp: save_file(tensors, tmp))
    rng = {"torch_cpu": torch.get_rng_state()}
    atomic_write(ck / "rng.safetensors", lambda tmp: save_file(rng, tmp))
    if tokenizer_path is not None and Path(tokenizer_path).is_file():
        atomic_write(ck / "tokenizer.json", lambda tmp: shutil.copyfile(tokenizer_path, tmp))
    atomic_write_text(ck / "trainer_state.json", json.dumps({**state, "param_groups": groups}, indent=1))
    write_manifest(ck)  # last: its presence (and match) is what makes the checkpoint complete
    atomic_write_text(root / LATEST, name)
    olds = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return ck


def load_checkpoint(ck: Path, model, opt) -> dict[str, Any]:
    """Restore model weights, optimizer state and the RNG in place; return the trainer state."""
    from moekit.checkpoint.native import read_safetensors

    try:
        state = json.loads((ck / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ck}/trainer_state.json: unreadable ({e}); resume from an earlier checkpoint") from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = read_safetensors(ck / "model.safetensors", expected)
    model.load_state_dict(sd, strict=True)
    try:
        load_optimizer(opt, ck / "optimizer.safetensors", state["param_groups"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{ck}: optimizer state does not match this model ({e}); start a new --out") from None
    with safe_open(str(ck / "rng.safetensors"), framework="pt") as f:
        torch.set_rng_state(f.get_tensor("torch_cpu"))
    return state
