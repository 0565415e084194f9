"""Streaming HF-checkpoint <-> moekit state-dict mapping shared by every HF architecture.

A *plan* says, for every moekit tensor, which Hugging Face tensors fill which part of it:
`{moekit_key: [Piece(hf_key, expert=e, rows=(a, b), src_index=..., transpose=..., fwd=..., inv=...)]}`.
Loading walks the plan once, reading each HF tensor (or one expert's slice of a fused tensor) and
copying it straight into a preallocated destination, so per-expert tensors stack into `[E, 2F, D]`
without a second full copy. `moekit.checkpoint.hf.load_hf` supplies a positioned-read reader;
`ShardedReader` here is the memory-mapped alternative (same interface; see
benchmarks/hf_load_memory.py for why load_hf does not use it). Export walks the same plan
backwards. Nothing here uses pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moekit.checkpoint.native import CheckpointError

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Piece:
    hf_key: str
    expert: int | None = None
    """Index along the destination's leading (expert) dim, or None for the whole tensor."""
    rows: tuple[int, int] | None = None
    """Row range [a, b) of the destination (after the expert index) this piece fills."""
    src_index: int | None = None
    """Read only this index of the HF tensor's leading dim (fused [E, ...] expert tensors); the
    slice is read alone from the memory map, so E pieces never read the whole tensor E times."""
    transpose: bool = False
    """The HF tensor is the transpose of the (2-D) destination slice (Llama 4 fused experts)."""
    fwd: Fn | None = None
    """Shape-preserving HF -> moekit row permutation (rope de-interleave), after any transpose."""
    inv: Fn | None = None
    """moekit -> HF (the inverse of `fwd`)."""
    src_shape: tuple[int, ...] | None = None
    """The HF tensor's shape (after `src_index`) when `fwd` changes the shape: a re-layout such as
    gpt-oss's MXFP4 blocks [O, I/32, 16] -> moekit's packed codes [O, I/2]."""


Plan = dict[str, list[Piece]]


class SkippingPlan(dict):
    """A plan that also names checkpoint tensors to skip, decided with the model config in hand
    (e.g. DeepSeek's MTP layers sit at layer indices >= num_hidden_layers)."""

    def __init__(self, plan: Plan, skip: Callable[[str], bool]):
        super().__init__(plan)
        self.skip = skip


def gated_mlp_pieces(plan: "Plan", mk: str, hf: str, width: int) -> None:
    """Map an HF gated MLP (`{hf}gate_proj`, `up_proj`, `down_proj`) onto moekit's fused
    `{mk}w13.weight` (gate rows, then up rows) and `{mk}w2.weight`; used for dense FFNs and
    shared experts by every architecture."""
    plan[mk + "w13.weight"] = [Piece(hf + "gate_proj.weight", rows=(0, width)),
                               Piece(hf + "up_proj.weight", rows=(width, 2 * width))]
    plan[mk + "w2.weight"] = [Piece(hf + "down_proj.weight")]


def deinterleave_rows(n_heads: int, head: int, start: int, width: int) -> tuple[Fn, Fn]:
    """Row permutation turning interleaved rope pairs (x0, x1), (x2, x3) .. into rotate-half order
    (x0, x2, .. | x1, x3, ..) in rows [start, start+width) of each of `n_heads` blocks of `head`
    rows; returns (forward, inverse) functions on [rows, ...] tensors."""
    perm = []
    for h in range(n_heads):
        base = h * head
        block = list(range(base, base + head))
        rope = block[start:start + width]
        block[start:start + width] = rope[0::2] + rope[1::2]
        perm += block
    perm_t = torch.tensor(perm)
    inv_t = torch.empty_like(perm_t)
    inv_t[perm_t] = torch.arange(len(perm))
    return (lambda t: t.index_select(0, perm_t)), (lambda t: t.index_select(0, inv_t))


class ShardedReader:
    """Lazy reader over `model.safetensors` or an index-sharded checkpoint (memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path
        self._handles: dict[Path, object] = {}
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            self.where = {k: path / f for k, f in wm.items()}
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are not "
                                      "loaded for safety; convert them with transformers' save_pretrained)")
            self.where = {}
            for f in files:
                for k in self._open(f).keys():
                    self.where[k] = f

    def _open(self, f: Path):
        if f not in self._handles:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in the index is missing")
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e}); the file may be truncated") from None
        return self._handles[f]

    def keys(self) -> set[str]:
        return set(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.where[key]).get_slice(key).get_shape())

    def get(self, key: str, index: int | None = None) -> torch.Tensor:
        f = self.where.get(key)
        if f is None:
            raise CheckpointError(f"{self.path}: missing tensor {key!r}")
        try:
            h = self._open(f)
            return h.get_tensor(key) if index is None else h.get_slice(key)[index]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: tensor {key!r} cannot be read ({e}); the file may be truncated") from None


def load_with_plan(model, plan: Plan, reader: ShardedReader, dtype: torch.dtype | None,
                   ignore: Callable[[str], bool] = lambda k: False) -> None:
    """Fill a meta-device `model` from `reader` following `plan` (every moekit tensor is covered)."""
    # Plan: 1. check coverage both ways (missing / unexpected tensors fail before any copy);
    # 2. per destination allocate once in the target dtype and copy each piece, checking shapes;
    # 3. assign into the model (strict, so nothing is left on the meta device).
    sd_meta = model.state_dict()
    unplanned = sorted(set(sd_meta) - set(plan))
    if unplanned:
        raise CheckpointError(f"internal: no HF source for moekit tensors {unplanned[:5]}")
    needed = {p.hf_key for pieces in plan.values() for p in pieces}
    have = reader.keys()
    missing = sorted(needed - have)
    if missing:
        raise CheckpointError(f"{reader.path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                              "does config.json match these weights?")
    skip = getattr(plan, "skip", None) or (lambda k: False)
    extra = sorted(k for k in have - needed if not ignore(k) and not skip(k))
    if extra:
        raise CheckpointError(f"{reader.path}: unexpected tensor(s) {extra[:5]}; does config.json match these weights?")
    if dtype is None:
        first = next(iter(plan.values()))[0].hf_key
        dtype = reader.get(first).dtype
    out = {}
    for key, pieces in plan.items():
        meta = sd_meta[key]
        # The routing selection bias stays float32 whatever the model dtype (see moe/router.py);
        # integer tensors (quantized codes and scales) keep the dtype the model declares.
        dt = torch.float32 if key.endswith("score_bias") else dtype if meta.is_floating_point() else meta.dtype
        dest = torch.empty(meta.shape, dtype=dt)
        for p in pieces:
            view = dest if p.expert is None else dest[p.expert]
            if p.rows is not None:
                view = view[p.rows[0]:p.rows[1]]
            # Check the shape from the header before reading (names the HF tensor, in HF layout).
            want = p.src_shape or (tuple(view.shape)[::-1] if p.transpose else tuple(view.shape))
            got = reader.shape(p.hf_key)
            if p.src_index is not None:
                if not got or got[0] <= p.src_index:
                    raise CheckpointError(f"{reader.where[p.hf_key]}: tensor {p.hf_key!r} has shape {got}, "
                                          f"config expects at least {p.src_index + 1} entries in its first dim")
                got = got[1:]
            if got != want:
                raise CheckpointError(f"{reader.where[p.hf_key]}: tensor {p.hf_key!r} has shape {got}, config expects {want}")
            src = reader.get(p.hf_key, p.src_index)
            if p.transpose:
                src = src.t()
            view.copy_(p.fwd(src) if p.fwd is not None else src)
            del src
        out[key] = dest
    model.load_state_dict(out, strict=True, assign=True)


def export_with_plan(model, plan: Plan, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """moekit state -> HF tensors (inverse of `load_with_plan`); pieces of one HF tensor never split."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    for key, pieces in plan.items():
        t = sd[key].detach().cpu()
        for p in pieces:
            view = t if p.expert is None else t[p.expert]
            if p.rows is not None:
                view = view[p.rows[0]:p.rows[1]]
            v = p.inv(view) if p.inv is not None else view
            if p.transpose:
                v = v.t()
            if dtype is not None and v.is_floating_point() and not key.endswith("score_bias"):
                v = v.to(dtype)
            if p.src_index is None:
                out[p.hf_key] = v.contiguous().clone()
            else:
                stacked.setdefault(p.hf_key, {})[p.src_index] = v
    for k, parts in stacked.items():
        out[k] = torch.stack([parts[i] for i in range(len(parts))]).contiguous()
    return out


def build_meta(cfg):
    from moekit.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg)


def finish(model, device) -> torch.nn.Module:
    from moekit.checkpoint.native import materialize_buffers

    materialize_buffers(model)
    return model.to(device).eval()
