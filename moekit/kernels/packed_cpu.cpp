// moekit CPU kernels, part 2: the MoE expert block on pre-packed weights: vdpbf16ps for bf16 x bf16
// on the AVX512-BF16 tier; elsewhere fp32 FMA over fp32 activations, bf16 weight pairs widened in
// registers (the low half of each 32-bit pair is a 16-bit shift, the high half a mask). Concatenated
// after moe_cpu.cpp, whose helpers it uses.
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

constexpr int kPackC = 32;     // columns per group: 32 float32 accumulators per token
constexpr int64_t kPackKc = 128;  // k-units per panel chunk kept in L1 across a group's tiles: 16 KB
// Software prefetch distance along a lone tile's contiguous panel (bytes): the hardware prefetchers
// fall behind one sequential stream here. 8 KiB beat 1, 2 and 4 KiB at 8 rows per expert
// (Mixtral-style bf16 experts, weights streamed: 2.0 vs 2.3-2.6 ms); 16 KiB no better.
constexpr int64_t kPackPrefetch = 8192;

// Tokens per register tile. vdpbf16ps (bf16 tier) and AVX-512 fp32: 14 tokens x 2 zmm
// accumulators + 2 weight vectors. Widened bf16 pairs on AVX-512 need 4 weight vectors: 12. AVX2
// (16 ymm, 4 accumulators per token): 3, the rest of the registers for the weights.
template <typename TW, typename TX>
constexpr int pack_mr() {
  if constexpr (VL == 8) return 3;
  else if constexpr (is_bf16<TW> && !is_bf16<TX>) return 12;
  else return 14;
}

// c[m][0:32] (+)= sum over k-units [0, kp) of unit k of token m times the panel's 32 columns at
// k. x[m] points at token m's first element of the chunk (a k-unit is a bf16 pair in bf16, one
// float in fp32; the panel is 128 bytes per unit either way). Prefetch: pf_ahead > 0 fetches the
// panel's own lines pf_ahead bytes ahead (a lone tile streaming from DRAM); else, when pf_lines >
// 0, the first pf_lines steps each fetch one line of pf (the next chunk, spread over the tiles
// that share this one).
template <typename TW, typename TX, int MR>
inline void packed_tile(const char* pb, int64_t kp, const TX* const* x, float* c, bool load, int64_t pf_ahead,
                        const char* pf, int64_t pf_lines) {
  constexpr int NV = kPackC / VL;  // accumulator vectors per token
  vf a[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) a[m][j] = load ? vload(c + m * kPackC + j * VL) : vzero();
  for (int64_t k = 0; k < kp; ++k) {
    if (pf_ahead) {
      _mm_prefetch(pb + k * 128 + pf_ahead, _MM_HINT_T0);
      _mm_prefetch(pb + k * 128 + pf_ahead + 64, _MM_HINT_T0);
    } else if (k < pf_lines) {
      _mm_prefetch(pf + k * 64, _MM_HINT_T0);
    }
#ifdef MOEKIT_BF16DP
    if constexpr (is_bf16<TX>) {  // one bf16 pair per token, broadcast; vdpbf16ps multiplies pairs
      const __m512i w0 = _mm512_loadu_si512((const void*)(pb + k * 128));
      const __m512i w1 = _mm512_loadu_si512((const void*)(pb + k * 128 + 64));
      for (int m = 0; m < MR; ++m) {
        const __m512i xb = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(x[m])[k]);
        a[m][0] = _mm512_dpbf16_ps(a[m][0], (__m512bh)w0, (__m512bh)xb);
        a[m][1] = _mm512_dpbf16_ps(a[m][1], (__m512bh)w1, (__m512bh)xb);
      }
      continue;
    }
#endif
    if constexpr (is_bf16<TW>) {  // pairs (k even, k odd) per column: widen both halves
      for (int j = 0; j < NV; ++j) {
        const vi w = vload_i(pb + k * 128 + j * VL * 4);
        const vf we = vlo_bf16(w), wo = vhi_bf16(w);
        for (int m = 0; m < MR; ++m)
          a[m][j] = vfma(wo, vset1(x[m][2 * k + 1]), vfma(we, vset1(x[m][2 * k]), a[m][j]));
      }
    } else {
      for (int j = 0; j < NV; ++j) {
        const vf w = vload(reinterpret_cast<const float*>(pb + k * 128) + j * VL);
        for (int m = 0; m < MR; ++m) a[m][j] = vfma(w, vset1(x[m][k]), a[m][j]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) vstore(c + m * kPackC + j * VL, a[m][j]);
}

// Elements of activations per k-unit: a bf16 pair for bf16 weights, one float for fp32.
template <typename TW>
constexpr int64_t kUnit = is_bf16<TW> ? 2 : 1;

template <typename TW, typename TX, int MR>
inline void packed_tile_k(const char* panel, int64_t kp, const TX* const* x, int64_t k0, float* c, bool load,
                          int64_t pf_ahead, const char* pf, int64_t pf_lines) {
  const TX* xs[MR];
  for (int m = 0; m < MR; ++m) xs[m] = x[m] + k0 * kUnit<TW>;
  packed_tile<TW, TX, MR>(panel + k0 * 128, kp, xs, c, load, pf_ahead, pf, pf_lines);
}

// The tile for mr (1..N) tokens, picked at run time (one instantiation per count).
template <typename TW, typename TX, int N>
inline void packed_tile_mr(int mr, const char* panel, int64_t kp, const TX* const* x, int64_t k0, float* c,
                           bool load, int64_t pf_ahead, const char* pf, int64_t pf_lines) {
  if constexpr (N > 1) {
    if (mr < N) {
      packed_tile_mr<TW, TX, N - 1>(mr, panel, kp, x, k0, c, load, pf_ahead, pf, pf_lines);
      return;
    }
  }
  packed_tile_k<TW, TX, N>(panel, kp, x, k0, c, load, pf_ahead, pf, pf_lines);
}

// c[m][0:32] = token m's sums over one whole group panel (kh k-units), for all n tokens of an
// expert. Plan: 1. split the n tokens into the fewest tiles of at most MR, sized evenly (16
// tokens run as 8 + 8, not 14 + 2); 2. one tile: stream the panel once, prefetching ahead; several:
// walk the panel in chunks of kPackKc units held in L1 for all the tiles, the partial sums parked in
// c between chunks, while the tiles together prefetch the next chunk (the panels of a thread's
// consecutive groups are contiguous, so past a group's end that is the next group's start). With
// only the first tile prefetching, DRAM idled while the others ran: the Mixtral-style experts at 16
// rows each took 4.4 ms against 3.2 ms with the prefetch spread (bf16, weights streamed).
template <typename TW, typename TX>
inline void packed_group(const char* pb, int64_t kh, const TX* const* x, int64_t n, float* c) {
  constexpr int MR = pack_mr<TW, TX>();
  const int64_t tiles = (n + MR - 1) / MR;
  const int mr = (int)((n + tiles - 1) / tiles);
  if (tiles == 1) {
    packed_tile_mr<TW, TX, MR>(mr, pb, kh, x, 0, c, false, kPackPrefetch, nullptr, 0);
    return;
  }
  for (int64_t k0 = 0; k0 < kh; k0 += kPackKc) {
    const int64_t kp = std::min(kPackKc, kh - k0);
    const int64_t lines = 2 * kPackKc, per_tile = (lines + tiles - 1) / tiles;  // of the next chunk
    int64_t t = 0;
    for (int64_t m0 = 0; m0 < n; m0 += mr, ++t) {
      const int mb = (int)std::min<int64_t>(mr, n - m0);
      const int64_t first = t * per_tile;
      packed_tile_mr<TW, TX, MR>(mb, pb, kp, x + m0, k0, c + m0 * kPackC, k0 > 0, 0, pb + (k0 + kp) * 128 + first * 64,
                                 std::min(per_tile, std::max<int64_t>(0, lines - first)));
    }
  }
}

template <typename TW, typename TX>
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
  const TX* xp = x.data_ptr<TX>();
  const char* w13p = reinterpret_cast<const char*>(p13.data_ptr<TW>());
  const char* w2p = reinterpret_cast<const char*>(p2.data_ptr<TW>());
  TX* ap = a_buf.data_ptr<TX>();
  float* op = out.data_ptr<float>();
  const int64_t panel13 = Dh * 128, panel2 = Fh * 128;  // bytes: 32 columns x one k-unit = 128 B
  const int64_t Dx = Dh * kUnit<TW>;  // elements per input row

  at::parallel_for(0, G1, 1, [&](int64_t lo, int64_t hi) {
    std::vector<const TX*> xr;
    std::vector<float> c;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = counts[e];
      if (n <= 0) continue;
      xr.resize(n);
      c.resize(n * kPackC);
      for (int64_t m = 0; m < n; ++m) {
        const int64_t s = starts[e] + m;
        xr[m] = xp + (src ? src[s] : s) * Dx;
      }
      for (int64_t g = lo; g < hi; ++g) {
        packed_group<TW, TX>(w13p + (e * G1 + g) * panel13, Dh, xr.data(), n, c.data());
        for (int64_t m = 0; m < n; ++m) {
          const float* cm = c.data() + m * kPackC;
          TX* arow = ap + (starts[e] + m) * Fp;
          if (gated) {  // 16 gate sums then 16 up sums -> 16 activations
            activate_row<TX>(cm, cm + 16, 16, act, arow + 16 * g);
          } else {
            activate_row<TX>(cm, nullptr, kPackC, act, arow + kPackC * g);
          }
        }
      }
    }
  });
  // Phase 2 starts after every activation exists (parallel_for returns = barrier).
  at::parallel_for(0, G2, 1, [&](int64_t lo, int64_t hi) {
    std::vector<const TX*> ar;
    std::vector<float> c;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = counts[e];
      if (n <= 0) continue;
      ar.resize(n);
      c.resize(n * kPackC);
      for (int64_t m = 0; m < n; ++m) ar[m] = ap + (starts[e] + m) * Fp;
      for (int64_t g = lo; g < hi; ++g) {
        packed_group<TW, TX>(w2p + (e * G2 + g) * panel2, Fh, ar.data(), n, c.data());
        const int64_t d0 = g * kPackC, w = std::min<int64_t>(kPackC, D - d0);
        for (int64_t m = 0; m < n; ++m) {
          const int64_t s = starts[e] + m;
          float* o = op + (dst ? dst[s] : s) * D + d0;
          const vf sc = vset1(scale ? scale[s] : 1.0f);
          const float* cm = c.data() + m * kPackC;
          for (int64_t j = 0; j < w; j += VL) {
            const int nl = tail(w - j);
            vstoren(o + j, vfma(sc, vload(cm + j), vloadn(o + j, nl)), nl);
          }
        }
      }
    }
  });
}

void check_packed(const torch::Tensor& x, const torch::Tensor& p13, const torch::Tensor& p2, const torch::Tensor& out) {
  const auto wt = p13.scalar_type();
  TORCH_CHECK(p2.scalar_type() == wt, "moe_experts_packed: p13 and p2 must share a dtype");
  check_mix("moe_experts_packed", x.scalar_type(), wt);
  TORCH_CHECK(x.is_contiguous() && p13.is_contiguous() && p2.is_contiguous() && out.is_contiguous(),
              "moe_experts_packed: tensors must be contiguous");
  const int64_t u = wt == torch::kBFloat16 ? 2 : 1;  // elements per k-unit
  TORCH_CHECK(p13.dim() == 5 && p2.dim() == 5 && p13.size(3) == kPackC && p2.size(3) == kPackC &&
                  p13.size(4) == u && p2.size(4) == u && p13.size(0) == p2.size(0),
              "moe_experts_packed: weights must come from kernels.pack_experts ([E, G, K/u, 32, u])");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == u * p13.size(2), "moe_experts_packed: x [R, D] with D = u * p13.size(2)");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.dim() == 2 && out.size(1) == x.size(1) &&
                  out.size(1) <= kPackC * p2.size(1),
              "moe_experts_packed: out must be float32 [n_out, D]");
}

}  // namespace

// moe_experts on packed weights (kernels.pack_experts): same contract otherwise; packed weights
// bf16 or fp32, x their dtype or fp32 with bf16 weights.
void moe_experts_packed(torch::Tensor x, torch::Tensor p13, torch::Tensor p2, torch::Tensor starts,
                        torch::Tensor counts, torch::Tensor src, torch::Tensor dst, torch::Tensor scale,
                        torch::Tensor out, int64_t act) {
  check_packed(x, p13, p2, out);
  const float* sc = scale.numel() ? scale.data_ptr<float>() : nullptr;
  dispatch_mix(x, p13.scalar_type(), [&](auto tw, auto tx, const torch::Tensor& xc) {
    moe_experts_packed_impl<decltype(tw), decltype(tx)>(xc, p13, p2, starts.data_ptr<int64_t>(),
                                                        counts.data_ptr<int64_t>(), opt_i64(src), opt_i64(dst), sc,
                                                        out, act);
  });
}

// moe_experts_topk on packed weights.
torch::Tensor moe_experts_topk_packed(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor p13,
                                      torch::Tensor p2, int64_t act) {
  auto g = topk_groups(ids, weights, p13.size(0));
  auto out = torch::zeros({ids.size(0), x.size(1)}, x.options().dtype(torch::kFloat32));
  moe_experts_packed(x, p13, p2, g.starts, g.counts, g.rows, g.rows, g.scale, out, act);
  return out;
}
