"""Bits-per-byte evaluation, greedy samples, and the `moekit eval` command.

Shape legend: B batch, S sequence, V vocab.

Bits per byte = summed next-token NLL (nats) / ln 2 / UTF-8 bytes of the text the targets encode.
It does not depend on the tokenizer, so models with different vocabularies compare fairly. When an
evaluation is capped at `max_tokens`, the byte count is that of the covered targets, measured by
decoding them (byte-level BPE decodes to the exact original bytes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moekit.errors import MoekitError


class EvalError(MoekitError, ValueError):
    """A checkpoint or data directory that cannot be evaluated."""


def _target_bytes(tokenizer, tokens: np.ndarray, eos_id: int) -> int:
    """UTF-8 bytes encoded by `tokens` (EOS separators excluded, as in the data's byte counts)."""
    ids = [int(t) for t in tokens if int(t) != eos_id]
    return len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))


@torch.no_grad()
def evaluate_split(model, data, split: str, *, max_tokens: int | None = None, batch_size: int = 8,
                   seq_len: int = 256, telemetry=None, autocast: bool = False) -> dict[str, Any]:
    """NLL and bits per byte of `model` on one prepared split (optionally its first `max_tokens`).

    Returns {"split", "tokens", "bytes", "nll", "bpb", "loss"}; `telemetry`, when given, observes
    the routing of every eval forward."""
    # Plan: 1. pick the token range; 2. sum NLL over sequential windows; 3. convert with the byte count.
    was_training = model.training
    model.eval()
    ds = data.dataset(split)
    tokens = ds.tokens
    capped = max_tokens is not None and len(tokens) - 1 > max_tokens
    if capped:
        tokens = tokens[: max_tokens + 1]
    seq_len = min(seq_len, model.config.max_seq_len)
    nll = 0.0
    n = 0
    from moekit.data import iter_eval_batches

    for x_BS, y_BS in iter_eval_batches(tokens, batch_size, seq_len):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x_BS, return_routing_ids=False)
        logits = out.logits.float()
        nll += float(F.cross_entropy(logits.view(-1, logits.shape[-1]), y_BS.reshape(-1), reduction="sum"))
        n += y_BS.numel()
        if telemetry is not None:
            telemetry.observe(out.routing)
    n_bytes = _target_bytes(data.tokenizer(), np.asarray(tokens[1:]), data.eos_id) if capped else ds.n_bytes
    model.train(was_training)
    if n == 0 or not n_bytes:
        raise EvalError(f"split {split!r} of {data.root} is empty; re-run `moekit data prepare`")
    return {"split": split, "tokens": n, "bytes": int(n_bytes), "nll": nll, "loss": nll / n,
            "bpb": nll / math.log(2) / n_bytes}


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of `prompt` using the model's KV cache (prefill once, then one token per step)."""
    model.eval()
    ids = tokenizer.encode(prompt).ids or [0]
    ids = ids[-(model.config.max_seq_len - max_new_tokens):]
    max_len = len(ids) + max_new_tokens
    cache = model.new_cache(1, max_len)
    x_BS = torch.tensor([ids])
    out_ids: list[int] = []
    for _ in range(max_new_tokens):
        last = torch.tensor([x_BS.shape[1] - 1])
        out = model(x_BS, cache=cache, logits_at=last)
        cache.advance(x_BS.shape[1])
        nxt = int(out.logits[0, -1].argmax())
        out_ids.append(nxt)
        x_BS = torch.tensor([[nxt]])
    return tokenizer.decode(out_ids, skip_special_tokens=False)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (-> its latest checkpoint) or a checkpoint/model directory itself."""
    from moekit.train.trainer import latest_checkpoint

    p = Path(path)
    if (p / "config.json").is_file():
        return p
    ck = latest_checkpoint(p)
    if ck is None:
        raise EvalError(f"{p}: neither a model directory (config.json) nor a run directory with checkpoints; "
                        "pass the --out directory of `moekit train` or a checkpoint inside it")
    return ck


def data_for_checkpoint(ckpt: Path, data_dir: str | None):
    """The prepared data a checkpoint was trained on (recorded in trainer_state.json), or `data_dir`."""
    from moekit.data import load_prepared

    if data_dir is None:
        st = ckpt / "trainer_state.json"
        if st.is_file():
            data_dir = json.loads(st.read_text())["data_root"]
        else:
            data_dir = "data"
    return load_prepared(data_dir)


def evaluate_all(model, data, *, max_tokens: int | None = None, seq_len: int = 256,
                 splits: list[str] | None = None, progress: bool = True) -> dict[str, dict[str, Any]]:
    """bpb on val, test and every OOD set (each capped at `max_tokens` if given)."""
    names = splits or ["val", "test", *data.ood_names]
    out = {}
    it = names
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc="eval", leave=False)
    for name in it:
        out[name] = evaluate_split(model, data, name, max_tokens=max_tokens, seq_len=seq_len)
    return out


def format_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown table: one row per model, one bpb column per split."""
    models = list(results)
    splits = list(next(iter(results.values()))) if results else []
    head = "| model | " + " | ".join(f"{s} bpb" for s in splits) + " |"
    sep = "|---|" + "---:|" * len(splits)
    rows = [f"| {m} | " + " | ".join(f"{results[m][s]['bpb']:.4f}" for s in splits) + " |" for m in models]
    return "\n".join([head, sep, *rows])


def eval_cli(checkpoint: str, data_dir: str | None = None, max_tokens: int | None = None, seq_len: int = 256,
             json_out: str | None = None, threads: int | None = None, cost_lambda: float | None = None,
             cost_budget: float | None = None, dynamic_k: float | None = None, cost_source: str | None = None,
             route_top_k: int | None = None, skip_beta: float = 0.0) -> int:
    """Report bits per byte of a trained model on val, test and the out-of-domain sets.

    Args:
        checkpoint: a `moekit train` run directory (its latest checkpoint is used) or a model directory.
        data_dir: prepared data (default: the one recorded at training time).
        max_tokens: evaluate only the first N tokens of each split (default: all).
        seq_len: evaluation window length.
        json_out: also write the results as JSON to this file.
        threads: torch threads (default: torch's choice).
        cost_lambda: cost-aware routing: choose experts by score - lambda * normalised cost (docs/routing.md).
        cost_budget: per-token expert-cost budget in normalised units (1.0 = the costliest expert).
        dynamic_k: dynamic-k: run experts in score order until their probability reaches this (top-p).
        cost_source: expert costs: flops (default) or one number per expert separated by commas.
        route_top_k: run up to this many experts per token instead of the model's top_k.
        skip_beta: NAEE expert skipping threshold (0 = off), to compare with cost-aware routing.
    """
    from moekit.checkpoint.native import atomic_write_text, load_native

    if threads:
        torch.set_num_threads(threads)
    ckpt = resolve_checkpoint(checkpoint)
    model = load_native(ckpt)
    data = data_for_checkpoint(ckpt, data_dir)
    if model.config.vocab_size < data.vocab_size:
        raise EvalError(f"model vocab {model.config.vocab_size} < tokenizer vocab {data.vocab_size} of {data.root}; "
                        "evaluate on the data the model was trained on (--data-dir)")
    from moekit.moe.cost import FlopsMeter, apply_cli

    routing = apply_cli(model, cost_lambda, cost_budget, dynamic_k, cost_source, route_top_k)
    if skip_beta:
        from moekit.memory.skip import set_skipping

        set_skipping(model, beta=skip_beta)
    meter = FlopsMeter(model) if model.moe_layers() else None
    res = evaluate_all(model, data, max_tokens=max_tokens, seq_len=seq_len)
    print(format_table({str(ckpt): res}))
    payload = {"checkpoint": str(ckpt), "data": str(data.root), "results": res}
    if meter is not None:  # expert FLOPs per token actually spent over every split evaluated
        payload["routing"] = {**{k: v if not hasattr(v, "tolist") else v.tolist() for k, v in routing.items()},
                              "skip_beta": skip_beta, **meter.stats()}
        meter.close()
    print(json.dumps(payload, indent=2))
    if json_out:
        atomic_write_text(json_out, json.dumps(payload, indent=2))
    return 0
