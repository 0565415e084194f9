"""Optional compiled CPU kernels, with the pure-PyTorch path as the always-correct fallback.

Shape legend: T tokens, D model dim, F expert hidden, H = 2F (gated) or F, E experts, S rows sorted
by expert, A = T*K assignments, M rows of a small linear, N its outputs (in the inference
kernels) or rows (in the training kernels: cross-entropy, rotary, RMSNorm), V vocabulary, P heads,
d head dim, L keys.

One extension module per CPU tier (`isa.tier()`, forced lower with MOEKIT_CPU_ISA), compiled on
first use from `simd.h` (the SIMD layer: vector width, loads that widen bf16, FMA, horizontal sums),
`moe_cpu.cpp` (inference), `packed_cpu.cpp` (inference on expert weights packed by
`pack_experts`), `quant_cpu.cpp` (int8 / int4 / MXFP4 weights, `moekit.kernels.quant`),
`train_cpu.cpp` (training) and `alloc_cpu.cpp` (the caching CPU allocator) with
`torch.utils.cpp_extension.load_inline` (needs a C++ compiler and ninja; ~30-60 s once per tier,
then cached under torch's extension directory). Explicit flags, never -march=native:

- `avx2` (module moekit_cpu_kernels_avx2): -mavx2 -mfma -mf16c; 8-float vectors, bf16 widened.
- `avx512` (moekit_cpu_kernels_avx512): + -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni;
  16-float vectors, bf16 widened to fp32 in registers.
- `avx512bf16` (moekit_cpu_kernels_avx512bf16): + -mavx512bf16; bf16 x bf16 dot products with
  vdpbf16ps.
- `amx`: the avx512bf16 module (same code); oneDNN runs the AMX GEMMs above the GEMV rows.

Dtypes: the matmul kernels (moe_experts*, linear, the packed experts, decode_attention's cache)
take weights in bf16 or fp32 and activations in the weights' dtype, or fp32 activations with
bf16 weights (the fp32 compute policy of CPUs without native bf16 keeps big weights in bf16: half
the bytes per decode step); the output is fp32. Everything else takes one dtype.

Nothing here is required: when no tier applies (not x86, MOEKIT_CPU_ISA=off), the build fails,
the tensors live on another device, or `MOEKIT_KERNELS=0` is set, `available()` is False and
callers use PyTorch ops; `build_error()` keeps the compiler's message. The inference kernels run
only under no-grad (`usable`); the training kernels run inside autograd Functions that pair each
with its backward kernel (`train_usable`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.kernels import isa

log = logging.getLogger(__name__)

ACTS = {"swiglu": 0, "geglu": 1, "gelu": 2}
"""Activation codes understood by the kernel."""


GEMV_ROWS = 8
"""Rows up to which the kernel runs an expert / linear as a GEMV (each weight row streamed once)."""


def has_amx() -> bool:
    """Whether this CPU has AMX-BF16 tiles (Intel Sapphire Rapids and later), which oneDNN's bf16
    GEMM uses (the `amx` tier, `isa`). There, the bf16 thresholds below fall to the GEMV range
    (GEMV_ROWS): the register tiles were tuned against oneDNN's AVX-512 path, and AMX's tile units
    do several times that work per cycle, so above the bandwidth-bound GEMV sizes oneDNN is the
    better bet. Not measured here (no AMX machine was available); MOEKIT_KERNEL_MAX_ROWS overrides it."""
    return "amx_bf16" in _cpu_flags()


# Rows per expert (max_rows) and per linear (max_linear_rows) up to which the kernels run, by tier
# and activation dtype. avx512bf16 / amx: see max_rows. avx2 / avx512 fp32: measured against
# MKL/oneDNN capped at the same ISA (`python -m moekit.kernels.bench_tiers`, module docstring);
# bf16 activations there: not measured (ATen's bf16 GEMM without native bf16 is emulated on
# AVX-512 and scalar on AVX2, so the kernels take every size the tiles were built for).
_ROWS = {
    "amx": {torch.bfloat16: GEMV_ROWS, torch.float32: 512},
    "avx512bf16": {torch.bfloat16: 64, torch.float32: 512},
    "avx512": {torch.bfloat16: 512, torch.float32: 128},
    "avx2": {torch.bfloat16: 512, torch.float32: 32},
}
_LINEAR_ROWS = {
    "amx": {torch.bfloat16: GEMV_ROWS, torch.float32: 128},
    "avx512bf16": {torch.bfloat16: 16, torch.float32: 128},
    "avx512": {torch.bfloat16: 128, torch.float32: 128},
    "avx2": {torch.bfloat16: 128, torch.float32: 32},
}
MIXED_ROWS = 1 << 20
"""Rows threshold for fp32 activations with bf16 weights on every tier: no limit, since PyTorch
has no mixed-dtype GEMM and the alternative is an fp32 copy of the weights per call."""


def _rows_threshold(dtype: torch.dtype, table: dict, weight_dtype: torch.dtype | None) -> int:
    """MOEKIT_KERNEL_MAX_ROWS if set; MIXED_ROWS for fp32 activations with bf16 weights; else the
    tier's value for this activation dtype (0 where no tier applies)."""
    env = os.environ.get("MOEKIT_KERNEL_MAX_ROWS")
    if env:
        return int(env)
    if dtype is torch.float32 and weight_dtype is torch.bfloat16:
        return MIXED_ROWS
    t = isa.tier()
    if t not in table:
        return 0
    return table[t].get(dtype, table[t][torch.float32])


def max_rows(dtype: torch.dtype, weight_dtype: torch.dtype | None = None) -> int:
    """Rows per expert up to which the compiled kernel runs an expert FFN (MoE experts, and the
    dense FFN as one expert) on this CPU tier, for activations of `dtype` (and weights of
    `weight_dtype`, default the same); above it, F.linear (oneDNN bf16 / MKL fp32).

    avx512bf16: measured on AMD Zen 5 (AVX512-BF16, no AMX, 2 threads) with `python
    benchmarks/moe_layer.py --sweep-rows` (every expert of the block gets M rows, weights
    streamed, interleaved calls). Up to 8 rows the kernel streams each weight row once and reuses
    it for every row (a GEMV); above 8 it runs register tiles of 4 weight rows x 4 token rows
    (compute-bound). bf16: the kernel wins up to 64 rows (Mixtral-style 15.2 vs 18.3 ms, 64-expert
    block 18.1 vs 19.0 ms) and ties or loses from 128. fp32: it wins at every size measured, up to
    512 rows (311 vs 366 ms), because MKL's sgemm takes a non-AVX-512 path on AMD CPUs. Hence 64
    and 512. amx: bf16 falls to GEMV_ROWS (`has_amx`).

    avx2 / avx512 fp32, indicative (AMD EPYC Zen 4 shared by other jobs, 1 thread, PyTorch's GEMMs
    capped at the tier: `MOEKIT_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
    python -m moekit.kernels.bench_tiers --threads 1 --rows 1 8 32 64 128 512`, 8 experts, D 512,
    F 704): avx2 wins 1.3-2x up to 32 rows and loses from 64 (0.86x); avx512 wins up to 128 rows
    (1.13x) and ties at 512. Hence 32 and 128. bf16 activations on those tiers: 512 (see _ROWS).
    fp32 activations with bf16 weights: no limit (MIXED_ROWS).

    Re-measure on other CPUs; override with MOEKIT_KERNEL_MAX_ROWS. Layers with packed weights
    (`pack_experts`) do not use this threshold: the packed kernel takes every expert above
    GEMV_ROWS rows.
    """
    return _rows_threshold(dtype, _ROWS, weight_dtype)


def max_linear_rows(dtype: torch.dtype, weight_dtype: torch.dtype | None = None) -> int:
    """Rows up to which `linear` (attention projections, LM head) beats F.linear on this CPU tier.

    avx512bf16, measured (interleaved, weights streamed, K=1024, N=1536 and 32000): bf16 wins at 8
    rows (1.72 vs 2.82 ms on the 32000-row head), ties at 16-32 and loses from 64 (oneDNN's GEMM
    without an expert's Python ops around it); fp32 wins at every size up to 128 rows (26 vs
    55 ms), MKL on AMD again. avx2 / avx512 fp32 (indicative, as in max_rows; N 4096, K 512): avx2
    wins 1.4-4.8x up to 32 rows, 0.83x at 64; avx512 1.16-5x at every size to 512. Hence 32 and
    128. fp32 activations with bf16 weights: no limit. MOEKIT_KERNEL_MAX_ROWS overrides this too.
    """
    return _rows_threshold(dtype, _LINEAR_ROWS, weight_dtype)


def fused_ok(x_TD: torch.Tensor, act: str, module: torch.nn.Module, *weights: torch.Tensor) -> bool:
    """Whether a whole FFN block on these T rows may be one fused-kernel call: few enough rows
    that no expert exceeds `max_rows`, a kernel activation, no autograd graph through `module`'s
    parameters, and kernel-compatible tensors. Shared by the MoE layer and the dense FFN."""
    w_dtype = weights[0].dtype if weights else None
    if not 0 < x_TD.shape[0] <= max_rows(x_TD.dtype, w_dtype) or act not in ACTS:
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        return False
    return usable(x_TD, *weights)


_lock = threading.Lock()
_modules: dict[str, object] = {}
"""Loaded modules by build tier (tests switch tiers in one process with MOEKIT_CPU_ISA)."""
_errors: dict[str, str] = {}
"""Build failures by build tier: the exception and the compiler's message."""

TIER_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"],
    "avx512bf16": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                   "-mavx512vnni", "-mavx512bf16"],
}
"""Compiler flags of each built tier (explicit: the build is the same on every CPU of the tier)."""

BUILD_TIER = {"avx2": "avx2", "avx512": "avx512", "avx512bf16": "avx512bf16", "amx": "avx512bf16"}
"""The module each tier runs: amx shares the avx512bf16 code (oneDNN does the AMX GEMMs)."""

SOURCES = ("simd.h", "moe_cpu.cpp", "packed_cpu.cpp", "quant_cpu.cpp", "train_cpu.cpp", "alloc_cpu.cpp")
"""Concatenated in this order into one translation unit (later files use earlier helpers)."""

FUNCTIONS = [
    # inference (moe_cpu.cpp)
    "moe_experts", "moe_experts_topk", "linear_small", "decode_attention", "silu_mul", "combine_rows",
    # inference on packed weights (packed_cpu.cpp)
    "moe_experts_packed", "moe_experts_topk_packed",
    # inference on low-bit weights (quant_cpu.cpp; Python side: moekit.kernels.quant)
    "moe_experts_topk_q", "linear_q", "quantize_rows_q8",
    # training (train_cpu.cpp)
    "cross_entropy_rows", "causal_softmax_fwd", "causal_softmax_bwd", "rope_rows", "sum_rows",
    "combine_rows_backward", "silu_mul_backward", "rms_norm_fwd", "rms_norm_bwd",
    # caching allocator (alloc_cpu.cpp)
    "cpu_cache_enable", "cpu_cache_disable", "cpu_cache_empty", "cpu_cache_stats",
]


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (`isa.cpu_flags`; kept here for the benchmarks)."""
    return isa.cpu_flags()


@functools.lru_cache(maxsize=8)
def _switched_off(env: str) -> bool:
    return env.strip().lower() in ("0", "false", "off", "no")


def enabled() -> bool:
    """Kernels are allowed here: not switched off by MOEKIT_KERNELS=0 and a CPU tier applies
    (`isa.tier()` is not "off"). Both variables are read on every call (tests and benchmarks flip
    them at run time, except inside `pinned()`); the parsing is cached."""
    on = getattr(isa._pin, "on", None)
    if on is not None:
        return on
    return not _switched_off(os.environ.get("MOEKIT_KERNELS", "1")) and isa.tier() != "off"


@contextlib.contextmanager
def pinned():
    """Fix `enabled()` and `isa.tier()` for this thread while the block runs (a model forward):
    the environment is read once instead of at each of the ~700 kernel checks of a decode step.
    Nested uses keep the outer snapshot; other threads are not affected."""
    p = isa._pin
    if getattr(p, "tier", None) is not None:
        yield
        return
    on, t = enabled(), isa.tier()
    p.on, p.tier = on, t
    try:
        yield
    finally:
        p.on = p.tier = None


def module_name(tier: str) -> str:
    """The extension module's name for a tier, e.g. moekit_cpu_kernels_avx2."""
    return f"moekit_cpu_kernels_{BUILD_TIER[tier]}"


def build(tier: str, name: str | None = None, src_dir: str | Path | None = None,
          build_dir: str | Path | None = None, extra_cflags: list[str] | None = None):
    """Compile (or load the cached build of) the kernels for `tier` and return the module; raises
    with the compiler's message on failure. `name`, `src_dir` and `build_dir` default to the
    tier's module name, this package and torch's extension directory (tests build a broken copy
    under throwaway ones); `extra_cflags` are appended to the tier's flags."""
    from torch.utils.cpp_extension import load_inline

    bt = BUILD_TIER[tier]
    name = name or module_name(tier)
    folder = Path(src_dir) if src_dir is not None else Path(__file__).parent
    # One translation unit inside a per-tier namespace (simd.h opens it): several tiers' modules
    # can live in one process without their C++ symbols colliding.
    src = "\n".join((folder / f).read_text() for f in SOURCES)
    src += f"\n}}  // namespace MOEKIT_NS\nusing namespace moekit_{bt};\n"
    # at::parallel_for is a header template: with ATen's OpenMP backend it only runs in parallel
    # when *this* file is compiled with -fopenmp (without it every kernel ran on one core). GOMP
    # symbols resolve to the libgomp torch already loaded, so no second OpenMP runtime and no link flag.
    omp = ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []
    cflags = ["-O3", *TIER_FLAGS[bt], f"-DMOEKIT_NS=moekit_{bt}", *omp, *(extra_cflags or [])]
    if build_dir is None:
        # One folder per source + flags version: checkouts with different kernel sources (worktrees,
        # an installed copy) sharing torch's extension directory would otherwise rebuild the same
        # folder in turn and wait on each other's lock.
        from torch.utils.cpp_extension import _get_build_directory

        digest = hashlib.sha1((src + " ".join(cflags)).encode()).hexdigest()[:12]
        build_dir = Path(_get_build_directory(name, verbose=False)).with_name(f"{name}-{digest}")
        if not any(build_dir.glob("*.so")):
            # Visible by default (WARNING reaches stderr without logging config): a first forward
            # that pauses for a minute must say why. A cached build loads in about a second.
            log.warning("moekit: compiling CPU kernels for tier %s once (about 30-60 s, then cached; "
                        "MOEKIT_KERNELS=0 skips)", bt)
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(build_dir / "lock")
    # simd.h includes torch/extension.h itself: without load_inline's implicit copy on top, a
    # broken first line stops the compiler before the torch headers (the build-failure test).
    return load_inline(name, cpp_sources=[src + _bindings()], no_implicit_headers=True,
                       extra_cflags=cflags, verbose=False, build_directory=str(build_dir))


def _bindings() -> str:
    """The module's Python bindings, each releasing the GIL while it runs (as ATen's own ops do): the
    kernels touch no Python object, and a held GIL stops every other thread for the whole call: the
    expert-offload prefetch thread (which could not start its reads while a decode step ran), the
    server's HTTP loop."""
    defs = "\n".join(f'  m.def("{f}", torch::wrap_pybind_function_no_gil({f}), "{f}");' for f in FUNCTIONS)
    return f"\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{\n{defs}\n}}\n"


STALE_LOCK_S = 1800
"""A build lock older than this is taken as left by a killed build (torch waits on it forever)."""


def _clear_stale_lock(lock: Path) -> None:
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_S:
        log.warning("moekit: removing a stale kernel build lock (%.0f min old): %s", age / 60, lock)
        with contextlib.suppress(OSError):
            lock.unlink()


def load():
    """The compiled module for the current tier (`isa.tier()`), building it on first call; None
    when disabled, when no tier applies, or when the build failed (`build_error()` says why)."""
    if not enabled():
        return None
    bt = BUILD_TIER[isa.tier()]
    mod = _modules.get(bt)
    if mod is not None or bt in _errors:
        return mod
    with _lock:
        if bt in _modules or bt in _errors:
            return _modules.get(bt)
        try:
            _modules[bt] = build(bt)
        except Exception as exc:  # no compiler, no ninja, odd toolchain: the fallback is correct
            _errors[bt] = f"{type(exc).__name__}: {exc}"
            log.warning("moekit CPU kernels (%s) unavailable, using PyTorch ops (%s)", bt,
                        _errors[bt].splitlines()[0])
    return _modules.get(bt)


def tier() -> str:
    """The tier of the compiled module in use now (`isa.tier()` when its module is built), or
    "off" (switched off, no tier, or the build failed)."""
    return isa.tier() if load() is not None else "off"


def build_error() -> str | None:
    """Why the current tier's module failed to build (the exception and compiler output), or None."""
    if not enabled():
        return None
    return _errors.get(BUILD_TIER[isa.tier()])


def available() -> bool:
    """True when the compiled kernels are built (building them now if needed) and switched on."""
    return enabled() and load() is not None


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a kernel may run on these tensors now: all on CPU, x bf16 or fp32, each weight of
    x's dtype or bf16 under an fp32 x (the mixed rule: weights may be bf16 while x is fp32;
    otherwise one dtype), no autograd, and the kernels built for the current tier."""
    dt = x.dtype
    if not x.is_cpu or (dt is not torch.bfloat16 and dt is not torch.float32):
        return False
    for w in weights:
        if not w.is_cpu or (w.dtype is not dt and not (dt is torch.float32 and w.dtype is torch.bfloat16)):
            return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    return available()


def train_usable(*tensors: torch.Tensor) -> bool:
    """Whether the training kernels (used inside autograd Functions, so autograd is fine) may take
    these tensors: all on CPU, each bf16 or fp32, and the kernels built and switched on."""
    for t in tensors:
        if not t.is_cpu or (t.dtype is not torch.bfloat16 and t.dtype is not torch.float32):
            return False
    return available()


_UNTRACED = contextlib.nullcontext()


def _traced(name: str):
    """A torch.profiler range around a kernel call while a profiler runs (so profiles name the
    kernels), else nothing: record_function costs ~10 us per call even with no profiler, about
    0.4 ms of a decode step's 33 kernel calls."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else _UNTRACED


def _row_args(counts_E, starts_E, src_S, dst_S, scale_S, out_ND, n_out, dim) -> tuple:
    """The row arguments of the expert-block kernels, normalised: (starts, counts, src, dst, scale,
    out) as contiguous CPU tensors (int64 / float32; empty = default), out allocated when absent."""
    counts_E = counts_E.to("cpu", torch.int64).contiguous()
    if starts_E is None:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
    starts_E = starts_E.to("cpu", torch.int64).contiguous()
    if out_ND is None:
        rows = n_out if n_out is not None else int((starts_E + counts_E).max()) if counts_E.numel() else 0
        out_ND = torch.zeros(rows, dim, dtype=torch.float32)
    empty_i = torch.empty(0, dtype=torch.int64)
    return (starts_E, counts_E,
            empty_i if src_S is None else src_S.to(torch.int64).contiguous(),
            empty_i if dst_S is None else dst_S.to(torch.int64).contiguous(),
            torch.empty(0) if scale_S is None else scale_S.to(torch.float32).contiguous(),
            out_ND)


def moe_experts(x_RD: torch.Tensor, w13_EHD: torch.Tensor, w2_EDF: torch.Tensor, counts_E: torch.Tensor,
                act: str, starts_E: torch.Tensor | None = None, src_S: torch.Tensor | None = None,
                dst_S: torch.Tensor | None = None, scale_S: torch.Tensor | None = None,
                out_ND: torch.Tensor | None = None, n_out: int | None = None) -> torch.Tensor:
    """Run every expert with rows on the rows grouped by expert, in one call.

    Expert e handles sorted rows starts_E[e] .. starts_E[e] + counts_E[e] (starts default to the
    running sum of counts); sorted row s reads input row src_S[s] (default s) and adds
    scale_S[s] * y to float32 output row dst_S[s] (default s). Experts with count 0 are skipped,
    so a caller can hand some experts to another path. Returns the float32 [n_out, D] output.
    """
    rows = _row_args(counts_E, starts_E, src_S, dst_S, scale_S, out_ND, n_out, w13_EHD.shape[-1])
    with _traced("moekit::moe_experts"):
        _mod().moe_experts(x_RD.contiguous(), w13_EHD.contiguous(), w2_EDF.contiguous(), *rows, ACTS[act])
    return rows[-1]


def moe_experts_topk(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                     w13_EHD: torch.Tensor, w2_EDF: torch.Tensor, act: str) -> torch.Tensor:
    """out[t] = sum_k topk_weights_TK[t, k] * expert_{topk_ids_TK[t, k]}(x_TD[t]), float32 [T, D].

    The whole dropless MoE block after the router in one call: grouping by expert (a counting sort),
    both expert matmuls, the activation and the weighted combine. For decode-sized T, where the
    separate dispatch ops (argsort, bincount, gather, index arithmetic) cost more than the routing.
    """
    mod = _mod()
    with _traced("moekit::moe_experts"):
        return mod.moe_experts_topk(x_TD.contiguous(), topk_ids_TK.to(torch.int64).contiguous(),
                                    topk_weights_TK.to(torch.float32).contiguous(), w13_EHD.contiguous(),
                                    w2_EDF.contiguous(), ACTS[act])


PACK_COLS = 32
"""Columns per group of the packed expert layout (packed_cpu.cpp)."""


@dataclass(frozen=True)
class PackedExperts:
    """Stacked expert weights re-laid for the outer-product bf16 kernel (`pack_experts`).

    p13 [E, G1, D/2, 32, 2]: column group g of the first projection (gated: gate units 16g..16g+15
    then up units 16g..16g+15; gelu: hidden units 32g..32g+31), k-pairs outermost; p2 [E, G2,
    Fp/2, 32, 2]: output columns 32g..32g+31 over the padded hidden Fp. Padding is zero.
    """

    p13: torch.Tensor
    p2: torch.Tensor
    act: str
    dim: int
    hidden: int

    @property
    def nbytes(self) -> int:
        return self.p13.numel() * self.p13.element_size() + self.p2.numel() * self.p2.element_size()


def packable(w13_EHD: torch.Tensor, w2_EDF: torch.Tensor, act: str) -> bool:
    """Whether `pack_experts` applies: CPU weights in bf16 (with an even model dim) or fp32, and a
    kernel activation. bf16-packed weights take bf16 or fp32 rows (the mixed rule of `usable`)."""
    dt = w13_EHD.dtype
    return (act in ACTS and dt in (torch.bfloat16, torch.float32) and w2_EDF.dtype == dt
            and w13_EHD.device.type == "cpu" and (dt == torch.float32 or w13_EHD.shape[-1] % 2 == 0))


@torch.no_grad()
def pack_experts(w13_EHD: torch.Tensor, w2_EDF: torch.Tensor, act: str) -> PackedExperts:
    """Re-lay stacked bf16 expert weights for `moe_experts_packed` (one copy; values unchanged).

    vdpbf16ps multiplies pairs of bf16 along the reduction; the packed layout puts, for each group
    of 32 output columns, each k-pair's 32 column pairs in one 128-byte run, so the kernel loads two
    weight vectors and broadcasts one pair per token (no horizontal sums). The same reorder oneDNN
    does to B on every GEMM call, done once.
    """
    if not packable(w13_EHD, w2_EDF, act):
        raise ValueError(f"pack_experts needs CPU weights in fp32 or bf16 (bf16: an even model dim) and act in "
                         f"{sorted(ACTS)}; "
                         f"got {w13_EHD.dtype} on {w13_EHD.device}, dim {w13_EHD.shape[-1]}, act {act!r}")
    E, H, D = w13_EHD.shape
    F = w2_EDF.shape[-1]
    C = PACK_COLS
    u = 2 if w13_EHD.dtype == torch.bfloat16 else 1  # elements per k-unit: a bf16 pair, or one float
    if act == "gelu":
        G1 = -(-F // C)
        w_EGCD = torch.nn.functional.pad(w13_EHD, (0, 0, 0, G1 * C - F)).view(E, G1, C, D)
    else:  # gate and up units of the same 16 hidden units share a group
        G1 = -(-F // 16)
        pad = (0, 0, 0, G1 * 16 - F)
        gate = torch.nn.functional.pad(w13_EHD[:, :F], pad).view(E, G1, 16, D)
        up = torch.nn.functional.pad(w13_EHD[:, F:], pad).view(E, G1, 16, D)
        w_EGCD = torch.cat([gate, up], dim=2)
    Fp = G1 * (16 if act != "gelu" else C)
    p13 = w_EGCD.view(E, G1, C, D // u, u).permute(0, 1, 3, 2, 4).contiguous()
    G2 = -(-D // C)
    w2p = torch.nn.functional.pad(w2_EDF, (0, Fp - F, 0, G2 * C - D))
    p2 = w2p.view(E, G2, C, Fp // u, u).permute(0, 1, 3, 2, 4).contiguous()
    return PackedExperts(p13, p2, act, D, F)


def moe_experts_packed(x_RD: torch.Tensor, packed: PackedExperts, counts_E: torch.Tensor,
                       starts_E: torch.Tensor | None = None, src_S: torch.Tensor | None = None,
                       dst_S: torch.Tensor | None = None, scale_S: torch.Tensor | None = None,
                       out_ND: torch.Tensor | None = None, n_out: int | None = None) -> torch.Tensor:
    """`moe_experts` on packed weights (bf16 or fp32): same row contract, any rows per expert."""
    rows = _row_args(counts_E, starts_E, src_S, dst_S, scale_S, out_ND, n_out, packed.dim)
    with _traced("moekit::moe_experts_packed"):
        _mod().moe_experts_packed(x_RD.contiguous(), packed.p13, packed.p2, *rows, ACTS[packed.act])
    return rows[-1]


def moe_experts_topk_packed(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                            packed: PackedExperts) -> torch.Tensor:
    """`moe_experts_topk` on packed weights (bf16 or fp32), float32 [T, D]."""
    mod = _mod()
    with _traced("moekit::moe_experts_packed"):
        return mod.moe_experts_topk_packed(x_TD.contiguous(), topk_ids_TK.to(torch.int64).contiguous(),
                                           topk_weights_TK.to(torch.float32).contiguous(), packed.p13, packed.p2,
                                           ACTS[packed.act])


def linear(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ w.T for small M (decode), float32 result; same contract as F.linear without bias."""
    mod = _mod()
    lead = x_MK.shape[:-1]
    with _traced("moekit::linear_small"):
        out = mod.linear_small(x_MK.reshape(-1, x_MK.shape[-1]).contiguous(), w_NK.contiguous())
    return out.view(*lead, w_NK.shape[0])


def silu_mul(h_SH: torch.Tensor) -> torch.Tensor:
    """silu(h[..., :F]) * h[..., F:] for the fused gate/up output [..., 2F], in h's dtype (one pass)."""
    mod = _mod()
    lead = h_SH.shape[:-1]
    with _traced("moekit::silu_mul"):
        out = mod.silu_mul(h_SH.reshape(-1, h_SH.shape[-1]).contiguous())
    return out.view(*lead, h_SH.shape[-1] // 2)


def combine_rows(y_SD: torch.Tensor, inv_A: torch.Tensor, scale_S: torch.Tensor, out_TD: torch.Tensor,
                 top_k: int) -> torch.Tensor:
    """out_TD[t] += sum over k of scale_S[s] * y_SD[s], s = inv_A[t * top_k + k] (s < 0: skipped), in
    place on the float32 out_TD: expert outputs weighted back into token order in one pass."""
    mod = _mod()
    with _traced("moekit::combine_rows"):
        mod.combine_rows(y_SD.contiguous(), inv_A.contiguous(), scale_S.float().contiguous(), out_TD, top_k)
    return out_TD


def decode_attention(q_BHd: torch.Tensor, k_BGLd: torch.Tensor, v_BGLd: torch.Tensor, pos_B: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query per row: softmax(q . k / sqrt) . v over keys 0..pos_B[b] of the whole-cache tensors
    k_BGLd / v_BGLd (grouped-query: head h reads kv head h // (H / G)); float32 [B, H, d]."""
    mod = _mod()
    with _traced("moekit::decode_attention"):
        return mod.decode_attention(q_BHd.contiguous(), k_BGLd.contiguous(), v_BGLd.contiguous(),
                                    pos_B.to(torch.int64).contiguous(), float(scale))


def default_cache_limit_mb() -> int:
    """Free bytes the caching CPU allocator may hold by default: 4 GiB, or a quarter of physical
    memory on smaller machines."""
    try:
        phys_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    except (AttributeError, ValueError, OSError):
        return 4096
    return int(min(4096, phys_mb // 4))


_cache_mod = None
"""The module whose allocator `cpu_cache` installed: every cache call goes to it, whatever the tier now."""


def cpu_cache(on: bool) -> bool:
    """Install (on) or remove torch's caching CPU allocator for blocks of 1 MiB and more (see
    `moekit.utils.retain_freed_memory`). Returns whether it is installed now; False without kernels."""
    global _cache_mod
    if on and _cache_mod is None:
        _cache_mod = load()
    mod = _cache_mod
    if mod is None:
        return False
    if on:
        limit_mb = int(os.environ.get("MOEKIT_CPU_CACHE_LIMIT_MB", str(default_cache_limit_mb())))
        mod.cpu_cache_enable(1 << 20, max(0, limit_mb) << 20)
    else:
        mod.cpu_cache_disable()
    return bool(mod.cpu_cache_stats()[0])


def cpu_cache_empty() -> None:
    """Return every cached free block of the caching CPU allocator to the OS."""
    if _cache_mod is not None:
        _cache_mod.cpu_cache_empty()


def cpu_cache_stats() -> dict[str, int]:
    """The caching CPU allocator's counters: installed, hits, misses, and bytes cached (free), owned
    (free + live) and peak owned."""
    keys = ("installed", "hits", "misses", "cached_bytes", "owned_bytes", "peak_owned_bytes")
    return dict(zip(keys, _cache_mod.cpu_cache_stats() if _cache_mod is not None else [0] * 6))


def _mod():
    """The compiled module, or a clear error for callers that skipped `available()`."""
    mod = load()
    if mod is None:
        raise RuntimeError("moekit CPU kernels are not available; check available() first")
    return mod


def cross_entropy_rows(logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int, grad_scale: float,
                       want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row -log softmax(logits)[target] (0 where target == ignore_index), float32 [N]; with
    want_grad also grad_scale * (softmax - onehot) in the logits' dtype (0 on ignored rows)."""
    with _traced("moekit::cross_entropy_rows"):
        loss_N, g_NV = _mod().cross_entropy_rows(logits_NV.contiguous(), target_N.to(torch.int64).contiguous(),
                                                 int(ignore_index), float(grad_scale), bool(want_grad))
    return loss_N, (g_NV if want_grad else None)


def causal_softmax(s_SL: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * s) over the last dim with query i (of S) seeing keys j <= i + L - S; float32
    math, result in s's dtype, masked entries exactly 0."""
    with _traced("moekit::causal_softmax_fwd"):
        return _mod().causal_softmax_fwd(s_SL.contiguous(), float(scale))


def causal_softmax_backward(p_SL: torch.Tensor, dp_SL: torch.Tensor, scale: float) -> torch.Tensor:
    """Gradient of `causal_softmax` with respect to its scores, from its output and upstream grad."""
    with _traced("moekit::causal_softmax_bwd"):
        return _mod().causal_softmax_bwd(p_SL.contiguous(), dp_SL.contiguous(), float(scale))


def rope_rows(x_NPd: torch.Tensor, cos_Nd: torch.Tensor, sin_Nd: torch.Tensor,
              inverse: bool = False) -> torch.Tensor:
    """Rotate-half rotary embedding of x [N, P, d] (heads contiguous, any row stride) with float32
    cos/sin [N, d]; inverse applies the transposed rotation (the gradient). Contiguous result."""
    with _traced("moekit::rope_rows"):
        return _mod().rope_rows(x_NPd, cos_Nd.float().contiguous(), sin_Nd.float().contiguous(),
                                -1.0 if inverse else 1.0)


def sum_rows(y_SD: torch.Tensor, inv_A: torch.Tensor, scale_S: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """out[t] = sum over k of scale_S[s] * y_SD[s] (scale 1 when None), s = inv_A[t * top_k + k]
    (s < 0 skipped); float32 accumulation, [T, D] in y's dtype."""
    sc = torch.empty(0) if scale_S is None else scale_S.float().contiguous()
    with _traced("moekit::sum_rows"):
        return _mod().sum_rows(y_SD.contiguous(), inv_A.to(torch.int64).contiguous(), sc, int(top_k))


def combine_rows_backward(g_TD: torch.Tensor, y_SD: torch.Tensor, tok_S: torch.Tensor,
                          w_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of out[t] = sum of w_S[s] * y_SD[s] over the rows s of token t = tok_S[s]:
    (w_S[s] * g_TD[tok_S[s]] in y's dtype, dot(g_TD[tok_S[s]], y_SD[s]) in float32)."""
    with _traced("moekit::combine_rows_backward"):
        gy, gw = _mod().combine_rows_backward(g_TD.to(y_SD.dtype).contiguous(), y_SD.contiguous(),
                                              tok_S.to(torch.int64).contiguous(), w_S.float().contiguous())
    return gy, gw


def silu_mul_backward(h_SH: torch.Tensor, g_SF: torch.Tensor) -> torch.Tensor:
    """Gradient of `silu_mul` with respect to its input h [S, 2F], from the output gradient g [S, F]."""
    with _traced("moekit::silu_mul_backward"):
        return _mod().silu_mul_backward(h_SH.contiguous(), g_SF.to(h_SH.dtype).contiguous())


def rms_norm(x_ND: torch.Tensor, w_D: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 RMSNorm rows: (w * x * rstd, rstd) with rstd = 1 / sqrt(mean(x^2) + eps)."""
    with _traced("moekit::rms_norm_fwd"):
        y, rstd = _mod().rms_norm_fwd(x_ND.contiguous(), w_D.contiguous(), float(eps))
    return y, rstd


def rms_norm_backward(g_ND: torch.Tensor, x_ND: torch.Tensor, w_D: torch.Tensor,
                      rstd_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx, dw) of `rms_norm` from the output gradient g (float32)."""
    with _traced("moekit::rms_norm_bwd"):
        dx, dw = _mod().rms_norm_bwd(g_ND.float().contiguous(), x_ND, w_D, rstd_N)
    return dx, dw
