"""Peak memory of loading a checkpoint, measured in a fresh process.

    python -m moekit.quant.memprobe MODEL_DIR

prints JSON: the weight files' bytes, the resident set after imports and one-time warm-ups
(baseline), the peak resident set of the load, and peak - baseline as a multiple of the file size.
The peak is the kernel's high-water mark (VmHWM), reset to the baseline just before the load;
getrusage's ru_maxrss is reported too but not used: Linux carries the high-water mark of the
process image before exec into it (a probe spawned from a large parent, e.g. pytest, reads the
parent's peak). Linux only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, resource, sys
import torch, moekit
import moekit.checkpoint, moekit.quant.checkpoint  # code the load imports: not part of its data
from moekit.quant.cli import _file_bytes

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
# One-time costs before the baseline, so that what remains is the checkpoint's: the first torch op,
# the compiled-kernel probe, and torch's meta-device machinery (building any model on meta the first
# time imports ~70 MB of torch code and tables, whatever the model's size).
torch.zeros(1) + 1
moekit.kernels.available()
with torch.device("meta"):
    moekit.Transformer(moekit.ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=8,
                                          moe=moekit.MoEConfig(num_experts=2, top_k=1, expert_dim=64)))
base = rss()
# Reset the kernel's high-water mark to the current RSS (Linux clear_refs "5"), so that peaks from
# before the baseline (imports, warm-ups) cannot count; getrusage's ru_maxrss reads the same mark.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
m = moekit.load_model(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
size = _file_bytes(sys.argv[1])
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"file_bytes": size, "baseline_rss": base, "peak_rss": peak, "vm_hwm": hwm, "after_rss": rss(),
                  "load_peak_over_file": (hwm - base) / size}))
"""


def probe(path: str | Path, threads: int = 1) -> dict:
    """Run the load in a subprocess (one torch thread) and return its measurements."""
    env_cmd = [sys.executable, "-c", _CHILD, str(path)]
    import os

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(env_cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    if res.returncode:
        raise RuntimeError(f"load of {path} failed in the probe process:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1]), indent=2))
