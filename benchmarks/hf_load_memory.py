"""Peak memory while loading a Hugging Face MoE checkpoint into moekit (goal: < 1.3x the model).

Builds a random Mixtral-layout checkpoint with transformers (bf16; single file and sharded),
then loads it in a fresh process per case and reports (peak RSS - RSS before loading) / model
bytes. Two readers are compared side by side: moekit.checkpoint.hf's positioned reads (what
`load_hf` uses) and the memory-mapped `hf_pieces.ShardedReader`. Rerun on a quiet machine:

    python benchmarks/hf_load_memory.py [--hidden 512 --inter 1024 --layers 8 --experts 8]

Writes benchmarks/results/hf_load_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, time, json
from pathlib import Path
import torch, moekit  # imports before the baseline
from moekit.checkpoint import hf, hf_pieces
path, reader = Path(sys.argv[1]), sys.argv[2]
if reader == "mmap":
    hf.SafetensorsReader = hf_pieces.ShardedReader  # same interface, memory-mapped reads
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
# Warm-up: the first meta-device model build imports torch's meta kernels (~75 MB, once per
# process, independent of model size); count only what loading this checkpoint costs.
hf_pieces.build_meta(moekit.get_preset("tiny-moe"))
# Imports can peak above what loading needs: reset the high-water mark (Linux clear_refs 5),
# then peak = VmHWM after loading, baseline = VmRSS now.
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
t = time.perf_counter()
m = hf.load_hf(path)
dt = time.perf_counter() - t
size = sum(p.numel() * p.element_size() for p in m.state_dict().values())
print(json.dumps({"base": base, "peak": status("VmHWM"), "model_bytes": size, "seconds": dt, "dtype": str(m.dtype)}))
"""


def build(root: Path, a) -> dict[str, Path]:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=32000, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
                        num_attention_heads=8, num_key_value_heads=2, num_local_experts=a.experts,
                        num_experts_per_tok=2)
    with torch.device("cpu"):
        model = MixtralForCausalLM(cfg).to(torch.bfloat16)
    out = {"single file": root / "single", "sharded (100MB)": root / "sharded"}
    model.save_pretrained(out["single file"], max_shard_size="100GB")
    model.save_pretrained(out["sharded (100MB)"], max_shard_size="100MB")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf_load_memory"))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = build(Path(tmp), a)
        for layout, path in dirs.items():
            for reader in ("pread (load_hf)", "mmap (ShardedReader)"):
                r = subprocess.run([sys.executable, "-c", CHILD, str(path), reader.split()[0]],
                                   capture_output=True, text=True)
                if r.returncode:
                    raise SystemExit(f"{layout} / {reader} failed:\n{r.stderr[-2000:]}")
                res = json.loads(r.stdout.strip().splitlines()[-1])
                res.update(layout=layout, reader=reader, ratio=(res["peak"] - res["base"]) / res["model_bytes"])
                rows.append(res)
                print(f"{layout:16s} {reader:22s} peak/model = {res['ratio']:.2f}x  "
                      f"({res['model_bytes'] / 2**20:.0f} MiB {res['dtype']}, {res['seconds']:.1f}s)")
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "args": vars(a)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = ["| layout | reader | model MiB | peak RSS / model | load s |", "|---|---|---|---|---|"]
    md += [f"| {r['layout']} | {r['reader']} | {r['model_bytes'] / 2**20:.0f} | {r['ratio']:.2f}x | {r['seconds']:.1f} |"
           for r in rows]
    out.with_suffix(".md").write_text(f"Peak RSS while loading (goal < 1.3x), {meta}\n\n" + "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
