"""moekit's own checkpoint format: `config.json` + `model.safetensors` in a directory.

Writes are atomic per file (temp file in the same directory, fsync, os.replace), weights before
config, so an interrupted save never leaves a config pointing at half-written weights. Nothing is
ever loaded with pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moekit.config import ConfigError, ModelConfig
from moekit.errors import MoekitError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(MoekitError, ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere os.umask can only be read by setting
    it, so it is set back at once (a process-wide change for an instant)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) then atomically move tmp_path onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 minus the umask),
        # so outputs are readable by the group/others as users expect.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_model(model, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Save weights (safetensors) and config (json) into directory `path`. A model holding quantized
    weights (`model.quant_config`: quantized in memory, or an imported gpt-oss with MXFP4 experts)
    is written as a quantized checkpoint, which `load_native` reads back the same."""
    path = Path(path)
    qcfg = getattr(model, "quant_config", None)
    if qcfg is not None:
        if dtype is not None:
            raise CheckpointError("a quantized model is saved as it is held; cast its float parts when loading "
                                  "(moekit.load_model(path, dtype=...)) instead of passing dtype to save_model")
        from moekit.quant.checkpoint import save_quantized

        return save_quantized(model, qcfg, path)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("score_bias") else v) for k, v in sd.items()}
    sd = {k: v.cpu() for k, v in sd.items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(sd, tmp, metadata={"format": "pt", "moekit": "1"}))
    atomic_write_text(path / CONFIG_NAME, model.config.to_json())
    return path


def is_native(path: str | Path) -> bool:
    p = Path(path) / CONFIG_NAME
    if not p.is_file():
        return False
    try:
        return "moekit_version" in json.loads(p.read_text())
    except json.JSONDecodeError:
        return False


def read_safetensors(file: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Load tensors by name, checking names and shapes against the model's expectations."""
    try:
        f = safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); re-save or re-download it") from None
    with f:
        names = set(f.keys())
        missing = sorted(set(expected) - names)
        if missing:
            raise CheckpointError(f"{file}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        extra = sorted(names - set(expected))
        if extra:
            raise CheckpointError(f"{file}: unexpected tensor(s) {extra[:5]}; does config.json match these weights?")
        for k in expected:
            shape = tuple(f.get_slice(k).get_shape())
            if shape != tuple(expected[k]):
                raise CheckpointError(f"{file}: tensor {k!r} has shape {shape}, config expects {tuple(expected[k])}")
    out = {}
    for k in expected:
        try:
            # Copy out of the file mapping: mapped tensors sit at arbitrary byte offsets, and
            # misaligned weights take slower BLAS paths with different rounding (a reloaded model
            # would not reproduce its logits bit for bit). One mapping per tensor, closed right
            # after the copy: mapped file pages count as resident memory until unmapped, so one
            # mapping for the whole file doubled the peak RSS of a load (2.68 GiB for 1.19 GiB).
            with safe_open(str(file), framework="pt") as g:
                out[k] = g.get_tensor(k).clone()
        except Exception as e:
            raise CheckpointError(f"{file}: tensor {k!r} cannot be read ({e}); the file may be truncated") from None
    return out


def load_native(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a moekit checkpoint directory exactly as saved."""
    from moekit.model.transformer import Transformer

    path = Path(path)
    from moekit.quant.checkpoint import is_quantized, load_quantized  # a quantized checkpoint: its own builder

    if is_quantized(path):
        return load_quantized(path, dtype=dtype, device=device)
    try:
        cfg = ModelConfig.from_json(path / CONFIG_NAME)
    except (ConfigError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from None
    # Build on the meta device (no random init, no double memory), then assign loaded tensors.
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = read_safetensors(path / WEIGHTS_NAME, expected)
    model.load_state_dict(sd, strict=True, assign=True)
    materialize_buffers(model)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def materialize_buffers(model) -> None:
    """Recreate non-persistent buffers (RoPE frequencies) after a meta-device build."""
    from moekit.model.rope import RotaryEmbedding

    cfg = model.config
    r = model.rope
    model.rope = RotaryEmbedding(r.dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
