// moekit CPU kernels, part 4: low-bit weights (int8, int4 with or without zero points, MXFP4) at
// decode sizes: the top-k MoE expert block and a small-M linear on moekit.quant's packed codes.
//
// Why: without these, every quantized expert was dequantized to float on every call (torch ops:
// 4-6x slower than bf16 at decode). Here each weight block is decoded to 32 signed int8 values in
// registers and multiplied with the activations quantized to int8 per block of 32 (what
// llama.cpp's Q8_0 x Q8_0 / Q4_0 x Q8_0 dot products do): an integer dot product per block, then
// one float multiply-add by (weight scale x activation scale). Integer dots take a fraction of the
// instructions of widening every weight to fp32, which matters once weights are 4 bits: the
// widening path is compute-bound below the memory bandwidth.
//
// Per tier: the AVX-512 tiers (VNNI) multiply-accumulate 32 unsigned x signed byte pairs with one
// vpdpbusd; AVX2 uses vpmaddubsw + vpmaddwd (no saturation: see dot_u8s8). The 4-bit schemes feed
// their stored codes (unsigned 0..15) straight in and subtract zero x sum(x) per block; int8 and
// MXFP4 values are signed, so they go through the sign trick: |x| (unsigned) times w * sign(x).
// 256-bit vectors on every tier: a block is 32 bytes, and Zen 4 splits 512-bit ops in two anyway.
//
// Storage (moekit.quant.formats, GGUF's block order): int8 codes [O, K]; 4-bit codes [O, K/2],
// byte j of each 16-byte block holding element j (low nibble) and j + 16 (high); scales [O, K/G]
// float16 (MXFP4: E8M0 exponent bytes); zero points [O, K/G] uint8 (int4 with zero points).
// Shape legend as in moe_cpu.cpp; O output rows, K input dim, G group size (a multiple of 32),
// B = K / 32 blocks per row.

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define MOEKIT_VNNI 1
#endif

namespace {

constexpr int kQB = 32;  // elements per block: activation scale blocks, and the unit of every weight group

enum QScheme : int64_t { kQInt8 = 0, kQInt4 = 1, kQInt4Zp = 2, kQMxfp4 = 3 };

// Rows quantized to int8 per 32-element block (Q8_0's rule: d = amax / 127, q = round(x / d)):
// codes, their absolute values (the unsigned operand of the byte dot) and d. R rows of K.
// c = d x (sum of the block's codes): the 4-bit paths multiply unsigned codes (code + 8, or code
// with its zero point added back) and subtract zero x c per block afterwards.
struct QRows {
  std::vector<int8_t> q;
  std::vector<uint8_t> a;
  std::vector<float> d, c;
  int64_t K = 0;
  QRows(int64_t R, int64_t K_) : q(R * K_), a(R * K_), d(R * K_ / kQB), c(R * K_ / kQB), K(K_) {}
  const int8_t* qrow(int64_t r) const { return q.data() + r * K; }
  const uint8_t* arow(int64_t r) const { return a.data() + r * K; }
  const float* drow(int64_t r) const { return d.data() + r * (K / kQB); }
  const float* crow(int64_t r) const { return c.data() + r * (K / kQB); }
};

// Quantize rows [r0, r1) of x (row stride K, float) into qr. The rounding (x * (127 / amax), to
// nearest even) is the reference's (moekit.kernels.quant.quantize_rows_q8), so tests can match it.
inline void quantize_rows(const float* x, int64_t r0, int64_t r1, QRows& qr) {
  const int64_t K = qr.K, nb = K / kQB;
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * K;
    int8_t* q = qr.q.data() + r * K;
    uint8_t* a = qr.a.data() + r * K;
    float* d = qr.d.data() + r * nb;
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = xr + b * kQB;
      __m256 m = _mm256_setzero_ps();
      const __m256 sign = _mm256_set1_ps(-0.0f);
      for (int i = 0; i < kQB; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      d[b] = amax / 127.0f;
      const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      __m256i v[4];
      for (int i = 0; i < 4; ++i)  // cvtps rounds to nearest even (the default MXCSR mode)
        v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * i), inv));
      // 32 int32 -> 32 int8: the packs interleave 128-bit lanes, one permute puts them back in order.
      const __m256i w16a = _mm256_packs_epi32(v[0], v[1]), w16b = _mm256_packs_epi32(v[2], v[3]);
      const __m256i w8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16a, w16b),
                                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256((__m256i*)(q + b * kQB), w8);
      _mm256_storeu_si256((__m256i*)(a + b * kQB), _mm256_abs_epi8(w8));
      int sum = 0;
      for (int i = 0; i < kQB; ++i) sum += q[b * kQB + i];
      qr.c[r * nb + b] = d[b] * (float)sum;
    }
  }
}

// One quantized matrix (one expert's, or a linear's) [O, K].
struct QMat {
  const uint8_t* q;
  const uint16_t* s16;  // float16 scales [O, K/G] (int8 / int4)
  const uint8_t* s8;    // E8M0 exponents [O, K/32] (mxfp4)
  const uint8_t* z;     // zero points [O, K/G] (int4 with zero points)
  int64_t K, G;
};

// 2 x E2M1 as int8, indexed by the 4-bit code (GGML's table for MXFP4: the scale is then halved).
alignas(32) constexpr int8_t kMxfp4x2[32] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,
                                             0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// 2^(e - 128): an E8M0 scale 2^(e - 127) halved for the doubled E2M1 table (exact; e = 0 is a subnormal).
struct E8M0Half {
  float v[256];
  E8M0Half() { for (int e = 0; e < 256; ++e) v[e] = std::ldexp(1.0f, e - 128); }
};
const E8M0Half kE8M0Half;

inline int64_t row_bytes(int64_t S, int64_t K) { return S == kQInt8 ? K : K / 2; }

// 8 int32 partial sums of a (unsigned) x sw (signed) over 32 byte pairs. The operands are 4-bit codes
// (<= 15) or |x| <= 127 against |w| <= 127, so AVX2's 16-bit pair sums cannot saturate.
inline __m256i dot_u8s8(__m256i a, __m256i sw) {
#ifdef MOEKIT_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, sw);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, sw), _mm256_set1_epi16(1));
#endif
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Block b of a 4-bit row as 32 unsigned codes (0..15): the int4 paths' byte operand as stored.
inline __m256i nibbles(const uint8_t* row, int64_t b) {
  const __m128i by = _mm_loadu_si128((const __m128i*)(row + b * (kQB / 2)));
  const __m128i lo4 = _mm_set1_epi8(0x0f);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(by, 4), lo4), _mm_and_si128(by, lo4));
}

// Block b of an int8 or MXFP4 row as 32 signed int8 values (the code, or 2 x the E2M1 value).
template <int64_t S>
inline __m256i decode_block(const uint8_t* row, int64_t b) {
  if constexpr (S == kQInt8) return _mm256_loadu_si256((const __m256i*)(row + b * kQB));
  else return _mm256_shuffle_epi8(_mm256_load_si256((const __m256i*)kMxfp4x2), nibbles(row, b));
}

// The 8 float scales of weight blocks b0 .. b0 + 7 of a row (a group spans 2^gshift blocks).
template <int64_t S>
inline __m256 scales8(const uint16_t* s16, const uint8_t* s8, int64_t b0, int gshift) {
  if constexpr (S == kQMxfp4) {
    const float* t = kE8M0Half.v;
    return _mm256_setr_ps(t[s8[b0]], t[s8[b0 + 1]], t[s8[b0 + 2]], t[s8[b0 + 3]], t[s8[b0 + 4]], t[s8[b0 + 5]],
                          t[s8[b0 + 6]], t[s8[b0 + 7]]);
  } else {
    // b0 is a multiple of 8 and groups are 1, 2 or 4 blocks (G = 32, 64, 128): the 8 blocks touch
    // exactly 8 >> gshift groups, loaded without reading past them (a variable-length memcpy here
    // was a library call per 8 blocks).
    const uint16_t* p = s16 + (b0 >> gshift);
    __m128i h;
    if (gshift == 0) h = _mm_loadu_si128((const __m128i*)p);
    else if (gshift == 1) h = _mm_loadl_epi64((const __m128i*)p);
    else if (gshift == 2) {
      int32_t two;
      std::memcpy(&two, p, sizeof(two));  // constant size: inlined
      h = _mm_cvtsi32_si128(two);
    }
    else h = _mm_set1_epi16((short)p[0]);  // G = 256 (not produced by moekit.quant): one group
    const __m256 v = _mm256_cvtph_ps(h);
    if (gshift == 0) return v;
    const __m256i lane = _mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), gshift);
    return _mm256_permutevar8x32_ps(v, lane);  // block i takes its group's scale
  }
}

// The zero points of those 8 blocks as floats (int4: 8; int4 with zero points: the stored z).
template <int64_t S>
inline __m256 zeros8(const uint8_t* z, int64_t b0, int gshift) {
  if constexpr (S == kQInt4Zp) {
    alignas(32) float f[8];
    for (int i = 0; i < 8; ++i) f[i] = (float)z[(b0 + i) >> gshift];
    return _mm256_load_ps(f);
  } else {
    return _mm256_set1_ps(8.0f);
  }
}

// acc[m] = dot(weight row r, activation row xr[m]) for m < MB: each block decoded once and reused by
// the MB rows. Blocks go 8 at a time: the 8 weight scales times the 8 activation scales are one
// vector multiply, and each block's combined scale a lane broadcast (the first version spent more
// instructions on per-block scalar scale work than on the dot products). The 4-bit schemes multiply
// the unsigned stored codes directly (no sign fix-up) and subtract zero x (d x sum of x codes) for
// each block at the end, in the same vector form; int8 and MXFP4 (signed values) use the sign trick.
// Two accumulators per row (even / odd blocks) break the multiply-add chain.
template <int64_t S, int MB>
inline void qrow_dot(const QMat& w, int64_t r, const QRows& xq, const int64_t* xr, float* acc) {
  constexpr bool kU4 = S == kQInt4 || S == kQInt4Zp;
  constexpr int64_t kBlockBytes = S == kQInt8 ? kQB : kQB / 2;
  const int64_t nb = w.K / kQB, ns = w.K / (S == kQMxfp4 ? kQB : w.G);
  const int gshift = S == kQMxfp4 ? 0 : __builtin_ctzll((unsigned long long)(w.G / kQB));
  const uint8_t* row = w.q + r * row_bytes(S, w.K);
  const uint16_t* s16 = S == kQMxfp4 ? nullptr : w.s16 + r * ns;
  const uint8_t* s8 = S == kQMxfp4 ? w.s8 + r * ns : nullptr;
  const uint8_t* zr = S == kQInt4Zp ? w.z + r * ns : nullptr;
  const int8_t* xqm[MB];
  const uint8_t* xam[MB];
  const float* xdm[MB];
  const float* xcm[MB];
  for (int m = 0; m < MB; ++m) {
    xqm[m] = xq.qrow(xr[m]); xam[m] = xq.arow(xr[m]); xdm[m] = xq.drow(xr[m]); xcm[m] = xq.crow(xr[m]);
  }
  __m256 s0[MB], s1[MB], corr[MB];
  for (int m = 0; m < MB; ++m) { s0[m] = _mm256_setzero_ps(); s1[m] = _mm256_setzero_ps(); corr[m] = _mm256_setzero_ps(); }
  // One block against every row, with its combined scale taken from lane i of c8[m].
  auto block = [&](int64_t b, const __m256* c8, int i, __m256* s) __attribute__((always_inline)) {
    if ((b * kBlockBytes) % 64 == 0) _mm_prefetch((const char*)row + b * kBlockBytes + kPrefetchBytes, _MM_HINT_T0);
    const __m256i idx = _mm256_set1_epi32(i);
    if constexpr (kU4) {
      const __m256i n = nibbles(row, b);
      for (int m = 0; m < MB; ++m) {
        const __m256i xqv = _mm256_loadu_si256((const __m256i*)(xqm[m] + b * kQB));
        const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(n, xqv));
        s[m] = _mm256_fmadd_ps(p, _mm256_permutevar8x32_ps(c8[m], idx), s[m]);
      }
    } else {
      const __m256i wv = decode_block<S>(row, b);
      for (int m = 0; m < MB; ++m) {
        const __m256i xqv = _mm256_loadu_si256((const __m256i*)(xqm[m] + b * kQB));
        const __m256i xav = _mm256_loadu_si256((const __m256i*)(xam[m] + b * kQB));
        const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(xav, _mm256_sign_epi8(wv, xqv)));
        s[m] = _mm256_fmadd_ps(p, _mm256_permutevar8x32_ps(c8[m], idx), s[m]);
      }
    }
  };
  int64_t b0 = 0;
  for (; b0 + 8 <= nb; b0 += 8) {
    const __m256 ws8 = scales8<S>(s16, s8, b0, gshift);
    __m256 c8[MB];
    for (int m = 0; m < MB; ++m) {
      c8[m] = _mm256_mul_ps(ws8, _mm256_loadu_ps(xdm[m] + b0));
      if constexpr (kU4)
        corr[m] = _mm256_fmadd_ps(_mm256_mul_ps(ws8, zeros8<S>(zr, b0, gshift)), _mm256_loadu_ps(xcm[m] + b0), corr[m]);
    }
    for (int i = 0; i < 8; i += 2) {
      block(b0 + i, c8, i, s0);
      block(b0 + i + 1, c8, i + 1, s1);
    }
  }
  for (int64_t b = b0; b < nb; ++b) {  // the last K % 256 inputs: one block at a time, scalar scales
    const int64_t g = b >> gshift;
    const float ws = S == kQMxfp4 ? kE8M0Half.v[s8[g]] : _cvtsh_ss(s16[g]);
    __m256 c1[MB];
    for (int m = 0; m < MB; ++m) {
      c1[m] = _mm256_set1_ps(ws * xdm[m][b]);
      if constexpr (kU4) {
        const float z = S == kQInt4 ? 8.0f : (float)zr[g];
        corr[m] = _mm256_add_ps(corr[m], _mm256_setr_ps(ws * z * xcm[m][b], 0, 0, 0, 0, 0, 0, 0));
      }
    }
    block(b, c1, 0, s0);
  }
  for (int m = 0; m < MB; ++m) acc[m] = hsum8(_mm256_sub_ps(_mm256_add_ps(s0[m], s1[m]), corr[m]));
}

template <int64_t S>
inline void qrow_dot_m(const QMat& w, int64_t r, const QRows& xq, const int64_t* xr, int mb, float* acc) {
  switch (mb) {
    case 1: qrow_dot<S, 1>(w, r, xq, xr, acc); break;
    case 2: qrow_dot<S, 2>(w, r, xq, xr, acc); break;
    case 3: qrow_dot<S, 3>(w, r, xq, xr, acc); break;
    case 4: qrow_dot<S, 4>(w, r, xq, xr, acc); break;
    case 5: qrow_dot<S, 5>(w, r, xq, xr, acc); break;
    case 6: qrow_dot<S, 6>(w, r, xq, xr, acc); break;
    case 7: qrow_dot<S, 7>(w, r, xq, xr, acc); break;
    default: qrow_dot<S, 8>(w, r, xq, xr, acc); break;
  }
}

// A stacked quantized tensor [E, O, K] as given from Python (codes, scales, zeros or empty).
struct QStack {
  const uint8_t* q;
  const uint16_t* s16;
  const uint8_t* s8;
  const uint8_t* z;
  int64_t O, K, G;
  QMat expert(int64_t e, int64_t S) const {
    const int64_t ns = K / (S == kQMxfp4 ? kQB : G);
    return QMat{q + e * O * row_bytes(S, K), s16 ? s16 + e * O * ns : nullptr, s8 ? s8 + e * O * ns : nullptr,
                z ? z + e * O * ns : nullptr, K, G};
  }
};

QStack qstack(const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& z, int64_t S, int64_t G,
              int64_t K, const char* what) {
  TORCH_CHECK(q.is_contiguous() && s.is_contiguous() && (!z.numel() || z.is_contiguous()), what,
              ": codes, scales and zeros must be contiguous");
  TORCH_CHECK(q.element_size() == 1, what, ": codes must be int8 or uint8");
  TORCH_CHECK(G % kQB == 0 && K % G == 0, what, ": group size must be a multiple of 32 dividing the input dim");
  TORCH_CHECK(q.size(-1) == row_bytes(S, K), what, ": codes have ", q.size(-1), " bytes per row, expected ",
              row_bytes(S, K));
  if (S == kQMxfp4) {
    TORCH_CHECK(s.element_size() == 1 && G == kQB, what, ": mxfp4 scales are E8M0 bytes per 32");
  } else {
    TORCH_CHECK(s.scalar_type() == torch::kFloat16, what, ": scales must be float16");
  }
  TORCH_CHECK((S == kQInt4Zp) == (z.numel() > 0), what, ": zero points go with int4 zero-point codes only");
  const auto* sp = static_cast<const uint8_t*>(s.data_ptr());
  return QStack{static_cast<const uint8_t*>(q.data_ptr()), S == kQMxfp4 ? nullptr : (const uint16_t*)sp,
                S == kQMxfp4 ? sp : nullptr, z.numel() ? z.data_ptr<uint8_t>() : nullptr, q.size(-2), K, G};
}

// The top-k expert block (moe_experts_topk's contract) on quantized w13 [E, H, D] / w2 [E, D, F].
// Plan: 1. group the rows by expert (topk_groups); 2. quantize the T token rows once; 3. phase 1,
// threads over hidden units: gate/up dots and the activation into a [S, F] (float); 4. quantize a;
// 5. phase 2, threads over output columns: down-projection dots, weighted, into out[token].
template <int64_t S>
void moe_q_impl(const torch::Tensor& x, const TopkGroups& g, const QStack& w13, const QStack& w2, int64_t act,
                torch::Tensor& out) {
  const int64_t T = x.size(0), D = x.size(1), E = g.counts.size(0), H = w13.O, F = w2.K;
  const bool gated = act != 2;
  const int64_t A = g.rows.size(0);
  const int64_t* starts = g.starts.data_ptr<int64_t>();
  const int64_t* counts = g.counts.data_ptr<int64_t>();
  const int64_t* tok = g.rows.data_ptr<int64_t>();
  const float* scale = g.scale.data_ptr<float>();
  TORCH_CHECK(H == (gated ? 2 * F : F), "moe_experts_topk_q: w13 rows do not match the activation");
  QRows xq(T, D);
  at::parallel_for(0, T, 1, [&](int64_t lo, int64_t hi) { quantize_rows(x.data_ptr<float>(), lo, hi, xq); });
  std::vector<float> a(A * F);
  at::parallel_for(0, F, 16, [&](int64_t lo, int64_t hi) {
    // Raw gate / up sums of this thread's hidden units, then one vectorised activation pass per row
    // (a scalar exp per unit cost ~10% of a decode-sized call).
    const int64_t n = hi - lo;
    std::vector<float> gb(kMaxMB * n), ub(kMaxMB * n);
    float gs[kMaxMB], us[kMaxMB];
    for (int64_t e = 0; e < E; ++e) {
      if (counts[e] <= 0) continue;
      const QMat we = w13.expert(e, S);
      for (int64_t m0 = 0; m0 < counts[e]; m0 += kMaxMB) {
        const int mb = (int)std::min<int64_t>(kMaxMB, counts[e] - m0);
        const int64_t* xr = tok + starts[e] + m0;
        for (int64_t j = lo; j < hi; ++j) {
          qrow_dot_m<S>(we, j, xq, xr, mb, gs);
          if (gated) qrow_dot_m<S>(we, F + j, xq, xr, mb, us);
          for (int m = 0; m < mb; ++m) {
            gb[m * n + j - lo] = gs[m];
            ub[m * n + j - lo] = us[m];
          }
        }
        for (int m = 0; m < mb; ++m)
          activate_row<float>(gb.data() + m * n, gated ? ub.data() + m * n : nullptr, n, act,
                              a.data() + (starts[e] + m0 + m) * F + lo);
      }
    }
  });
  QRows aq(A, F);
  at::parallel_for(0, A, 1, [&](int64_t lo, int64_t hi) { quantize_rows(a.data(), lo, hi, aq); });
  float* op = out.data_ptr<float>();
  at::parallel_for(0, D, 16, [&](int64_t lo, int64_t hi) {
    float ys[kMaxMB];
    int64_t sr[kMaxMB];
    for (int64_t e = 0; e < E; ++e) {
      if (counts[e] <= 0) continue;
      const QMat we = w2.expert(e, S);
      for (int64_t m0 = 0; m0 < counts[e]; m0 += kMaxMB) {
        const int mb = (int)std::min<int64_t>(kMaxMB, counts[e] - m0);
        for (int m = 0; m < mb; ++m) sr[m] = starts[e] + m0 + m;  // rows of a, in sorted order
        for (int64_t d = lo; d < hi; ++d) {
          qrow_dot_m<S>(we, d, aq, sr, mb, ys);
          for (int m = 0; m < mb; ++m) op[tok[sr[m]] * D + d] += scale[sr[m]] * ys[m];
        }
      }
    }
  });
}

template <typename Fn>
void dispatch_scheme(int64_t S, Fn&& f) {
  switch (S) {
    case kQInt8: f(std::integral_constant<int64_t, kQInt8>{}); break;
    case kQInt4: f(std::integral_constant<int64_t, kQInt4>{}); break;
    case kQInt4Zp: f(std::integral_constant<int64_t, kQInt4Zp>{}); break;
    case kQMxfp4: f(std::integral_constant<int64_t, kQMxfp4>{}); break;
    default: TORCH_CHECK(false, "quantized kernels: unknown scheme code ", S);
  }
}

}  // namespace

// out [T, D] float32 = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) with quantized experts:
// x [T, D] float32; ids/weights [T, K]; w13: codes [E, H, D or D/2], scales, zeros (or empty);
// w2 the same over [E, D, F]; scheme 0 int8, 1 int4, 2 int4 with zero points, 3 mxfp4; group G.
torch::Tensor moe_experts_topk_q(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor q13,
                                 torch::Tensor s13, torch::Tensor z13, torch::Tensor q2, torch::Tensor s2,
                                 torch::Tensor z2, int64_t scheme, int64_t G, int64_t act) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2,
              "moe_experts_topk_q: x must be contiguous float32 [T, D]");
  const int64_t D = x.size(1);
  TORCH_CHECK(D % kQB == 0, "moe_experts_topk_q: the model dim must be a multiple of 32");
  const QStack w13 = qstack(q13, s13, z13, scheme, G, D, "moe_experts_topk_q w13");
  const int64_t F = scheme == kQInt8 ? q2.size(-1) : 2 * q2.size(-1);
  const QStack w2 = qstack(q2, s2, z2, scheme, G, F, "moe_experts_topk_q w2");
  TORCH_CHECK(q2.size(-2) == D && q13.size(0) == q2.size(0), "moe_experts_topk_q: w2 must be [E, D, F] like w13");
  auto g = topk_groups(ids, weights, q13.size(0));
  auto out = torch::zeros({x.size(0), D}, x.options());
  dispatch_scheme(scheme, [&](auto s) { moe_q_impl<decltype(s)::value>(x, g, w13, w2, act, out); });
  return out;
}

// out [M, N] float32 = x [M, K] float32 @ w.T for a quantized w (codes [N, K or K/2], scales, zeros).
torch::Tensor linear_q(torch::Tensor x, torch::Tensor q, torch::Tensor s, torch::Tensor z, int64_t scheme,
                       int64_t G) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2,
              "linear_q: x must be contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kQB == 0, "linear_q: the input dim must be a multiple of 32");
  const QStack w = qstack(q, s, z, scheme, G, K, "linear_q");
  const int64_t N = w.O;
  QRows xq(M, K);
  at::parallel_for(0, M, 1, [&](int64_t lo, int64_t hi) { quantize_rows(x.data_ptr<float>(), lo, hi, xq); });
  auto out = torch::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  dispatch_scheme(scheme, [&](auto sc) {
    constexpr int64_t S = decltype(sc)::value;
    const QMat wm = w.expert(0, S);
    at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
      float acc[kMaxMB];
      int64_t xr[kMaxMB];
      for (int64_t m0 = 0; m0 < M; m0 += kMaxMB) {
        const int mb = (int)std::min<int64_t>(kMaxMB, M - m0);
        for (int m = 0; m < mb; ++m) xr[m] = m0 + m;
        for (int64_t n = lo; n < hi; ++n) {
          qrow_dot_m<S>(wm, n, xq, xr, mb, acc);
          for (int m = 0; m < mb; ++m) op[(m0 + m) * N + n] = acc[m];
        }
      }
    });
  });
  return out;
}

// The activation rows as the kernels quantize them: (codes int8 [R, K], scales float32 [R, K/32]);
// for tests (the reference's rounding must be the kernel's).
std::vector<torch::Tensor> quantize_rows_q8(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && x.size(1) % kQB == 0,
              "quantize_rows_q8: x must be contiguous float32 [R, K], K a multiple of 32");
  const int64_t R = x.size(0), K = x.size(1);
  QRows xq(R, K);
  quantize_rows(x.data_ptr<float>(), 0, R, xq);
  auto q = torch::from_blob(xq.q.data(), {R, K}, torch::kInt8).clone();
  auto d = torch::from_blob(xq.d.data(), {R, K / kQB}, torch::kFloat32).clone();
  return {q, d};
}
