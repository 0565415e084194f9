// moekit CPU kernels: a fused small-batch MoE expert block (gather -> w13 -> act -> w2 -> weighted
// scatter-add) and a small-M linear, both AVX-512 (fp32 FMA) / AVX512-BF16 (vdpbf16ps), threaded
// with at::parallel_for over output rows (torch's own thread pool: no second OpenMP runtime). Built at run time by moekit/kernels/__init__.py (torch cpp_extension).
//
// Shape legend: D model dim, F expert hidden, H = 2F (gated) or F, E experts, S sorted rows,
// K reduction length of one dot product, M rows of activations sharing one weight tile.
//
// Why: at decode-sized batches every expert sees 1-8 rows, so each expert matmul is a GEMV that is
// bound by weight bandwidth; F.linear reaches ~55% of DRAM bandwidth there and each expert costs a
// handful of Python-dispatched ops. Here one call runs every expert, each thread streams a
// contiguous slice of every expert's weights once, and all rows of an expert reuse that slice
// from L1 (tiles of 4 weight rows x up to 4 activation rows = 16 accumulators).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace {

using bf16 = at::BFloat16;

// Horizontal sums of four vectors at once, [sum a0, sum a1, sum a2, sum a3]: ~13 instructions
// instead of ~36 for four _mm512_reduce_add_ps; it matters when K is short (fine-grained w2: F=256).
inline __m256 hi256(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m256 b0 = _mm256_add_ps(_mm512_castps512_ps256(a0), hi256(a0));
  const __m256 b1 = _mm256_add_ps(_mm512_castps512_ps256(a1), hi256(a1));
  const __m256 b2 = _mm256_add_ps(_mm512_castps512_ps256(a2), hi256(a2));
  const __m256 b3 = _mm256_add_ps(_mm512_castps512_ps256(a3), hi256(a3));
  const __m256 d = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
  return _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
}

// acc[m][r] = dot(w[r][0:K], x[m][0:K]) for r < 4, m < MB.
template <typename T, int MB>
inline void tile_dot(const T* const* w, const T* const* x, int64_t K, float acc[4][4]) {
  __m512 a[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < 4; ++r) a[m][r] = _mm512_setzero_ps();
  if constexpr (std::is_same_v<T, bf16>) {
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m512bh wv[4];
      for (int r = 0; r < 4; ++r) wv[r] = (__m512bh)_mm512_loadu_si512((const void*)(w[r] + k));
      for (int m = 0; m < MB; ++m) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x[m] + k));
        for (int r = 0; r < 4; ++r) a[m][r] = _mm512_dpbf16_ps(a[m][r], wv[r], xv);
      }
    }
    if (k < K) {  // masked tail: zero-filled lanes add nothing
      __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
      __m512bh wv[4];
      for (int r = 0; r < 4; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, (const void*)(w[r] + k));
      for (int m = 0; m < MB; ++m) {
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, (const void*)(x[m] + k));
        for (int r = 0; r < 4; ++r) a[m][r] = _mm512_dpbf16_ps(a[m][r], wv[r], xv);
      }
    }
  } else {
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m512 wv[4];
      for (int r = 0; r < 4; ++r) wv[r] = _mm512_loadu_ps(w[r] + k);
      for (int m = 0; m < MB; ++m) {
        __m512 xv = _mm512_loadu_ps(x[m] + k);
        for (int r = 0; r < 4; ++r) a[m][r] = _mm512_fmadd_ps(wv[r], xv, a[m][r]);
      }
    }
    if (k < K) {
      __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
      __m512 wv[4];
      for (int r = 0; r < 4; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, w[r] + k);
      for (int m = 0; m < MB; ++m) {
        __m512 xv = _mm512_maskz_loadu_ps(mask, x[m] + k);
        for (int r = 0; r < 4; ++r) a[m][r] = _mm512_fmadd_ps(wv[r], xv, a[m][r]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) _mm_storeu_ps(acc[m], reduce4(a[m][0], a[m][1], a[m][2], a[m][3]));
}

template <typename T>
inline void tile_dot_m(const T* const* w, const T* const* x, int mb, int64_t K, float acc[4][4]) {
  switch (mb) {
    case 1: tile_dot<T, 1>(w, x, K, acc); break;
    case 2: tile_dot<T, 2>(w, x, K, acc); break;
    case 3: tile_dot<T, 3>(w, x, K, acc); break;
    default: tile_dot<T, 4>(w, x, K, acc); break;
  }
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }
inline float gelu(float v) { return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f)); }


template <typename T>
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
  const T* xp = x.data_ptr<T>();
  const T* w13p = w13.data_ptr<T>();
  const T* w2p = w2.data_ptr<T>();
  T* ap = a_buf.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t cols_per_tile = gated ? 2 : 4;
  const int64_t n_tiles1 = (F + cols_per_tile - 1) / cols_per_tile;
  const int64_t n_tiles2 = (D + 3) / 4;

  // Phase 1 (at::parallel_for hands each thread one contiguous range of tiles).
  at::parallel_for(0, n_tiles1, 8, [&](int64_t lo, int64_t hi) {
    float acc[4][4];
    const T* wr[4];
    const T* xr[4];
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = counts[e];
      if (n <= 0) continue;
      const T* we = w13p + e * H * D;
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t j0 = t * cols_per_tile;
        int64_t cols[4];
        for (int c = 0; c < 4; ++c) cols[c] = std::min(j0 + (c % cols_per_tile), F - 1);
        if (gated) {  // rows: gate j, gate j+1, up j, up j+1
          wr[0] = we + cols[0] * D; wr[1] = we + cols[1] * D;
          wr[2] = we + (F + cols[0]) * D; wr[3] = we + (F + cols[1]) * D;
        } else {
          for (int c = 0; c < 4; ++c) wr[c] = we + cols[c] * D;
        }
        for (int64_t m0 = 0; m0 < n; m0 += 4) {
          const int mb = (int)std::min<int64_t>(4, n - m0);
          for (int m = 0; m < mb; ++m) {
            const int64_t s = starts[e] + m0 + m;
            xr[m] = xp + (src ? src[s] : s) * D;
          }
          tile_dot_m<T>(wr, xr, mb, D, acc);
          for (int m = 0; m < mb; ++m) {
            T* arow = ap + (starts[e] + m0 + m) * F;
            if (gated) {
              for (int c = 0; c < 2 && j0 + c < F; ++c) {
                const float g = acc[m][c], u = acc[m][2 + c];
                arow[j0 + c] = (T)((act == 0 ? silu(g) : gelu(g)) * u);
              }
            } else {
              for (int c = 0; c < 4 && j0 + c < F; ++c) arow[j0 + c] = (T)gelu(acc[m][c]);
            }
          }
        }
      }
    }
  });
  // Phase 2 starts after every hidden activation exists (parallel_for returns = barrier).
  at::parallel_for(0, n_tiles2, 8, [&](int64_t lo, int64_t hi) {
    float acc[4][4];
    const T* wr[4];
    const T* xr[4];
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = counts[e];
      if (n <= 0) continue;
      const T* we = w2p + e * D * F;
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t d0 = t * 4;
        for (int r = 0; r < 4; ++r) wr[r] = we + std::min(d0 + r, D - 1) * F;
        for (int64_t m0 = 0; m0 < n; m0 += 4) {
          const int mb = (int)std::min<int64_t>(4, n - m0);
          for (int m = 0; m < mb; ++m) xr[m] = ap + (starts[e] + m0 + m) * F;
          tile_dot_m<T>(wr, xr, mb, F, acc);
          for (int m = 0; m < mb; ++m) {
            const int64_t s = starts[e] + m0 + m;
            const float sc = scale ? scale[s] : 1.0f;
            float* orow = op + (dst ? dst[s] : s) * D;
            for (int r = 0; r < 4 && d0 + r < D; ++r) orow[d0 + r] += sc * acc[m][r];
          }
        }
      }
    }
  });
}

template <typename T>
void linear_impl(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& out) {
  // out[m, n] = x[m] . w[n]: threads own contiguous slices of the weight rows.
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t n_tiles = (N + 3) / 4;
  at::parallel_for(0, n_tiles, 8, [&](int64_t lo, int64_t hi) {
    float acc[4][4];
    const T* wr[4];
    const T* xr[4];
    for (int64_t t = lo; t < hi; ++t) {
      for (int r = 0; r < 4; ++r) wr[r] = wp + std::min(t * 4 + r, N - 1) * K;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mb = (int)std::min<int64_t>(4, M - m0);
        for (int m = 0; m < mb; ++m) xr[m] = xp + (m0 + m) * K;
        tile_dot_m<T>(wr, xr, mb, K, acc);
        for (int m = 0; m < mb; ++m)
          for (int r = 0; r < 4 && t * 4 + r < N; ++r) op[(m0 + m) * N + t * 4 + r] = acc[m][r];
      }
    }
  });
}

const int64_t* opt_i64(const torch::Tensor& t) { return t.numel() ? t.data_ptr<int64_t>() : nullptr; }

}  // namespace

// out [n_out, D] float32 (accumulated into); x [R, D], w13 [E, H, D], w2 [E, D, F] of one dtype
// (bf16 or fp32), contiguous; starts/counts [E] int64 (sorted-row range of each expert; count 0 =
// skip); src/dst [S] int64 or empty (identity); scale [S] float32 or empty (1).
void moe_experts(torch::Tensor x, torch::Tensor w13, torch::Tensor w2, torch::Tensor starts,
                 torch::Tensor counts, torch::Tensor src, torch::Tensor dst, torch::Tensor scale,
                 torch::Tensor out, int64_t act) {
  TORCH_CHECK(x.is_contiguous() && w13.is_contiguous() && w2.is_contiguous() && out.is_contiguous(),
              "moe_experts: tensors must be contiguous");
  TORCH_CHECK(x.scalar_type() == w13.scalar_type() && x.scalar_type() == w2.scalar_type(),
              "moe_experts: x, w13 and w2 must share a dtype");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32, "moe_experts: out must be float32");
  const float* sc = scale.numel() ? scale.data_ptr<float>() : nullptr;
  if (x.scalar_type() == torch::kBFloat16)
    moe_experts_impl<bf16>(x, w13, w2, starts.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), opt_i64(src),
                           opt_i64(dst), sc, out, act);
  else if (x.scalar_type() == torch::kFloat32)
    moe_experts_impl<float>(x, w13, w2, starts.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), opt_i64(src),
                            opt_i64(dst), sc, out, act);
  else
    TORCH_CHECK(false, "moe_experts: dtype must be bfloat16 or float32");
}

// x [M, K] . w [N, K]^T -> [M, N] float32 (small M: decode-shaped projections).
torch::Tensor linear_small(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "linear_small: tensors must be contiguous");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "linear_small: x and w must share a dtype");
  auto out = torch::empty({x.size(0), w.size(0)}, x.options().dtype(torch::kFloat32));
  if (x.scalar_type() == torch::kBFloat16) linear_impl<bf16>(x, w, out);
  else if (x.scalar_type() == torch::kFloat32) linear_impl<float>(x, w, out);
  else TORCH_CHECK(false, "linear_small: dtype must be bfloat16 or float32");
  return out;
}
