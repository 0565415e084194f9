"""`moekit convert`: load any supported checkpoint and write it as moekit-native or Hugging Face.

Sources: a moekit model directory, a Hugging Face directory (see `hf_config.architectures()`)
or a `.gguf` file. Targets: `moekit` (config.json + model.safetensors), `hf` (a directory that
transformers loads with the same logits) and `gguf` (provided by `moekit.checkpoint.gguf_export`
when that module is installed).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch

from moekit.checkpoint.native import CheckpointError, atomic_write_text

DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_out(out: Path, src: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: output is the source; choose another output directory")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: directory is not empty; pass --overwrite or choose an empty directory")


def convert(src: str | Path, out: str | Path, to: str = "moekit", dtype: torch.dtype | None = None,
            arch: str | None = None, max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """Load `src` (any format `moekit.load_model` reads) and write it to `out` in format `to`."""
    from moekit.checkpoint import load_any

    src, out = Path(src), Path(out)
    _check_out(out, src, overwrite)
    if to == "gguf":
        from moekit.checkpoint.gguf import require_gguf

        require_gguf()  # without the gguf package: a MoekitError naming `pip install 'moekit[hf]'`, before loading
    if to not in ("moekit", "hf", "gguf"):
        raise CheckpointError(f"--to: unknown target {to!r}; choose moekit, hf or gguf")
    model = load_any(src, dtype=dtype)
    if to == "hf":
        from moekit.checkpoint.hf_export import export_hf

        return export_hf(model, out, arch=arch, max_shard_size=max_shard_size)
    if to == "gguf":
        from moekit.checkpoint.gguf_export import export_gguf

        return export_gguf(model, out)
    from moekit.checkpoint.native import save_model

    save_model(model, out)
    tok = getattr(model, "tokenizer", None)
    if tok is not None and hasattr(tok, "to_str"):
        atomic_write_text(out / "tokenizer.json", tok.to_str())
    return out


def convert_cli(src: str, out: str, to: Literal["moekit", "hf", "gguf"] = "moekit",
                dtype: Literal["keep", "float32", "bfloat16", "float16"] = "keep", arch: str | None = None,
                max_shard_size: str = "5GB", overwrite: bool = False) -> int:
    """Convert a checkpoint between moekit, Hugging Face and GGUF formats.

    Reads a moekit directory, a Hugging Face directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
    Llama, Mistral, Qwen2, DeepSeek, Llama 4, gpt-oss with its MXFP4 experts kept as MXFP4) or a
    .gguf file, and writes it in the target format. `--to hf` writes a directory transformers loads with the same logits,
    choosing the closest architecture that expresses the model exactly.

    Args:
        src: source checkpoint (model directory or .gguf file).
        out: output directory.
        to: target format.
        dtype: cast floating-point weights (keep = leave as stored; bf16 stays bf16).
        arch: HF architecture to export as (e.g. MixtralForCausalLM); default: pick automatically.
        max_shard_size: largest safetensors shard for --to hf (e.g. 5GB, 500MiB); larger outputs are sharded with an index.
        overwrite: allow writing into a non-empty output directory.
    """
    t0 = time.perf_counter()
    path = convert(src, out, to=to, dtype=DTYPES[dtype], arch=arch, max_shard_size=max_shard_size,
                   overwrite=overwrite)
    files = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
    print(f"wrote {to} checkpoint to {path} ({', '.join(files)}) in {time.perf_counter() - t0:.1f}s")
    return 0


__all__ = ["convert", "convert_cli"]
