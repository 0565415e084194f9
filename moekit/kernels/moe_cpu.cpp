// moekit CPU kernels: a fused small-batch MoE expert block (gather -> w13 -> act -> w2 -> weighted
// scatter-add) and a small-M linear, written once over the SIMD layer of simd.h (AVX2 or AVX-512 fp32 FMA,
// bf16 widened in registers; vdpbf16ps for bf16 x bf16 on the AVX512-BF16 tier), threaded with
// at::parallel_for over output rows (torch's own thread pool: no second OpenMP runtime). Built at
// run time per CPU tier by moekit/kernels/__init__.py (torch cpp_extension).
//
// Operand types: weights TW (bf16 or fp32) and activations TX. TX is fp32 everywhere except the
// bf16 tier's bf16 x bf16 path (TX = bf16, vdpbf16ps); bf16 activations on other tiers are
// widened to fp32 once per call (small at decode), so fp32 x with bf16 weights (the fp32 compute
// policy of CPUs without native bf16: half the weight bytes) runs the same code.
//
// Shape legend: D model dim, F expert hidden, H = 2F (gated) or F, E experts, S sorted rows,
// K reduction length of one dot product, M rows of activations sharing one weight row.
//
// Why: at decode-sized batches every expert sees 1-8 rows, so each expert matmul is a GEMV that is
// bound by weight bandwidth; F.linear reaches ~55% of DRAM bandwidth there and each expert costs a
// handful of Python-dispatched ops. Here one call runs every expert, each thread streams a
// contiguous slice of every expert's weights once, one row at a time with software prefetch, and
// all rows of an expert (up to 8 per pass) reuse each weight row while it is in registers/L1.
// Experts with more rows run register tiles (4 weight rows x 4 token rows) instead: compute-bound
// sizes. Also here: a fused SiLU x up for experts left to oneDNN (their weighted combine,
// `combine_rows`, shares one loop with the training combine in train_cpu.cpp).
namespace {

// Bytes ahead of the current load to software-prefetch along the weight stream. A GEMV has no
// reuse, so only memory-level parallelism matters: measured on Zen 5 (2 threads, bf16, K=1024),
// one row at a time with a 4 KiB prefetch distance reads at ~46 GB/s (= a plain `sum` over the
// same bytes), against ~26 GB/s for the earlier 4-row tile with no prefetch (hardware prefetchers
// stop at page boundaries and lose track of several interleaved streams). Rows are contiguous, so
// prefetching past a row's end fetches the rows that come next.
constexpr int64_t kPrefetchBytes = 4096;

template <typename T>
constexpr bool is_bf16 = std::is_same_v<T, bf16>;

// Prefetch the cache lines of `bytes` (a compile-time step) at p: one request per 64-byte line,
// at least one per call.
template <int64_t Bytes>
inline void prefetch_step(const char* p) {
  for (int64_t o = 0; o < Bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

#ifdef MOEKIT_BF16DP
// The bf16 tier's bf16 x bf16 dot product: 32 pairs per vdpbf16ps, masked 16-bit tail loads.
template <int MB>
inline void row_dot_dp(const bf16* w, const bf16* const* x, int64_t K, float* acc) {
  __m512 a0[MB], a1[MB];
  for (int m = 0; m < MB; ++m) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); }
  const char* wb = reinterpret_cast<const char*>(w);
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {  // 128 bytes = two cache lines per step
    prefetch_step<128>(wb + 2 * k + kPrefetchBytes);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void*)(w + k));
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void*)(w + k + 32));
    for (int m = 0; m < MB; ++m) {
      a0[m] = _mm512_dpbf16_ps(a0[m], w0, (__m512bh)_mm512_loadu_si512((const void*)(x[m] + k)));
      a1[m] = _mm512_dpbf16_ps(a1[m], w1, (__m512bh)_mm512_loadu_si512((const void*)(x[m] + k + 32)));
    }
  }
  for (; k < K; k += 32) {  // masked tail: zero-filled lanes add nothing
    const int64_t left = std::min<int64_t>(32, K - k);
    const __mmask32 mask = left == 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, (const void*)(w + k));
    for (int m = 0; m < MB; ++m)
      a0[m] = _mm512_dpbf16_ps(a0[m], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, (const void*)(x[m] + k)));
  }
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
}
#endif

// acc[m] = dot(w[0:K], x[m][0:K]) for m < MB: one weight row streamed once, reused by MB
// activation rows held in L1. Two accumulators per row break the FMA dependency chain at small MB
// (on AVX2, with 16 registers, only up to 4 rows: beyond, the rows themselves are independent).
template <typename TW, typename TX, int MB>
inline void row_dot(const TW* w, const TX* const* x, int64_t K, float* acc) {
#ifdef MOEKIT_BF16DP
  if constexpr (is_bf16<TX>) {
    row_dot_dp<MB>(w, x, K, acc);
    return;
  } else
#endif
  {
    static_assert(std::is_same_v<TX, float>, "activations are fp32 off the bf16 dot-product path");
    constexpr bool two = VL == 16 || MB <= 4;
    vf a0[MB], a1[MB];
    for (int m = 0; m < MB; ++m) { a0[m] = vzero(); a1[m] = vzero(); }
    const char* wb = reinterpret_cast<const char*>(w);
    int64_t k = 0;
    for (; k + 2 * VL <= K; k += 2 * VL) {
      prefetch_step<2 * VL * sizeof(TW)>(wb + sizeof(TW) * k + kPrefetchBytes);
      const vf w0 = vload(w + k), w1 = vload(w + k + VL);
      for (int m = 0; m < MB; ++m) {
        a0[m] = vfma(w0, vload(x[m] + k), a0[m]);
        if constexpr (two) a1[m] = vfma(w1, vload(x[m] + k + VL), a1[m]);
        else a0[m] = vfma(w1, vload(x[m] + k + VL), a0[m]);
      }
    }
    for (; k < K; k += VL) {  // tail: zero-filled lanes add nothing
      const int n = tail(K - k);
      const vf wv = vloadn(w + k, n);
      for (int m = 0; m < MB; ++m) a0[m] = vfma(wv, vloadn(x[m] + k, n), a0[m]);
    }
    for (int m = 0; m < MB; ++m) acc[m] = vhsum(vadd(a0[m], a1[m]));
  }
}

constexpr int kMaxMB = 8;  // activation rows per pass over a weight row (GEMV up to here, tiles above)

// acc[m] for m < mb (1..kMaxMB) with the row-count template picked at run time.
template <typename TW, typename TX>
inline void row_dot_m(const TW* w, const TX* const* x, int mb, int64_t K, float* acc) {
  switch (mb) {
    case 1: row_dot<TW, TX, 1>(w, x, K, acc); break;
    case 2: row_dot<TW, TX, 2>(w, x, K, acc); break;
    case 3: row_dot<TW, TX, 3>(w, x, K, acc); break;
    case 4: row_dot<TW, TX, 4>(w, x, K, acc); break;
    case 5: row_dot<TW, TX, 5>(w, x, K, acc); break;
    case 6: row_dot<TW, TX, 6>(w, x, K, acc); break;
    case 7: row_dot<TW, TX, 7>(w, x, K, acc); break;
    default: row_dot<TW, TX, 8>(w, x, K, acc); break;
  }
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }
inline float gelu(float v) { return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f)); }

// ------------------------------------------------------------------ tiles for experts with > kMaxMB rows
#ifdef MOEKIT_AVX512
// out[i] = horizontal sum of v[i] for 16 vectors, as a transpose-and-add tree: 30 shuffles and 15
// adds for all 16, where one _mm512_reduce_add_ps each costs ~9 shuffle/add instructions. Measured
// (interleaved, weights streamed): level on the Mixtral-style block, 2-5% faster on the 64-expert
// one at 16-64 rows per expert (K = 1024 or 256: more reductions per multiply-add).
inline void reduce16(const __m512* v, float* out) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: b[i] = (v[i] lo+hi | v[i+8] lo+hi)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lanes of c[i]: 4-float partials of v[i], v[i+8], v[i+4], v[i+12]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 4], 0x88), _mm512_shuffle_f32x4(b[i], b[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[i], c[i + 2]), _mm512_unpackhi_ps(c[i], c[i + 2]));
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x44), _mm512_shuffle_ps(d[0], d[1], 0xEE));
  // Lane j of e holds the sums of v[i + off[j]] for i = 0, 2, 1, 3.
  alignas(64) float t[16];
  _mm512_store_ps(t, e);
  constexpr int off[4] = {0, 8, 4, 12}, idx[4] = {0, 2, 1, 3};
  for (int j = 0; j < 4; ++j)
    for (int q = 0; q < 4; ++q) out[off[j] + idx[q]] = t[4 * j + q];
}
#endif

// acc[m * NR + r] = dot(w[r][0:K], x[m][0:K]) for m < MR, r < NR. Each K-chunk loads NR weight
// vectors and MR activation vectors for MR * NR dot-product steps, against MR + 1 loads for MR
// steps in row_dot: row_dot is load-bound at ~35% of the bf16 peak once an expert has 16+ rows,
// the tile is compute-bound. Used when an expert has more rows than kMaxMB: the weights are read
// from DRAM once (the NR rows stay in L1 across the passes over MR-row blocks); from ~32 rows the
// arithmetic sets the time, at ~16 rows the stream and the arithmetic overlap imperfectly (the
// Mixtral-style block at 64 tokens, benchmarks/moe_layer.py). `pf` > 0 prefetches the line `pf` elements past each
// row's current position (the same place in a later tile's rows), on the first pass only.
template <typename TW, typename TX, int MR, int NR>
inline void tile_dot(const TW* const* w, const TX* const* x, int64_t K, int64_t pf, float* acc) {
#ifdef MOEKIT_BF16DP
  if constexpr (is_bf16<TX>) {
    __m512 a[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) a[m][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      if (pf)
        for (int r = 0; r < NR; ++r) _mm_prefetch((const char*)(w[r] + k + pf), _MM_HINT_T0);
      __m512bh wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_loadu_si512((const void*)(w[r] + k));
      for (int m = 0; m < MR; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x[m] + k));
        for (int r = 0; r < NR; ++r) a[m][r] = _mm512_dpbf16_ps(a[m][r], wv[r], xv);
      }
    }
    if (k < K) {  // masked tail: zero-filled lanes add nothing
      const __mmask32 mask = (__mmask32)((1u << (K - k)) - 1);
      __m512bh wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, (const void*)(w[r] + k));
      for (int m = 0; m < MR; ++m) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, (const void*)(x[m] + k));
        for (int r = 0; r < NR; ++r) a[m][r] = _mm512_dpbf16_ps(a[m][r], wv[r], xv);
      }
    }
    if constexpr (MR * NR == 16) {
      reduce16(&a[0][0], acc);
    } else {
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < NR; ++r) acc[m * NR + r] = _mm512_reduce_add_ps(a[m][r]);
    }
    return;
  } else
#endif
  {
    static_assert(std::is_same_v<TX, float>, "activations are fp32 off the bf16 dot-product path");
    vf a[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) a[m][r] = vzero();
    int64_t k = 0;
    for (; k + VL <= K; k += VL) {
      if (pf && (k * (int64_t)sizeof(TW)) % 64 == 0)
        for (int r = 0; r < NR; ++r) _mm_prefetch((const char*)(w[r] + k + pf), _MM_HINT_T0);
      vf wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = vload(w[r] + k);
      for (int m = 0; m < MR; ++m) {
        const vf xv = vload(x[m] + k);
        for (int r = 0; r < NR; ++r) a[m][r] = vfma(wv[r], xv, a[m][r]);
      }
    }
    if (k < K) {  // tail: zero-filled lanes add nothing
      const int n = tail(K - k);
      vf wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = vloadn(w[r] + k, n);
      for (int m = 0; m < MR; ++m) {
        const vf xv = vloadn(x[m] + k, n);
        for (int r = 0; r < NR; ++r) a[m][r] = vfma(wv[r], xv, a[m][r]);
      }
    }
#ifdef MOEKIT_AVX512
    if constexpr (MR * NR == 16) {
      reduce16(&a[0][0], acc);
      return;
    }
#endif
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) acc[m * NR + r] = vhsum(a[m][r]);
  }
}

// Activation rows per tile: 16 accumulators + 5 loaded vectors fit AVX-512's 32 registers.
// Measured against 3, 5 and 6 (interleaved, weights streamed): 4 was fastest on the Mixtral-style
// block at 16-128 rows per expert (64 rows: 14.5 ms vs 15.4-17.4), 6 by ~7% on the 64-expert one.
// AVX2 has 16 registers: 2 rows x 4 weight rows = 8 accumulators + 5 loads.
constexpr int kTileM = VL == 16 ? 4 : 2;
constexpr int kTileN = 4;  // weight rows per tile
// Expert tiles prefetch their weight rows this many tiles ahead (first pass only): 2 measured 3-10%
// faster than 1 at 12-24 rows per expert (Mixtral-style, weights streamed); 4 (to L2) no better.
constexpr int kTilePrefetch = 2;

template <typename TW, typename TX, int MR>
inline void tile_dot_n(const TW* const* w, int nr, const TX* const* x, int64_t K, int64_t pf, float* acc) {
  switch (nr) {
    case 1: tile_dot<TW, TX, MR, 1>(w, x, K, pf, acc); break;
    case 2: tile_dot<TW, TX, MR, 2>(w, x, K, pf, acc); break;
    case 3: tile_dot<TW, TX, MR, 3>(w, x, K, pf, acc); break;
    default: tile_dot<TW, TX, MR, 4>(w, x, K, pf, acc); break;
  }
}

// The tile for mb (1..kTileM) activation rows and nr (1..kTileN) weight rows, picked at run time.
template <typename TW, typename TX>
inline void tile_dot_mn(const TW* const* w, int nr, const TX* const* x, int mb, int64_t K, int64_t pf, float* acc) {
  if constexpr (kTileM == 4) {
    switch (mb) {
      case 1: tile_dot_n<TW, TX, 1>(w, nr, x, K, pf, acc); break;
      case 2: tile_dot_n<TW, TX, 2>(w, nr, x, K, pf, acc); break;
      case 3: tile_dot_n<TW, TX, 3>(w, nr, x, K, pf, acc); break;
      default: tile_dot_n<TW, TX, 4>(w, nr, x, K, pf, acc); break;
    }
  } else {
    if (mb == 1) tile_dot_n<TW, TX, 1>(w, nr, x, K, pf, acc);
    else tile_dot_n<TW, TX, 2>(w, nr, x, K, pf, acc);
  }
}

// out[i] = act(g[i]) * u[i] (gated) or act(g[i]) for i < n; silu vectorised, gelu scalar.
template <typename T>
inline void activate_row(const float* g, const float* u, int64_t n, int64_t act, T* out) {
  if (act == 0) {
    for (int64_t i = 0; i < n; i += VL) {
      const int m = tail(n - i);
      vstoren(out + i, vmul(vsilu(vloadn(g + i, m)), vloadn(u + i, m)), m);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = u ? (T)(gelu(g[i]) * u[i]) : (T)gelu(g[i]);
}

// Phase 1 of one expert with n > kMaxMB rows over hidden units [lo, hi): tiles of 2 hidden units
// (gate and up rows: 4 weight rows) or 4 (plain GELU) by kTileM rows; raw gate/up sums go to
// float scratch, then one vectorised activation pass per row writes a[s, lo:hi].
template <typename TW, typename TX>
void tile_phase1(const TX* xp, const TW* we, int64_t n, int64_t start, const int64_t* src, int64_t D, int64_t F,
                 int64_t lo, int64_t hi, int64_t act, TX* ap) {
  const bool gated = act != 2;
  const int64_t W = hi - lo, JT = gated ? kTileN / 2 : kTileN;
  std::vector<float> g(n * W), u(gated ? n * W : 0);
  const TX* xr[kTileM];
  const TW* wr[kTileN];
  float acc[kTileM * kTileN];
  for (int64_t j = lo; j < hi; j += JT) {
    const int jn = (int)std::min<int64_t>(JT, hi - j);
    for (int i = 0; i < jn; ++i) {
      wr[i] = we + (j + i) * D;
      if (gated) wr[jn + i] = we + (F + j + i) * D;
    }
    const int nr = gated ? 2 * jn : jn;
    for (int64_t m0 = 0; m0 < n; m0 += kTileM) {
      const int mb = (int)std::min<int64_t>(kTileM, n - m0);
      for (int m = 0; m < mb; ++m) {
        const int64_t s = start + m0 + m;
        xr[m] = xp + (src ? src[s] : s) * D;
      }
      tile_dot_mn<TW, TX>(wr, nr, xr, mb, D, m0 == 0 ? kTilePrefetch * JT * D : 0, acc);
      for (int m = 0; m < mb; ++m)
        for (int i = 0; i < jn; ++i) {
          g[(m0 + m) * W + (j - lo) + i] = acc[m * nr + i];
          if (gated) u[(m0 + m) * W + (j - lo) + i] = acc[m * nr + jn + i];
        }
    }
  }
  for (int64_t m = 0; m < n; ++m)
    activate_row<TX>(g.data() + m * W, gated ? u.data() + m * W : nullptr, W, act, ap + (start + m) * F + lo);
}

// Weight rows [lo, hi) of a row-major block w (row stride K) against n activation rows
// (xrow(m) points at row m): tiles of kTileN weight rows x kTileM activation rows, prefetching
// `pf_tiles` tiles ahead on each tile's first pass; store(m0, mb, r0, nr, acc) takes each tile's
// sums, acc[m * nr + i] = row m0 + m against weight row r0 + i.
template <typename TW, typename TX, typename XRow, typename Store>
inline void tile_rows(const TW* w, int64_t K, int64_t lo, int64_t hi, int64_t n, int pf_tiles, XRow xrow,
                      Store store) {
  const TX* xr[kTileM];
  const TW* wr[kTileN];
  float acc[kTileM * kTileN];
  for (int64_t r0 = lo; r0 < hi; r0 += kTileN) {
    const int nr = (int)std::min<int64_t>(kTileN, hi - r0);
    for (int i = 0; i < nr; ++i) wr[i] = w + (r0 + i) * K;
    for (int64_t m0 = 0; m0 < n; m0 += kTileM) {
      const int mb = (int)std::min<int64_t>(kTileM, n - m0);
      for (int m = 0; m < mb; ++m) xr[m] = xrow(m0 + m);
      tile_dot_mn<TW, TX>(wr, nr, xr, mb, K, m0 == 0 ? pf_tiles * kTileN * K : 0, acc);
      store(m0, mb, r0, nr, acc);
    }
  }
}

// Phase 2 of one expert with n > kMaxMB rows over output columns [lo, hi): down-projection tiles
// added (scaled) into out.
template <typename TW, typename TX>
void tile_phase2(const TX* ap, const TW* we, int64_t n, int64_t start, const int64_t* dst, const float* scale,
                 int64_t D, int64_t F, int64_t lo, int64_t hi, float* op) {
  tile_rows<TW, TX>(we, F, lo, hi, n, kTilePrefetch, [&](int64_t m) { return ap + (start + m) * F; },
                    [&](int64_t m0, int mb, int64_t d, int nr, const float* acc) {
                      for (int m = 0; m < mb; ++m) {
                        const int64_t s = start + m0 + m;
                        float* o = op + (dst ? dst[s] : s) * D + d;
                        const float sc = scale ? scale[s] : 1.0f;
                        for (int i = 0; i < nr; ++i) o[i] += sc * acc[m * nr + i];
                      }
                    });
}

template <typename TW, typename TX>
void moe_experts_impl(const torch::Tensor& x, const torch::Tensor& w13, const torch::Tensor& w2,
                      const int64_t* starts, const int64_t* counts, const int64_t* src, const int64_t* dst,
                      const float* scale, torch::Tensor& out, int64_t act) {
  // Plan:
  // 1. phase 1: a[s, j] = act(x[src[s]] . w13[e, j]) (x . up row for gated acts); each thread owns a
  //    contiguous slice of hidden columns of *every* expert, so weights stream once, contiguously;
  // 2. barrier; phase 2: out[dst[s], d] += scale[s] * (a[s] . w2[e, d]); threads own slices of d, so
  //    no two threads ever write the same output element (no atomics, deterministic order).
  const int64_t E = w13.size(0), H = w13.size(1), D = w13.size(2), F = w2.size(2);
  const bool gated = act != 2;
  int64_t S = 0;
  for (int64_t e = 0; e < E; ++e) S = std::max(S, starts[e] + counts[e]);
  auto a_buf = torch::empty({std::max<int64_t>(S, 1), F}, x.options());
  const TX* xp = x.data_ptr<TX>();
  const TW* w13p = w13.data_ptr<TW>();
  const TW* w2p = w2.data_ptr<TW>();
  TX* ap = a_buf.data_ptr<TX>();
  float* op = out.data_ptr<float>();

  // Phase 1 (at::parallel_for hands each thread one contiguous range of hidden columns j).
  at::parallel_for(0, F, 16, [&](int64_t lo, int64_t hi) {
    float g[kMaxMB], u[kMaxMB];
    const TX* xr[kMaxMB];
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = counts[e];
      if (n <= 0) continue;
      const TW* we = w13p + e * H * D;
      if (n > kMaxMB) {
        tile_phase1<TW, TX>(xp, we, n, starts[e], src, D, F, lo, hi, act, ap);
        continue;
      }
      for (int64_t j = lo; j < hi; ++j) {
        for (int64_t m0 = 0; m0 < n; m0 += kMaxMB) {
          const int mb = (int)std::min<int64_t>(kMaxMB, n - m0);
          for (int m = 0; m < mb; ++m) {
            const int64_t s = starts[e] + m0 + m;
            xr[m] = xp + (src ? src[s] : s) * D;
          }
          row_dot_m<TW, TX>(we + j * D, xr, mb, D, g);  // gate row j (the only row for plain GELU)
          if (gated) row_dot_m<TW, TX>(we + (F + j) * D, xr, mb, D, u);  // up row j
          for (int m = 0; m < mb; ++m) {
            TX* arow = ap + (starts[e] + m0 + m) * F;
            arow[j] = gated ? (TX)((act == 0 ? silu(g[m]) : gelu(g[m])) * u[m]) : (TX)gelu(g[m]);
          }
        }
      }
    }
  });
  // Phase 2 starts after every hidden activation exists (parallel_for returns = barrier).
  at::parallel_for(0, D, 16, [&](int64_t lo, int64_t hi) {
    float acc[kMaxMB];
    const TX* xr[kMaxMB];
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = counts[e];
      if (n <= 0) continue;
      const TW* we = w2p + e * D * F;
      if (n > kMaxMB) {
        tile_phase2<TW, TX>(ap, we, n, starts[e], dst, scale, D, F, lo, hi, op);
        continue;
      }
      for (int64_t d = lo; d < hi; ++d) {
        for (int64_t m0 = 0; m0 < n; m0 += kMaxMB) {
          const int mb = (int)std::min<int64_t>(kMaxMB, n - m0);
          for (int m = 0; m < mb; ++m) xr[m] = ap + (starts[e] + m0 + m) * F;
          row_dot_m<TW, TX>(we + d * F, xr, mb, F, acc);
          for (int m = 0; m < mb; ++m) {
            const int64_t s = starts[e] + m0 + m;
            op[(dst ? dst[s] : s) * D + d] += (scale ? scale[s] : 1.0f) * acc[m];
          }
        }
      }
    }
  });
}

template <typename TW, typename TX>
void linear_impl(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& out) {
  // out[m, n] = x[m] . w[n]: threads own contiguous slices of the weight rows.
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const TX* xp = x.data_ptr<TX>();
  const TW* wp = w.data_ptr<TW>();
  float* op = out.data_ptr<float>();
  if (M > kMaxMB) {  // compute-bound sizes: register tiles
    at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
      tile_rows<TW, TX>(wp, K, lo, hi, M, 1, [&](int64_t m) { return xp + m * K; },
                        [&](int64_t m0, int mb, int64_t n0, int nr, const float* acc) {
                          for (int m = 0; m < mb; ++m)
                            for (int i = 0; i < nr; ++i) op[(m0 + m) * N + n0 + i] = acc[m * nr + i];
                        });
    });
    return;
  }
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    float acc[kMaxMB];
    const TX* xr[kMaxMB];
    for (int64_t nr = lo; nr < hi; ++nr) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
        const int mb = (int)std::min<int64_t>(kMaxMB, M - m0);
        for (int m = 0; m < mb; ++m) xr[m] = xp + (m0 + m) * K;
        row_dot_m<TW, TX>(wp + nr * K, xr, mb, K, acc);
        for (int m = 0; m < mb; ++m) op[(m0 + m) * N + nr] = acc[m];
      }
    }
  });
}

const int64_t* opt_i64(const torch::Tensor& t) { return t.numel() ? t.data_ptr<int64_t>() : nullptr; }

// The dtype rule of the matmul kernels: weights bf16 or fp32; activations of the weights' dtype,
// or fp32 with bf16 weights (the fp32 compute policy keeps big weights in bf16).
void check_mix(const char* name, torch::ScalarType xt, torch::ScalarType wt) {
  TORCH_CHECK(wt == torch::kBFloat16 || wt == torch::kFloat32, name, ": weights must be bfloat16 or float32");
  TORCH_CHECK(xt == wt || (xt == torch::kFloat32 && wt == torch::kBFloat16), name,
              ": activations must share the weights' dtype, or be float32 with bfloat16 weights");
}

// Calls f(TW{}, TX{}, x) with the operand types this tier runs for these dtypes: bf16 x bf16 uses
// vdpbf16ps on the bf16 tier; elsewhere bf16 activations are widened to an fp32 copy first.
template <typename Fn>
void dispatch_mix(const torch::Tensor& x, torch::ScalarType wt, Fn&& f) {
  if (wt == torch::kFloat32) {
    f(float{}, float{}, x);
  } else if (x.scalar_type() == torch::kBFloat16) {
#ifdef MOEKIT_BF16DP
    f(bf16{}, bf16{}, x);
#else
    f(bf16{}, float{}, x.to(torch::kFloat32));
#endif
  } else {
    f(bf16{}, float{}, x);
  }
}

}  // namespace

// out [n_out, D] float32 (accumulated into); x [R, D], w13 [E, H, D], w2 [E, D, F] (weights bf16
// or fp32; x their dtype, or fp32 with bf16 weights), contiguous; starts/counts [E] int64
// (sorted-row range of each expert; count 0 = skip); src/dst [S] int64 or empty (identity); scale
// [S] float32 or empty (1).
void moe_experts(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor starts,
                 torch::Tensor counts, torch::Tensor src, torch::Tensor dst, torch::Tensor scale,
                 torch::Tensor out, int64_t act) {
  TORCH_CHECK(x.is_contiguous() && w13.is_contiguous() && w2.is_contiguous() && out.is_contiguous(),
              "moe_experts: tensors must be contiguous");
  TORCH_CHECK(w13.scalar_type() == w2.scalar_type(), "moe_experts: w13 and w2 must share a dtype");
  check_mix("moe_experts", x.scalar_type(), w13.scalar_type());
  TORCH_CHECK(out.scalar_type() == torch::kFloat32, "moe_experts: out must be float32");
  const float* sc = scale.numel() ? scale.data_ptr<float>() : nullptr;
  dispatch_mix(x, w13.scalar_type(), [&](auto tw, auto tx, const torch::Tensor& xc) {
    moe_experts_impl<decltype(tw), decltype(tx)>(xc, w13, w2, starts.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                                 opt_i64(src), opt_i64(dst), sc, out, act);
  });
}

namespace {

// The counting sort behind the top-k entry points: rows grouped by expert (stable in t*K+k, so the
// result does not depend on thread timing), with each row's token and routing weight.
struct TopkGroups {
  torch::Tensor starts, counts, rows, scale;
};

TopkGroups topk_groups(const torch::Tensor& ids, const torch::Tensor& weights, int64_t E) {
  TORCH_CHECK(ids.scalar_type() == torch::kInt64 && weights.scalar_type() == torch::kFloat32,
              "moe_experts_topk: ids must be int64 and weights float32");
  TORCH_CHECK(ids.is_contiguous() && weights.is_contiguous() && ids.sizes() == weights.sizes() && ids.dim() == 2,
              "moe_experts_topk: ids and weights must be contiguous [T, K]");
  const int64_t K = ids.size(1), A = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* wt = weights.data_ptr<float>();
  TopkGroups g{torch::empty({E}, torch::kInt64), torch::zeros({E}, torch::kInt64), torch::empty({A}, torch::kInt64),
               torch::empty({A}, torch::kFloat32)};
  int64_t* c = g.counts.data_ptr<int64_t>();
  int64_t* st = g.starts.data_ptr<int64_t>();
  for (int64_t a = 0; a < A; ++a) {
    TORCH_CHECK(id[a] >= 0 && id[a] < E, "moe_experts_topk: expert id ", id[a], " out of range [0, ", E, ")");
    ++c[id[a]];
  }
  for (int64_t e = 0, run = 0; e < E; ++e) { st[e] = run; run += c[e]; }
  std::vector<int64_t> fill(st, st + E);
  int64_t* r = g.rows.data_ptr<int64_t>();
  float* sc = g.scale.data_ptr<float>();
  for (int64_t a = 0; a < A; ++a) {
    const int64_t s = fill[id[a]]++;
    r[s] = a / K;  // the token: its input row and its output row
    sc[s] = wt[a];
  }
  return g;
}

}  // namespace

// The same expert block straight from the router's top-k: ids [T, K] int64 and weights [T, K]
// float32; returns out [T, D] float32 with out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]).
// The counting sort by expert replaces the argsort/bincount/gather dispatch ops a decode step would
// otherwise pay per layer.
torch::Tensor moe_experts_topk(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor w13,
                               torch::Tensor w2, int64_t act) {
  auto g = topk_groups(ids, weights, w13.size(0));
  auto out = torch::zeros({ids.size(0), w13.size(2)}, x.options().dtype(torch::kFloat32));
  moe_experts(x, w13, w2, g.starts, g.counts, g.rows, g.rows, g.scale, out, act);
  return out;
}

namespace {

constexpr int64_t kMaxHeadDim = 512;

template <typename T, typename TK>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           const int64_t* pos, double scale, torch::Tensor& out) {
  // One query per (row b, head h) against keys 0..pos[b] of kv head h / (H / G): float32 scores,
  // an exact softmax (max-subtracted) and a float32 weighted sum of values. Threads own (b, h).
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2), G = k.size(1), Lmax = k.size(2);
  const int64_t R = H / G, nv = d / VL;
  const T* qp = q.data_ptr<T>();
  const TK* kp = k.data_ptr<TK>();
  const TK* vp = v.data_ptr<TK>();
  float* op = out.data_ptr<float>();
  // A parallel region costs more than a short decode's whole attention: split the (b, h) pairs
  // over threads only when each thread gets at least ~64K multiply-adds.
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work = std::max(work, std::min(pos[b] + 1, Lmax));
  const int64_t grain = std::max<int64_t>(1, (int64_t)65536 / std::max<int64_t>(1, work * d));
  at::parallel_for(0, B * H, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> p;
    vf qv[kMaxHeadDim / 8], acc[kMaxHeadDim / 8];  // fixed arrays: vectors of vf drop its attributes
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H, g = h / R, n = std::min(pos[b] + 1, Lmax);
      const TK* kb = kp + (b * G + g) * Lmax * d;
      const TK* vb = vp + (b * G + g) * Lmax * d;
      for (int64_t i = 0; i < nv; ++i) qv[i] = vmul(vload(qp + bh * d + i * VL), vset1((float)scale));
      p.resize(std::max<int64_t>(n, 1));
      float mx = -INFINITY;
      for (int64_t l = 0; l < n; ++l) {
        vf a = vzero();
        for (int64_t i = 0; i < nv; ++i) a = vfma(qv[i], vload(kb + l * d + i * VL), a);
        p[l] = vhsum(a);
        mx = std::max(mx, p[l]);
      }
      float den = 0.f;
      for (int64_t l = 0; l < n; ++l) { p[l] = std::exp(p[l] - mx); den += p[l]; }
      for (int64_t i = 0; i < nv; ++i) acc[i] = vzero();
      for (int64_t l = 0; l < n; ++l) {
        const vf pl = vset1(p[l]);
        for (int64_t i = 0; i < nv; ++i) acc[i] = vfma(pl, vload(vb + l * d + i * VL), acc[i]);
      }
      const vf inv = vset1(n > 0 ? 1.f / den : 0.f);
      for (int64_t i = 0; i < nv; ++i) vstore(op + bh * d + i * VL, vmul(acc[i], inv));
    }
  });
}

}  // namespace

// q [B, H, d]; k, v caches [B, G, Lmax, d] (H a multiple of G, d a multiple of 16, contiguous, the
// same dtype: bf16 or fp32; q may be fp32 with a bf16 cache); pos [B] int64: row b's query sits at position pos[b] and sees keys
// 0..pos[b]. Returns float32 [B, H, d]. Decode attention without the per-shape primitive setup
// oneDNN pays for small bf16 batched matmuls.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor pos, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(), "decode_attention: q [B,H,d], k/v [B,G,L,d]");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && pos.is_contiguous(),
              "decode_attention: tensors must be contiguous");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "decode_attention: k and v must share a dtype");
  check_mix("decode_attention", q.scalar_type(), k.scalar_type());
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) <= kMaxHeadDim && q.size(2) == k.size(3) && q.size(1) % k.size(1) == 0 && q.size(0) == k.size(0),
              "decode_attention: head dim must be a multiple of 16 (at most 512) and heads a multiple of kv heads");
  TORCH_CHECK(pos.scalar_type() == torch::kInt64 && pos.numel() == q.size(0), "decode_attention: pos must be int64 [B]");
  auto out = torch::empty(q.sizes(), q.options().dtype(torch::kFloat32));
  const int64_t* pp = pos.data_ptr<int64_t>();
  if (q.scalar_type() == torch::kBFloat16) decode_attention_impl<bf16, bf16>(q, k, v, pp, scale, out);
  else if (k.scalar_type() == torch::kBFloat16) decode_attention_impl<float, bf16>(q, k, v, pp, scale, out);
  else decode_attention_impl<float, float>(q, k, v, pp, scale, out);
  return out;
}

// x [M, K] . w [N, K]^T -> [M, N] float32 (small M: decode-shaped projections). w bf16 or fp32; x
// w's dtype, or fp32 with bf16 w.
torch::Tensor linear_small(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "linear_small: tensors must be contiguous");
  check_mix("linear_small", x.scalar_type(), w.scalar_type());
  auto out = torch::empty({x.size(0), w.size(0)}, x.options().dtype(torch::kFloat32));
  dispatch_mix(x, w.scalar_type(), [&](auto tw, auto tx, const torch::Tensor& xc) {
    linear_impl<decltype(tw), decltype(tx)>(xc, w, out);
  });
  return out;
}

// silu(h[:, :F]) * h[:, F:] for h [S, 2F] (the fused gate/up output), in h's dtype: one pass with
// a vectorised exp, where F.silu(g) * u reads and writes [S, F] twice and allocates twice.
torch::Tensor silu_mul(torch::Tensor h) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.size(1) % 2 == 0, "silu_mul: h must be contiguous [S, 2F]");
  const int64_t S = h.size(0), F = h.size(1) / 2;
  auto out = torch::empty({S, F}, h.options());
  auto run = [&](auto* hp, auto* op) {
    using T = std::remove_pointer_t<decltype(hp)>;
    at::parallel_for(0, S, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t s = lo; s < hi; ++s) {
        const T* g = hp + s * 2 * F;
        const T* u = g + F;
        T* o = op + s * F;
        for (int64_t i = 0; i < F; i += VL) {
          const int m = tail(F - i);
          // The row two ahead, gate and up halves: with two interleaved read streams and a write
          // stream the hardware prefetchers fall behind (silu_mul_backward, 1024 rows from DRAM:
          // 0.56 ms per call without, 0.12-0.15 ms with).
          if (s + 2 < hi && (i * (int64_t)sizeof(T)) % 64 == 0) {
            _mm_prefetch((const char*)(g + 4 * F + i), _MM_HINT_T0);
            _mm_prefetch((const char*)(u + 4 * F + i), _MM_HINT_T0);
          }
          vstoren(o + i, vmul(vsilu(vloadn(g + i, m)), vloadn(u + i, m)), m);
        }
      }
    });
  };
  if (h.scalar_type() == torch::kBFloat16) run(h.data_ptr<bf16>(), out.data_ptr<bf16>());
  else if (h.scalar_type() == torch::kFloat32) run(h.data_ptr<float>(), out.data_ptr<float>());
  else TORCH_CHECK(false, "silu_mul: dtype must be bfloat16 or float32");
  return out;
}
