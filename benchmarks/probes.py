"""Small probes behind single numbers quoted in the docs, so each has a command.

    python benchmarks/probes.py record-function   # cost of torch.profiler.record_function with no profiler
    python benchmarks/probes.py gemv-vs-sum       # decode GEMV read bandwidth vs a plain sum of as many bytes
    python benchmarks/probes.py first-touch       # page-fault cost of a fresh 134 MB buffer vs reusing one

Each prints one line per measurement (best of several repetitions) and writes nothing. Timings on a
shared machine are noisy: run them on a quiet one, and compare numbers of one run with each other.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit.plan import measure  # noqa: E402


def record_function(calls: int = 20000) -> None:
    """docs/performance.md item 5: each kernel call used to be wrapped in record_function."""
    def wrapped():
        for _ in range(calls):
            with torch.profiler.record_function("probe"):
                pass

    def bare():
        for _ in range(calls):
            pass

    t = measure.best_time(wrapped, 3) - measure.best_time(bare, 3)
    print(f"record_function with no profiler: {t / calls * 1e6:.2f} us per call ({calls} calls)")


def gemv_vs_sum(mib: int = 1024) -> None:
    """docs/performance.md item 2: the decode GEMV reads its weights about as fast as a plain sum."""
    bw_sum = measure.read_bandwidth_gbs(mib, 5)
    bw_gemv, path = measure.gemv_bandwidth_gbs(mib, 5)
    print(f"threads {torch.get_num_threads()}: sum over {mib} MiB {bw_sum:.1f} GB/s; one bf16 row through {mib} MiB "
          f"of weights via {path} {bw_gemv:.1f} GB/s ({100 * bw_gemv / bw_sum:.0f}% of the sum)")


def first_touch(numel: int = 33_554_432) -> None:
    """moekit.utils.retain_freed_memory's docstring: a fresh multi-MB buffer pays a page fault per 4 KiB."""
    src = torch.randn(numel)

    def fresh():
        y = torch.empty(numel)  # glibc's default: a fresh mmap, unmapped again on free
        y.copy_(src)

    buf = torch.empty(numel)
    buf.copy_(src)

    def reused():
        buf.copy_(src)

    mb = numel * 4 / 1e6
    print(f"copy of {mb:.0f} MB into a fresh buffer: {measure.best_time(fresh, 5) * 1e3:.1f} ms; "
          f"into a reused one: {measure.best_time(reused, 5) * 1e3:.1f} ms")


PROBES = {"record-function": record_function, "gemv-vs-sum": gemv_vs_sum, "first-touch": first_touch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("probe", nargs="+", choices=[*PROBES, "all"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    for name in (PROBES if "all" in a.probe else a.probe):
        t0 = time.perf_counter()
        PROBES[name]()
        print(f"  ({name}: {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
