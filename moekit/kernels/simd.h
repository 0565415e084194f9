// moekit CPU kernels, part 0: a thin SIMD layer, so one kernel source compiles for every x86 tier.
// Concatenated first (moekit/kernels/__init__.py builds one module per tier with explicit flags):
//   avx2        -mavx2 -mfma -mf16c                      vf = __m256 (8 floats)
//   avx512      + -mavx512f/bw/vl/dq -mavx512vnni        vf = __m512 (16 floats)
//   avx512bf16  + -mavx512bf16 (also the amx tier)       vf = __m512, and vdpbf16ps for bf16 x bf16
// The compiler's own macros pick the branch (__AVX512F__, __AVX512BF16__): no -march=native, so a
// build is the same on every CPU of its tier. bf16 data is widened to fp32 in registers (a 16-bit
// left shift) except on the bf16 tier's dot-product paths (MOEKIT_BF16DP).
//
// Every op takes a lane count n (1..VL) where a row may end mid-vector: masked on AVX-512, a mask
// vector (float) or a small copy (bf16) on AVX2. Lanes at or past n load as 0 and are not stored.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "moekit kernels need at least AVX2 + FMA (the avx2 tier's flags)"
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MOEKIT_AVX512 1
#endif
#if defined(MOEKIT_AVX512) && defined(__AVX512BF16__)
#define MOEKIT_BF16DP 1
#endif
#ifndef MOEKIT_NS
#define MOEKIT_NS moekit_kernels
#endif

// Each tier's module keeps its symbols in its own namespace: tests load several tiers into one process.
namespace MOEKIT_NS {

using bf16 = at::BFloat16;

namespace {

#ifdef MOEKIT_AVX512
using vf = __m512;
using vi = __m512i;
constexpr int VL = 16;
inline __mmask16 lanes(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float a) { return _mm512_set1_ps(a); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline vf vloadn(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
inline vf vloadn(const bf16* p, int n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes(n), p)), 16));
}
inline void vstoren(float* p, vf v, int n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
inline __m256i to_bf16_bits(vf v) {  // round to nearest even, as at::BFloat16 does (NaN stays NaN)
#ifdef MOEKIT_BF16DP
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const vi b = _mm512_castps_si512(v);
  const vi r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                    _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16), nan, _mm512_set1_epi32(0x7fc0)));
#endif
}
inline void vstoren(bf16* p, vf v, int n) { _mm256_mask_storeu_epi16((void*)p, lanes(n), to_bf16_bits(v)); }
inline vf vkeep(vf v, int n) { return _mm512_maskz_mov_ps(lanes(n), v); }        // lanes >= n -> 0
inline vf vmax_n(vf a, vf b, int n) { return _mm512_mask_max_ps(a, lanes(n), a, b); }  // lanes >= n keep a
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline vf vfms(vf a, vf b, vf c) { return _mm512_fmsub_ps(a, b, c); }    // a * b - c
inline float vhsum(vf v) { return _mm512_reduce_add_ps(v); }
inline float vhmax(vf v) { return _mm512_reduce_max_ps(v); }
inline vf vround(vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vscale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
inline vi vbcast_i32(int32_t a) { return _mm512_set1_epi32(a); }
inline vi vload_i(const void* p) { return _mm512_loadu_si512(p); }
inline vf vlo_bf16(vi w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }  // low bf16 of each pair
inline vf vhi_bf16(vi w) { return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u))); }
inline vf vcast_f(vi w) { return _mm512_castsi512_ps(w); }
#else
using vf = __m256;
using vi = __m256i;
constexpr int VL = 8;
alignas(32) constexpr int32_t kLaneTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
inline __m256i lanes(int n) { return _mm256_loadu_si256((const __m256i*)(kLaneTable + 8 - (n >= 8 ? 8 : n))); }
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float a) { return _mm256_set1_ps(a); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline vf vloadn(const float* p, int n) { return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes(n)); }
inline vf vloadn(const bf16* p, int n) {
  if (n >= 8) return vload(p);
  alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // no 16-bit masked load on AVX2: copy the tail
  std::memcpy(t, p, n * sizeof(uint16_t));
  return vload(reinterpret_cast<const bf16*>(t));
}
inline void vstoren(float* p, vf v, int n) {
  if (n >= 8) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, lanes(n), v);
}
inline __m128i to_bf16_bits(vf v) {  // round to nearest even, as at::BFloat16 does (NaN stays NaN)
  const vi b = _mm256_castps_si256(v);
  vi r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                              _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1))));
  r = _mm256_srli_epi32(r, 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const vi packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // 16-bit halves, in order
  return _mm256_castsi256_si128(packed);
}
inline void vstoren(bf16* p, vf v, int n) {
  const __m128i h = to_bf16_bits(v);
  if (n >= 8) {
    _mm_storeu_si128((__m128i*)p, h);
  } else {
    alignas(16) uint16_t t[8];
    _mm_store_si128((__m128i*)t, h);
    std::memcpy((void*)p, t, n * sizeof(uint16_t));
  }
}
inline vf vkeep(vf v, int n) { return n >= 8 ? v : _mm256_and_ps(v, _mm256_castsi256_ps(lanes(n))); }
inline vf vmax_n(vf a, vf b, int n) {
  return n >= 8 ? _mm256_max_ps(a, b) : _mm256_blendv_ps(a, _mm256_max_ps(a, b), _mm256_castsi256_ps(lanes(n)));
}
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline vf vfms(vf a, vf b, vf c) { return _mm256_fmsub_ps(a, b, c); }
inline float vhsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vhmax(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vround(vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vscale2(vf p, vf n) {  // p * 2^n for integral n in [-126, 127]: build 2^n from its exponent bits
  const vi e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
inline vi vbcast_i32(int32_t a) { return _mm256_set1_epi32(a); }
inline vi vload_i(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline vf vlo_bf16(vi w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
inline vf vhi_bf16(vi w) { return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xffff0000u))); }
inline vf vcast_f(vi w) { return _mm256_castsi256_ps(w); }
#endif

inline void vstore(float* p, vf v) { vstoren(p, v, VL); }
inline void vstore(bf16* p, vf v) { vstoren(p, v, VL); }
inline int tail(int64_t n) { return n >= VL ? VL : (int)n; }  // lanes of a vector at n elements left

// exp(v): v = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-7 Taylor polynomial (relative
// error < 1e-8 there), times 2^n. Vectorised because a scalar expf per element costs as much as
// a tile's arithmetic (activations) or the whole pass (softmax, cross-entropy).
inline vf vexp(vf v) {
  v = vmin(vmax(v, vset1(-87.0f)), vset1(88.0f));
  const vf n = vround(vmul(v, vset1(1.44269504088896341f)));
  vf r = vfnma(n, vset1(0.693359375f), v);  // ln2 in two parts: exact n * hi
  r = vfnma(n, vset1(-2.12194440e-4f), r);
  vf p = vset1(1.0f / 5040);
  p = vfma(p, r, vset1(1.0f / 720));
  p = vfma(p, r, vset1(1.0f / 120));
  p = vfma(p, r, vset1(1.0f / 24));
  p = vfma(p, r, vset1(1.0f / 6));
  p = vfma(p, r, vset1(0.5f));
  p = vfma(p, r, vset1(1.0f));
  p = vfma(p, r, vset1(1.0f));
  return vscale2(p, n);
}

inline vf vsilu(vf g) { return vdiv(g, vadd(vset1(1.0f), vexp(vsub(vzero(), g)))); }

}  // namespace
