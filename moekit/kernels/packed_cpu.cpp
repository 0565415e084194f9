// moekit CPU kernels, part 2: the MoE expert block on pre-packed weights (AVX512-BF16 vdpbf16ps in
// bf16, AVX-512 FMA in fp32). Concatenated after moe_cpu.cpp, whose helpers it uses.
//
// Shape legend: D model dim, F expert hidden, Fp hidden padded to whole column groups, E experts,
// S sorted rows, C = 32 columns per group, Dh and Fh the k-units of the two matmuls (D / u, Fp / u).
//
// Why: the row-major kernel (moe_cpu.cpp) computes dot products along a row, so every register tile
// ends in horizontal sums and loads a full vector of weights *and* one of activations per step. An
// outer-product tile loads two weight vectors per step and broadcasts one k-unit per token (a bf16
// pair for vdpbf16ps, or one float for FMA), with no horizontal sums: in an L1-resident probe on Zen
// 5 (2 threads) ~950 bf16 GFLOP/s against ~720 for the dot-product tile. It needs the weights laid
// out as the instruction consumes them: per column group, k-units outermost, the group's 32 columns
// next, the unit's elements innermost (the "VNNI" reorder oneDNN applies to its B operand on every
// call, and llama.cpp at load time). moekit packs once (`kernels.pack_experts`). The whole-block
// effect is in docs/moe_layer.md (`moekit` vs `moekit plain`, benchmarks/moe_layer.py).
//
// Packed layouts (contiguous; u = 2 elements per k-unit in bf16, 1 in fp32; 128 bytes per unit row):
//   p13 [E, G1, D/u, C, u]: gated (swiglu/geglu) group g = gate units 16g..16g+15, then up units
//       16g..16g+15; plain gelu group g = hidden units 32g..32g+31. Padded units are zero.
//   p2  [E, G2, Fp/u, C, u]: group g = output columns 32g..32g+31 (padded columns zero), reduction
//       over the padded hidden Fp (padded activations are act(0) * 0 = 0).

namespace {

constexpr int kPackC = 32;     // columns per group: two zmm of float32 accumulators per token
constexpr int kPackMR = 14;    // tokens per register tile: 28 accumulators + 2 weight vectors
constexpr int64_t kPackKc = 128;  // k-units per panel chunk kept in L1 across a group's tiles: 16 KB
// Software prefetch distance along a lone tile's contiguous panel (bytes): the hardware prefetchers
// fall behind one sequential stream here. 8 KiB beat 1, 2 and 4 KiB at 8 rows per expert
// (Mixtral-style bf16 experts, weights streamed: 2.0 vs 2.3-2.6 ms); 16 KiB no better.
constexpr int64_t kPackPrefetch = 8192;

// c[m][0:32] (+)= sum over k-units [0, kp) of unit x[m][k] times the panel's 32 columns at k. x[m]
// points at token m's first unit as int32 (a bf16 pair or a float's bits, broadcast to 16 lanes).
// Prefetch: pf_ahead > 0 fetches the panel's own lines pf_ahead bytes ahead (a lone tile streaming
// from DRAM); else, when pf_lines > 0, the first pf_lines steps each fetch one line of pf (the
// next chunk, spread over the tiles that share this one).
template <typename T, int MR>
inline void packed_tile(const char* pb, int64_t kp, const int32_t* const* x, float* c, bool load, int64_t pf_ahead,
                        const char* pf, int64_t pf_lines) {
  __m512 a0[MR], a1[MR];
  for (int m = 0; m < MR; ++m) {
    a0[m] = load ? _mm512_loadu_ps(c + m * kPackC) : _mm512_setzero_ps();
    a1[m] = load ? _mm512_loadu_ps(c + m * kPackC + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kp; ++k) {
    if (pf_ahead) {
      _mm_prefetch(pb + k * 128 + pf_ahead, _MM_HINT_T0);
      _mm_prefetch(pb + k * 128 + pf_ahead + 64, _MM_HINT_T0);
    } else if (k < pf_lines) {
      _mm_prefetch(pf + k * 64, _MM_HINT_T0);
    }
    const __m512i w0 = _mm512_loadu_si512((const void*)(pb + k * 128));
    const __m512i w1 = _mm512_loadu_si512((const void*)(pb + k * 128 + 64));
    for (int m = 0; m < MR; ++m) {
      const __m512i xb = _mm512_set1_epi32(x[m][k]);  // one bf16 pair, or one float's bits
      if constexpr (std::is_same_v<T, bf16>) {
        a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)w0, (__m512bh)xb);
        a1[m] = _mm512_dpbf16_ps(a1[m], (__m512bh)w1, (__m512bh)xb);
      } else {
        a0[m] = _mm512_fmadd_ps(_mm512_castsi512_ps(w0), _mm512_castsi512_ps(xb), a0[m]);
        a1[m] = _mm512_fmadd_ps(_mm512_castsi512_ps(w1), _mm512_castsi512_ps(xb), a1[m]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(c + m * kPackC, a0[m]);
    _mm512_storeu_ps(c + m * kPackC + 16, a1[m]);
  }
}

template <typename T, int MR>
inline void packed_tile_k(const char* panel, int64_t kp, const int32_t* const* x, int64_t k0, float* c, bool load,
                          int64_t pf_ahead, const char* pf, int64_t pf_lines) {
  const int32_t* xs[MR];
  for (int m = 0; m < MR; ++m) xs[m] = x[m] + k0;
  packed_tile<T, MR>(panel + k0 * 128, kp, xs, c, load, pf_ahead, pf, pf_lines);
}

// The tile for mr (1..kPackMR) tokens, picked at run time.
template <typename T>
inline void packed_tile_mr(int mr, const char* panel, int64_t kp, const int32_t* const* x, int64_t k0, float* c,
                           bool load, int64_t pf_ahead, const char* pf, int64_t pf_lines) {
  switch (mr) {
#define MOEKIT_TILE(N) case N: packed_tile_k<T, N>(panel, kp, x, k0, c, load, pf_ahead, pf, pf_lines); break;
    MOEKIT_TILE(1) MOEKIT_TILE(2) MOEKIT_TILE(3) MOEKIT_TILE(4) MOEKIT_TILE(5) MOEKIT_TILE(6) MOEKIT_TILE(7)
    MOEKIT_TILE(8) MOEKIT_TILE(9) MOEKIT_TILE(10) MOEKIT_TILE(11) MOEKIT_TILE(12) MOEKIT_TILE(13)
    default: packed_tile_k<T, kPackMR>(panel, kp, x, k0, c, load, pf_ahead, pf, pf_lines); break;
#undef MOEKIT_TILE
  }
}

// c[m][0:32] = token m's sums over one whole group panel (kh k-pairs), for all n tokens of an
// expert. Plan: 1. split the n tokens into the fewest tiles of at most kPackMR, sized evenly (16
// tokens run as 8 + 8, not 14 + 2); 2. one tile: stream the panel once, prefetching ahead; several:
// walk the panel in chunks of kPackKc pairs held in L1 for all the tiles, the partial sums parked in
// c between chunks, while the tiles together prefetch the next chunk (the panels of a thread's
// consecutive groups are contiguous, so past a group's end that is the next group's start). With
// only the first tile prefetching, DRAM idled while the others ran: the Mixtral-style experts at 16
// rows each took 4.4 ms against 3.2 ms with the prefetch spread (bf16, weights streamed).
template <typename T>
inline void packed_group(const char* pb, int64_t kh, const int32_t* const* x, int64_t n, float* c) {
  const int64_t tiles = (n + kPackMR - 1) / kPackMR;
  const int mr = (int)((n + tiles - 1) / tiles);
  if (tiles == 1) {
    packed_tile_mr<T>(mr, pb, kh, x, 0, c, false, kPackPrefetch, nullptr, 0);
    return;
  }
  for (int64_t k0 = 0; k0 < kh; k0 += kPackKc) {
    const int64_t kp = std::min(kPackKc, kh - k0);
    const int64_t lines = 2 * kPackKc, per_tile = (lines + tiles - 1) / tiles;  // of the next chunk
    int64_t t = 0;
    for (int64_t m0 = 0; m0 < n; m0 += mr, ++t) {
      const int mb = (int)std::min<int64_t>(mr, n - m0);
      const int64_t first = t * per_tile;
      packed_tile_mr<T>(mb, pb, kp, x + m0, k0, c + m0 * kPackC, k0 > 0, 0, pb + (k0 + kp) * 128 + first * 64,
                     std::min(per_tile, std::max<int64_t>(0, lines - first)));
    }
  }
}

template <typename T>
void moe_experts_packed_impl(const torch::Tensor& x, const torch::Tensor& p13, const torch::Tensor& p2,
                             const int64_t* starts, const int64_t* counts, const int64_t* src, const int64_t* dst,
                             const float* scale, torch::Tensor& out, int64_t act) {
  // Plan:
  // 1. phase 1: each thread owns a contiguous range of p13's column groups of *every* expert (so
  //    the packed weights stream once, contiguously), computes the group's gate/up sums for the
  //    expert's rows and writes act(gate) * up to the padded activation rows a[s, :];
  // 2. barrier; phase 2: threads own ranges of p2's output-column groups and add scale[s] * (a[s] .
  //    w2 columns) into out[dst[s]]: no two threads write one output element.
  const int64_t E = p13.size(0), G1 = p13.size(1), Dh = p13.size(2), G2 = p2.size(1), Fh = p2.size(2);
  const int64_t D = out.size(1), Fp = Fh * p2.size(4);
  const bool gated = act != 2;
  int64_t S = 0;
  for (int64_t e = 0; e < E; ++e) S = std::max(S, starts[e] + counts[e]);
  auto a_buf = torch::empty({std::max<int64_t>(S, 1), Fp}, x.options());
  const int32_t* xp = reinterpret_cast<const int32_t*>(x.data_ptr<T>());
  const char* w13p = reinterpret_cast<const char*>(p13.data_ptr<T>());
  const char* w2p = reinterpret_cast<const char*>(p2.data_ptr<T>());
  T* ap = a_buf.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t panel13 = Dh * 128, panel2 = Fh * 128;  // bytes: 32 columns x one k-unit = 128 B

  at::parallel_for(0, G1, 1, [&](int64_t lo, int64_t hi) {
    std::vector<const int32_t*> xr;
    std::vector<float> c;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = counts[e];
      if (n <= 0) continue;
      xr.resize(n);
      c.resize(n * kPackC);
      for (int64_t m = 0; m < n; ++m) {
        const int64_t s = starts[e] + m;
        xr[m] = xp + (src ? src[s] : s) * Dh;
      }
      for (int64_t g = lo; g < hi; ++g) {
        packed_group<T>(w13p + (e * G1 + g) * panel13, Dh, xr.data(), n, c.data());
        for (int64_t m = 0; m < n; ++m) {
          const float* cm = c.data() + m * kPackC;
          T* arow = ap + (starts[e] + m) * Fp;
          if (gated) {  // 16 gate sums then 16 up sums -> 16 activations
            activate_row<T>(cm, cm + 16, 16, act, arow + 16 * g);
          } else {
            activate_row<T>(cm, nullptr, kPackC, act, arow + kPackC * g);
          }
        }
      }
    }
  });
  // Phase 2 starts after every activation exists (parallel_for returns = barrier).
  at::parallel_for(0, G2, 1, [&](int64_t lo, int64_t hi) {
    std::vector<const int32_t*> ar;
    std::vector<float> c;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = counts[e];
      if (n <= 0) continue;
      ar.resize(n);
      c.resize(n * kPackC);
      for (int64_t m = 0; m < n; ++m) ar[m] = reinterpret_cast<const int32_t*>(ap + (starts[e] + m) * Fp);
      for (int64_t g = lo; g < hi; ++g) {
        packed_group<T>(w2p + (e * G2 + g) * panel2, Fh, ar.data(), n, c.data());
        const int64_t d0 = g * kPackC, w = std::min<int64_t>(kPackC, D - d0);
        const __mmask16 m0 = w >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << w) - 1);
        const __mmask16 m1 = w >= 32 ? (__mmask16)0xffff : w > 16 ? (__mmask16)((1u << (w - 16)) - 1) : (__mmask16)0;
        for (int64_t m = 0; m < n; ++m) {
          const int64_t s = starts[e] + m;
          float* o = op + (dst ? dst[s] : s) * D + d0;
          const __m512 sc = _mm512_set1_ps(scale ? scale[s] : 1.0f);
          const float* cm = c.data() + m * kPackC;
          _mm512_mask_storeu_ps(o, m0, _mm512_fmadd_ps(sc, _mm512_loadu_ps(cm), _mm512_maskz_loadu_ps(m0, o)));
          if (m1)
            _mm512_mask_storeu_ps(o + 16, m1,
                                  _mm512_fmadd_ps(sc, _mm512_loadu_ps(cm + 16), _mm512_maskz_loadu_ps(m1, o + 16)));
        }
      }
    }
  });
}

void check_packed(const torch::Tensor& x, const torch::Tensor& p13, const torch::Tensor& p2, const torch::Tensor& out) {
  const auto dt = x.scalar_type();
  TORCH_CHECK((dt == torch::kBFloat16 || dt == torch::kFloat32) && p13.scalar_type() == dt && p2.scalar_type() == dt,
              "moe_experts_packed: x and the packed weights must share a dtype, bfloat16 or float32");
  TORCH_CHECK(x.is_contiguous() && p13.is_contiguous() && p2.is_contiguous() && out.is_contiguous(),
              "moe_experts_packed: tensors must be contiguous");
  const int64_t u = dt == torch::kBFloat16 ? 2 : 1;  // elements per k-unit
  TORCH_CHECK(p13.dim() == 5 && p2.dim() == 5 && p13.size(3) == kPackC && p2.size(3) == kPackC &&
                  p13.size(4) == u && p2.size(4) == u && p13.size(0) == p2.size(0),
              "moe_experts_packed: weights must come from kernels.pack_experts ([E, G, K/u, 32, u])");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == u * p13.size(2), "moe_experts_packed: x [R, D] with D = u * p13.size(2)");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.dim() == 2 && out.size(1) == x.size(1) &&
                  out.size(1) <= kPackC * p2.size(1),
              "moe_experts_packed: out must be float32 [n_out, D]");
}

}  // namespace

// moe_experts on packed weights (kernels.pack_experts): same contract otherwise; bf16 or fp32.
void moe_experts_packed(torch::Tensor x, torch::Tensor p13, torch::Tensor p2, torch::Tensor starts,
                        torch::Tensor counts, torch::Tensor src, torch::Tensor dst, torch::Tensor scale,
                        torch::Tensor out, int64_t act) {
  check_packed(x, p13, p2, out);
  const float* sc = scale.numel() ? scale.data_ptr<float>() : nullptr;
  if (x.scalar_type() == torch::kBFloat16)
    moe_experts_packed_impl<bf16>(x, p13, p2, starts.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), opt_i64(src),
                                  opt_i64(dst), sc, out, act);
  else
    moe_experts_packed_impl<float>(x, p13, p2, starts.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), opt_i64(src),
                                   opt_i64(dst), sc, out, act);
}

// moe_experts_topk on packed weights.
torch::Tensor moe_experts_topk_packed(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor p13,
                                      torch::Tensor p2, int64_t act) {
  auto g = topk_groups(ids, weights, p13.size(0));
  auto out = torch::zeros({ids.size(0), x.size(1)}, x.options().dtype(torch::kFloat32));
  moe_experts_packed(x, p13, p2, g.starts, g.counts, g.rows, g.rows, g.scale, out, act);
  return out;
}
