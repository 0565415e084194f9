// moekit CPU training kernels, each one pass over rows in float32 registers (forward and
// backward), threaded with at::parallel_for: fused cross-entropy, causal softmax, rotary embedding,
// RMSNorm, and for the MoE layer the weighted combine / gather backward, the combine backward and
// the SwiGLU backward. The inference combine (`combine_rows`) shares the weighted row sum. Compiled into the same module as moe_cpu.cpp, over
// the SIMD layer of simd.h (vloadn, vstoren, vexp: AVX2 or AVX-512 per tier).
//
// Shape legend: N rows (target positions, query rows of all heads, or tokens), V vocabulary,
// S queries (attention) or rows grouped by expert (MoE), L keys, C row stride of a strided input,
// P rotary heads, d head dim, h = d / 2, T tokens, D model dim, K experts per token, F expert
// hidden dim.
//
// Why: on a 2-core CPU, a small MoE's training step (small-moe, B16 x S256, bf16 autocast) spent
// more time in the elementwise ops around its GEMMs than in the GEMMs' own share of the gap to
// transformers: ATen runs cross-entropy over [4096, 8192] logits as an upcast copy, a log_softmax
// and (in backward) a second softmax pass and a downcast copy; causal attention's scores go through
// masked_fill, an upcast copy, a scale, softmax and a downcast, and as many passes backward; rotary
// embedding is two cats, three multiplies and an add on strided views; RMSNorm is six ops forward
// and ten backward; the MoE combine is a float32 multiply, casts, a permutation and a sum over k.
// Each becomes one pass here.
namespace {

// Rows ahead to software-prefetch in the row-wise training kernels whose inputs come cold from
// DRAM (saved activations read back in backward).
constexpr int64_t kRowsAhead = 2;

// Software-prefetch [p, p + bytes) into L1, one request per 64-byte line.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char*)p + o, _MM_HINT_T0);
}

// Row r of logits: loss[r] = logsumexp(x) - x[t] (0 when t == ignore); with grad, g[r] = scale *
// (softmax(x) - onehot(t)) (0 for ignored rows). exp values wait in a per-thread float buffer
// between the sum and the store, so each element's exp is computed once.
template <typename T>
void cross_entropy_impl(const T* x, const int64_t* tgt, int64_t N, int64_t V, int64_t ignore, float scale,
                        float* loss, T* g) {
  at::parallel_for(0, N, 8, [&](int64_t lo, int64_t hi) {
    std::vector<float> e(V);
    for (int64_t r = lo; r < hi; ++r) {
      const T* xr = x + r * V;
      const int64_t t = tgt[r];
      if (t == ignore) {
        loss[r] = 0.0f;
        if (g) for (int64_t j = 0; j < V; j += VL) vstoren(g + r * V + j, vzero(), tail(V - j));
        continue;
      }
      vf mx = vset1(-INFINITY);
      const bool ahead = r + 1 < hi;
      for (int64_t j = 0; j < V; j += VL) {
        const int m = tail(V - j);
        if (ahead && (j * (int64_t)sizeof(T)) % 64 == 0) _mm_prefetch((const char*)(xr + V + j), _MM_HINT_T0);  // next row
        mx = vmax_n(mx, vloadn(xr + j, m), m);
      }
      const float xmax = vhmax(mx);
      const vf vmax = vset1(xmax);
      vf sum = vzero();
      for (int64_t j = 0; j < V; j += VL) {
        const int m = tail(V - j);
        const vf ev = vkeep(vexp(vsub(vloadn(xr + j, m), vmax)), m);
        vstoren(e.data() + j, ev, m);
        sum = vadd(sum, ev);
      }
      const float s = vhsum(sum);
      loss[r] = std::log(s) + xmax - (float)xr[t];
      if (!g) continue;
      const vf f = vset1(scale / s);
      T* gr = g + r * V;
      e[t] -= s;  // (e[t] - s) * scale / s = scale * (p[t] - 1)
      for (int64_t j = 0; j < V; j += VL) {
        const int m = tail(V - j);
        vstoren(gr + j, vmul(vloadn(e.data() + j, m), f), m);
      }
    }
  });
}

// Causal softmax over each query row of scores s [R, S, L] (query i sees keys j <= i + L - S),
// scaled by `scale` first, in float32; masked entries get probability 0.
template <typename T>
void causal_softmax_fwd_impl(const T* s, T* p, int64_t R, int64_t S, int64_t L, float scale) {
  const vf vs = vset1(scale);
  at::parallel_for(0, R * S, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> e(L);
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t n = std::min(L, row % S + L - S + 1);  // visible keys
      const T* sr = s + row * L;
      T* pr = p + row * L;
      if (row + kRowsAhead < hi) prefetch_bytes(sr + kRowsAhead * L, std::min(L, (row + kRowsAhead) % S + L - S + 1) * (int64_t)sizeof(T));
      vf mx = vset1(-INFINITY);
      for (int64_t j = 0; j < n; j += VL) {
        const int m = tail(n - j);
        mx = vmax_n(mx, vmul(vloadn(sr + j, m), vs), m);
      }
      const vf vmax = vset1(vhmax(mx));
      vf sum = vzero();
      for (int64_t j = 0; j < n; j += VL) {
        const int m = tail(n - j);
        const vf ev = vkeep(vexp(vfms(vloadn(sr + j, m), vs, vmax)), m);
        vstoren(e.data() + j, ev, m);
        sum = vadd(sum, ev);
      }
      const vf inv = vset1(1.0f / vhsum(sum));
      int64_t j = 0;
      for (; j < n; j += VL) {
        const int m = tail(n - j);
        vstoren(pr + j, vkeep(vmul(vloadn(e.data() + j, m), inv), m), tail(L - j));
      }
      for (; j < L; j += VL) vstoren(pr + j, vzero(), tail(L - j));
    }
  });
}

// ds = scale * p * (dp - sum_j p_j dp_j) over the visible keys, 0 beyond (softmax backward with the
// forward's scale folded in). p is the forward's output; dp the gradient reaching it.
template <typename T, typename G>
void causal_softmax_bwd_impl(const T* p, const G* dp, T* ds, int64_t R, int64_t S, int64_t L, float scale) {
  at::parallel_for(0, R * S, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t n = std::min(L, row % S + L - S + 1);
      const T* pr = p + row * L;
      const G* gr = dp + row * L;
      T* o = ds + row * L;
      if (row + kRowsAhead < hi) {
        const int64_t na = std::min(L, (row + kRowsAhead) % S + L - S + 1);
        prefetch_bytes(pr + kRowsAhead * L, na * (int64_t)sizeof(T));
        prefetch_bytes(gr + kRowsAhead * L, na * (int64_t)sizeof(G));
      }
      vf dot = vzero();
      for (int64_t j = 0; j < n; j += VL) {
        const int m = tail(n - j);
        dot = vfma(vloadn(pr + j, m), vloadn(gr + j, m), dot);
      }
      const vf vd = vset1(vhsum(dot)), vs = vset1(scale);
      int64_t j = 0;
      for (; j < n; j += VL) {
        const int m = tail(n - j);
        const vf v = vmul(vmul(vloadn(pr + j, m), vsub(vloadn(gr + j, m), vd)), vs);
        vstoren(o + j, vkeep(v, m), tail(L - j));
      }
      for (; j < L; j += VL) vstoren(o + j, vzero(), tail(L - j));
    }
  });
}

// Rotate-half rotary embedding: for row r (= b * S + s) and head p of x [N, P, d] (row stride C,
// heads contiguous): y[i] = x[i] c[i] - x[i+h] s[i], y[i+h] = x[i+h] c[i+h] + x[i] s[i+h], with
// c, s the float32 [N, d] tables. sign = -1 applies the transposed (inverse) rotation, the
// backward: dx[i] = dy[i] c[i] + dy[i+h] s[i+h], dx[i+h] = dy[i+h] c[i+h] - dy[i] s[i].
template <typename T>
void rope_impl(const T* x, int64_t C, const float* c, const float* sn, T* y, int64_t N, int64_t P, int64_t d,
               float sign) {
  const int64_t h = d / 2;
  const vf vsg = vset1(sign);
  const bool inv = sign < 0;
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* cr = c + r * d;
      const float* sr = sn + r * d;
      if (r + kRowsAhead < hi) {
        prefetch_bytes(x + (r + kRowsAhead) * C, P * d * (int64_t)sizeof(T));
        prefetch_bytes(cr + kRowsAhead * d, d * 4);
        prefetch_bytes(sr + kRowsAhead * d, d * 4);
      }
      for (int64_t p = 0; p < P; ++p) {
        const T* xr = x + r * C + p * d;
        T* yr = y + (r * P + p) * d;
        for (int64_t i = 0; i < h; i += VL) {
          const int m = tail(h - i);
          const vf x1 = vloadn(xr + i, m), x2 = vloadn(xr + h + i, m);
          // The inverse (transposed) rotation also swaps which half's sine multiplies which.
          const vf s1 = vmul(vloadn(sr + (inv ? h : 0) + i, m), vsg);
          const vf s2 = vmul(vloadn(sr + (inv ? 0 : h) + i, m), vsg);
          vstoren(yr + i, vfnma(x2, s1, vmul(x1, vloadn(cr + i, m))), m);
          vstoren(yr + h + i, vfma(x1, s2, vmul(x2, vloadn(cr + h + i, m))), m);
        }
      }
    }
  });
}

}  // namespace

// Per-row cross-entropy of logits [N, V] (bf16/fp32) against target [N] int64; with want_grad also
// the logits' gradient scale * (softmax - onehot) in the logits' dtype. Returns {loss [N] fp32, grad}.
std::vector<torch::Tensor> cross_entropy_rows(torch::Tensor logits, torch::Tensor target, int64_t ignore_index,
                                              double scale, bool want_grad) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && target.is_contiguous() &&
              target.scalar_type() == torch::kInt64 && target.numel() == logits.size(0),
              "cross_entropy_rows: contiguous logits [N, V] and int64 target [N] expected");
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t* tp = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r)
    TORCH_CHECK(tp[r] == ignore_index || (tp[r] >= 0 && tp[r] < V), "cross_entropy_rows: target ", tp[r],
                " out of range for vocabulary ", V);
  auto loss = torch::empty({N}, logits.options().dtype(torch::kFloat32));
  auto grad = want_grad ? torch::empty_like(logits) : torch::Tensor();
  if (logits.scalar_type() == torch::kBFloat16)
    cross_entropy_impl(logits.data_ptr<bf16>(), tp, N, V, ignore_index, (float)scale, loss.data_ptr<float>(),
                       want_grad ? grad.data_ptr<bf16>() : nullptr);
  else if (logits.scalar_type() == torch::kFloat32)
    cross_entropy_impl(logits.data_ptr<float>(), tp, N, V, ignore_index, (float)scale, loss.data_ptr<float>(),
                       want_grad ? grad.data_ptr<float>() : nullptr);
  else TORCH_CHECK(false, "cross_entropy_rows: dtype must be bfloat16 or float32");
  return {loss, want_grad ? grad : torch::empty({0})};
}

// Causal softmax(scale * s) of scores [..., S, L], float32 math, result in s's dtype.
torch::Tensor causal_softmax_fwd(torch::Tensor s, double scale) {
  TORCH_CHECK(s.dim() >= 2 && s.is_contiguous() && s.size(-1) >= s.size(-2), "causal_softmax_fwd: contiguous [..., S, L>=S]");
  const int64_t S = s.size(-2), L = s.size(-1), R = s.numel() / (S * L);
  auto p = torch::empty_like(s);
  if (s.scalar_type() == torch::kBFloat16) causal_softmax_fwd_impl(s.data_ptr<bf16>(), p.data_ptr<bf16>(), R, S, L, (float)scale);
  else if (s.scalar_type() == torch::kFloat32) causal_softmax_fwd_impl(s.data_ptr<float>(), p.data_ptr<float>(), R, S, L, (float)scale);
  else TORCH_CHECK(false, "causal_softmax_fwd: dtype must be bfloat16 or float32");
  return p;
}

// Gradient of causal_softmax_fwd with respect to its scores, from its output p and the gradient dp.
torch::Tensor causal_softmax_bwd(torch::Tensor p, torch::Tensor dp, double scale) {
  TORCH_CHECK(p.is_contiguous() && dp.is_contiguous() && p.sizes() == dp.sizes(), "causal_softmax_bwd: matching contiguous p, dp");
  const int64_t S = p.size(-2), L = p.size(-1), R = p.numel() / (S * L);
  auto ds = torch::empty_like(p);
  auto run = [&](auto* pp, auto* op) {
    if (dp.scalar_type() == torch::kBFloat16) causal_softmax_bwd_impl(pp, dp.data_ptr<bf16>(), op, R, S, L, (float)scale);
    else if (dp.scalar_type() == torch::kFloat32) causal_softmax_bwd_impl(pp, dp.data_ptr<float>(), op, R, S, L, (float)scale);
    else TORCH_CHECK(false, "causal_softmax_bwd: dp dtype must be bfloat16 or float32");
  };
  if (p.scalar_type() == torch::kBFloat16) run(p.data_ptr<bf16>(), ds.data_ptr<bf16>());
  else if (p.scalar_type() == torch::kFloat32) run(p.data_ptr<float>(), ds.data_ptr<float>());
  else TORCH_CHECK(false, "causal_softmax_bwd: dtype must be bfloat16 or float32");
  return ds;
}

// Rotary embedding of x [N, P, d] (stride(0) = C, heads contiguous) with float32 cos/sin [N, d];
// sign -1 rotates back (the gradient). Returns a contiguous [N, P, d] in x's dtype.
torch::Tensor rope_rows(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, double sign) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "rope_rows: x [N, P, d] with contiguous heads and even d expected");
  const int64_t N = x.size(0), P = x.size(1), d = x.size(2);
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == N * d && sin.numel() == N * d, "rope_rows: float32 cos/sin [N, d] expected");
  auto y = torch::empty({N, P, d}, x.options());
  if (x.scalar_type() == torch::kBFloat16)
    rope_impl(x.data_ptr<bf16>(), x.stride(0), cos.data_ptr<float>(), sin.data_ptr<float>(), y.data_ptr<bf16>(), N, P, d, (float)sign);
  else if (x.scalar_type() == torch::kFloat32)
    rope_impl(x.data_ptr<float>(), x.stride(0), cos.data_ptr<float>(), sin.data_ptr<float>(), y.data_ptr<float>(), N, P, d, (float)sign);
  else TORCH_CHECK(false, "rope_rows: dtype must be bfloat16 or float32");
  return y;
}

// ---- MoE training: gather backward / combine forward, combine backward, SwiGLU backward ----

namespace {

// out[t] = (ACC ? out[t] : 0) + sum_k scale[s] * y[s] over s = inv[t * K + k] (s < 0 skipped; no
// scale = 1), float32 in registers. Threads own tokens (no write races). With ACC the terms are
// added to out[t] one k at a time, in order.
template <bool ACC, typename TY, typename TO>
void weighted_row_sum(const TY* yp, const int64_t* iv, const float* sc, int64_t T, int64_t K, int64_t D, TO* op) {
  at::parallel_for(0, T, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      if (t + kRowsAhead < hi)  // gathered rows: no hardware prefetcher can guess them
        for (int64_t k = 0; k < K; ++k) {
          const int64_t s = iv[(t + kRowsAhead) * K + k];
          if (s >= 0) prefetch_bytes(yp + s * D, D * (int64_t)sizeof(TY));
        }
      for (int64_t d = 0; d < D; d += VL) {
        const int m = tail(D - d);
        vf acc = ACC ? vloadn(op + t * D + d, m) : vzero();
        for (int64_t k = 0; k < K; ++k) {
          const int64_t s = iv[t * K + k];
          if (s < 0) continue;
          const vf v = vloadn(yp + s * D + d, m);
          acc = sc ? vfma(vset1(sc[s]), v, acc) : vadd(acc, v);
        }
        vstoren(op + t * D + d, acc, m);
      }
    }
  });
}

void check_rows(const torch::Tensor& inv, int64_t S, const char* name) {
  const int64_t* iv = inv.data_ptr<int64_t>();
  for (int64_t a = 0; a < inv.numel(); ++a) TORCH_CHECK(iv[a] < S, name, ": row ", iv[a], " out of range");
}

}  // namespace

// out[t] += sum_k scale[s] * y[s] with s = inv[t * K + k], skipping s < 0: the weighted combine of
// expert outputs back into token order in one pass (inference, experts left to oneDNN). y [S, D]
// bf16/fp32, inv [T*K] int64, scale [S] float32, out [T, D] float32, added to in place.
void combine_rows(torch::Tensor y, torch::Tensor inv, torch::Tensor scale, torch::Tensor out, int64_t K) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && out.is_contiguous() && inv.is_contiguous() && scale.is_contiguous(),
              "combine_rows: contiguous y [S, D], inv [T*K], scale [S], out [T, D] expected");
  TORCH_CHECK(inv.scalar_type() == torch::kInt64 && scale.scalar_type() == torch::kFloat32 &&
              out.scalar_type() == torch::kFloat32, "combine_rows: inv int64, scale and out float32");
  const int64_t S = y.size(0), D = y.size(1), T = out.size(0);
  TORCH_CHECK(out.size(1) == D && inv.numel() == T * K && scale.numel() == S, "combine_rows: shape mismatch");
  check_rows(inv, S, "combine_rows");
  const int64_t* iv = inv.data_ptr<int64_t>();
  const float* sc = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (y.scalar_type() == torch::kBFloat16) weighted_row_sum<true>(y.data_ptr<bf16>(), iv, sc, T, K, D, op);
  else if (y.scalar_type() == torch::kFloat32) weighted_row_sum<true>(y.data_ptr<float>(), iv, sc, T, K, D, op);
  else TORCH_CHECK(false, "combine_rows: dtype must be bfloat16 or float32");
}

// out[t] = sum_k scale[s] * y[s] over s = inv[t * K + k] (s < 0 skipped; no scale = 1), float32
// accumulation, in y's dtype. Combine forward (scaled) and the gather's backward (unscaled).
torch::Tensor sum_rows(torch::Tensor y, torch::Tensor inv, torch::Tensor scale, int64_t K) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && inv.is_contiguous() && inv.scalar_type() == torch::kInt64 &&
              inv.numel() % K == 0, "sum_rows: contiguous y [S, D] and int64 inv [T*K] expected");
  const bool scaled = scale.numel() > 0;
  TORCH_CHECK(!scaled || (scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == y.size(0)),
              "sum_rows: scale must be float32 [S]");
  const int64_t S = y.size(0), D = y.size(1), T = inv.numel() / K;
  check_rows(inv, S, "sum_rows");
  const int64_t* iv = inv.data_ptr<int64_t>();
  const float* sc = scaled ? scale.data_ptr<float>() : nullptr;
  auto out = torch::empty({T, D}, y.options());
  if (y.scalar_type() == torch::kBFloat16)
    weighted_row_sum<false>(y.data_ptr<bf16>(), iv, sc, T, K, D, out.data_ptr<bf16>());
  else if (y.scalar_type() == torch::kFloat32)
    weighted_row_sum<false>(y.data_ptr<float>(), iv, sc, T, K, D, out.data_ptr<float>());
  else TORCH_CHECK(false, "sum_rows: dtype must be bfloat16 or float32");
  return out;
}

// Backward of out[t] = sum_k w[s] y[s]: gy[s] = w[s] * g[tok[s]] (y's dtype) and
// gw[s] = dot(g[tok[s]], y[s]) (float32), one pass over the rows.
std::vector<torch::Tensor> combine_rows_backward(torch::Tensor g, torch::Tensor y, torch::Tensor tok, torch::Tensor w) {
  TORCH_CHECK(g.dim() == 2 && y.dim() == 2 && g.is_contiguous() && y.is_contiguous() && g.size(1) == y.size(1) &&
              g.scalar_type() == y.scalar_type(), "combine_rows_backward: contiguous g [T, D], y [S, D] of one dtype");
  TORCH_CHECK(tok.scalar_type() == torch::kInt64 && tok.is_contiguous() && tok.numel() == y.size(0) &&
              w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.numel() == y.size(0),
              "combine_rows_backward: int64 tok [S] and float32 w [S] expected");
  const int64_t S = y.size(0), D = y.size(1), T = g.size(0);
  const int64_t* tp = tok.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(tp[s] >= 0 && tp[s] < T, "combine_rows_backward: token ", tp[s], " out of range");
  const float* wp = w.data_ptr<float>();
  auto gy = torch::empty_like(y);
  auto gw = torch::empty({S}, w.options());
  float* gwp = gw.data_ptr<float>();
  auto run = [&](auto* gp, auto* yp, auto* op) {
    at::parallel_for(0, S, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t s = lo; s < hi; ++s) {
        const auto* gr = gp + tp[s] * D;
        const auto* yr = yp + s * D;
        auto* o = op + s * D;
        const vf ws = vset1(wp[s]);
        if (s + kRowsAhead < hi) {
          prefetch_bytes(gp + tp[s + kRowsAhead] * D, D * (int64_t)sizeof(*gp));
          prefetch_bytes(yr + kRowsAhead * D, D * (int64_t)sizeof(*yp));
        }
        vf dot = vzero();
        for (int64_t d = 0; d < D; d += VL) {
          const int m = tail(D - d);
          const vf gv = vloadn(gr + d, m);
          dot = vfma(gv, vloadn(yr + d, m), dot);
          vstoren(o + d, vmul(gv, ws), m);
        }
        gwp[s] = vhsum(dot);
      }
    });
  };
  if (y.scalar_type() == torch::kBFloat16) run(g.data_ptr<bf16>(), y.data_ptr<bf16>(), gy.data_ptr<bf16>());
  else if (y.scalar_type() == torch::kFloat32) run(g.data_ptr<float>(), y.data_ptr<float>(), gy.data_ptr<float>());
  else TORCH_CHECK(false, "combine_rows_backward: dtype must be bfloat16 or float32");
  return {gy, gw};
}

// Backward of a = silu(h[:, :F]) * h[:, F:]: dh[:, :F] = g * u * sig * (1 + x (1 - sig)),
// dh[:, F:] = g * silu(x), with x the gate, u the up half, sig = sigmoid(x); h's dtype.
torch::Tensor silu_mul_backward(torch::Tensor h, torch::Tensor g) {
  TORCH_CHECK(h.dim() == 2 && g.dim() == 2 && h.is_contiguous() && g.is_contiguous() && h.size(0) == g.size(0) &&
              h.size(1) == 2 * g.size(1) && h.scalar_type() == g.scalar_type(),
              "silu_mul_backward: contiguous h [S, 2F] and g [S, F] of one dtype expected");
  const int64_t S = h.size(0), F = g.size(1);
  auto dh = torch::empty_like(h);
  auto run = [&](auto* hp, auto* gp, auto* op) {
    at::parallel_for(0, S, 16, [&](int64_t lo, int64_t hi) {
      const vf one = vset1(1.0f);
      for (int64_t s = lo; s < hi; ++s) {
        const auto* xr = hp + s * 2 * F;
        const auto* gr = gp + s * F;
        auto* o = op + s * 2 * F;
        for (int64_t i = 0; i < F; i += VL) {
          const int m = tail(F - i);
          if (s + kRowsAhead < hi) {  // three streams: the hardware prefetchers alone fall behind
            _mm_prefetch((const char*)(xr + kRowsAhead * 2 * F + i), _MM_HINT_T0);
            _mm_prefetch((const char*)(xr + kRowsAhead * 2 * F + F + i), _MM_HINT_T0);
            _mm_prefetch((const char*)(gr + kRowsAhead * F + i), _MM_HINT_T0);
          }
          const vf x = vloadn(xr + i, m), u = vloadn(xr + F + i, m), gv = vloadn(gr + i, m);
          const vf sig = vdiv(one, vadd(one, vexp(vsub(vzero(), x))));
          const vf dsilu = vmul(sig, vfma(x, vsub(one, sig), one));
          vstoren(o + i, vmul(vmul(gv, u), dsilu), m);
          vstoren(o + F + i, vmul(gv, vmul(x, sig)), m);
        }
      }
    });
  };
  if (h.scalar_type() == torch::kBFloat16) run(h.data_ptr<bf16>(), g.data_ptr<bf16>(), dh.data_ptr<bf16>());
  else if (h.scalar_type() == torch::kFloat32) run(h.data_ptr<float>(), g.data_ptr<float>(), dh.data_ptr<float>());
  else TORCH_CHECK(false, "silu_mul_backward: dtype must be bfloat16 or float32");
  return dh;
}

// ---- RMSNorm (float32 rows) for training: one pass forward, one backward ----

// y[r] = w * x[r] * rstd[r], rstd[r] = 1 / sqrt(mean(x[r]^2) + eps). Returns {y, rstd}.
std::vector<torch::Tensor> rms_norm_fwd(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32 && w.is_contiguous() &&
              w.scalar_type() == torch::kFloat32 && w.numel() == x.size(1), "rms_norm_fwd: float32 x [N, D], w [D]");
  const int64_t N = x.size(0), D = x.size(1);
  auto y = torch::empty_like(x);
  auto rstd = torch::empty({N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = xp + r * D;
      if (r + kRowsAhead < hi) prefetch_bytes(xr + kRowsAhead * D, D * 4);
      vf ss = vzero();
      for (int64_t d = 0; d < D; d += VL) {
        const vf v = vloadn(xr + d, tail(D - d));
        ss = vfma(v, v, ss);
      }
      const float rs = 1.0f / std::sqrt(vhsum(ss) / (float)D + (float)eps);
      rp[r] = rs;
      const vf vr = vset1(rs);
      for (int64_t d = 0; d < D; d += VL) {
        const int m = tail(D - d);
        vstoren(yp + r * D + d, vmul(vloadn(wp + d, m), vmul(vloadn(xr + d, m), vr)), m);
      }
    }
  });
  return {y, rstd};
}

// Gradients of rms_norm_fwd: dx = rstd * (w g - x rstd^2 mean(w g x)), dw = sum over rows of
// g x rstd (per-thread partial sums, added at the end). Returns {dx, dw}.
std::vector<torch::Tensor> rms_norm_bwd(torch::Tensor g, torch::Tensor x, torch::Tensor w, torch::Tensor rstd) {
  TORCH_CHECK(g.sizes() == x.sizes() && g.is_contiguous() && g.scalar_type() == torch::kFloat32,
              "rms_norm_bwd: float32 g matching x");
  const int64_t N = x.size(0), D = x.size(1);
  auto dx = torch::empty_like(x);
  const int nt = at::get_num_threads();
  auto part = torch::zeros({nt, D}, x.options());
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* pp = part.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    float* dw = pp + at::get_thread_num() * D;
    for (int64_t r = lo; r < hi; ++r) {
      const float *gr = gp + r * D, *xr = xp + r * D;
      if (r + kRowsAhead < hi) {
        prefetch_bytes(gr + kRowsAhead * D, D * 4);
        prefetch_bytes(xr + kRowsAhead * D, D * 4);
      }
      const float rs = rp[r];
      vf dot = vzero();
      for (int64_t d = 0; d < D; d += VL) {
        const int m = tail(D - d);
        dot = vfma(vmul(vloadn(wp + d, m), vloadn(gr + d, m)), vloadn(xr + d, m), dot);
      }
      const vf c = vset1(vhsum(dot) / (float)D * rs * rs), vr = vset1(rs);
      for (int64_t d = 0; d < D; d += VL) {
        const int m = tail(D - d);
        const vf gv = vloadn(gr + d, m), xv = vloadn(xr + d, m);
        vstoren(dxp + r * D + d, vmul(vr, vfnma(xv, c, vmul(vloadn(wp + d, m), gv))), m);
        vstoren(dw + d, vfma(vmul(gv, xv), vr, vloadn(dw + d, m)), m);
      }
    }
  });
  return {dx, part.sum(0)};
}
