"""Quantized modules: stacked experts, linears and dense FFNs holding packed codes and scales.

Shape legend: E experts, F expert hidden dim, D model dim, H = 2F (gated) or F, S rows grouped by
expert, N rows of one expert, O/I a matrix's output/input dims.

Compute: on CPU, calls of up to `moekit.kernels.quant.MAX_ROWS` tokens run the stacked experts in
the `cpu-quant` expert backend (moekit.quant.backend), and linears of up to `MAX_LINEAR_ROWS` rows
run in the same low-bit kernel (int8 activations x the packed codes); otherwise, and as the reference (`expert_forward`,
which the reference loop calls), each call dequantizes the weights it needs (one expert at a time)
to the activations' dtype and runs F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit import kernels
from moekit.config import GATED_ACTS
from moekit.kernels import quant as kq
from moekit.moe.experts import activate
from moekit.quant.config import QuantError
from moekit.quant import formats, kquants


class QuantizedTensor(nn.Module):
    """A float matrix (or stack of matrices) [..., O, I] stored group-wise quantized.

    Buffers (all saved): `q` int8 [..., O, I] (int8) or uint8 [..., O, I/2] (4-bit codes, two per
    byte); `scale` float16 [..., O, I/G] (uint8 E8M0 exponents for mxfp4); `zero` uint8 [..., O, I/G]
    (int4 with zero points only). q4_k (GGML Q4_K, see moekit.quant.kquants): `scale` float16
    [..., O, I/256, 2] (d, dmin) and `sub` uint8 [..., O, I/256, 12] (packed 6-bit scales and mins).
    Their dtypes never change under `.to(dtype)`: only the device follows, and `dequantize` produces
    whatever dtype the caller computes in.
    """

    keeps_storage_dtype = True
    """Dtype policies (moekit.precision.widen_compute) leave these buffers as stored."""

    def __init__(self, shape: tuple[int, ...], scheme: str, group_size: int, zero_point: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        formats.check_shape(tuple(shape), group_size, scheme=scheme)
        self.shape, self.scheme, self.group_size, self.zero_point = tuple(shape), scheme, group_size, zero_point
        *lead, O, I = shape
        n_groups = I // group_size
        if scheme == "int8":
            q = torch.empty(*lead, O, I, dtype=torch.int8, device=device)
        else:
            q = torch.empty(*lead, O, I // 2, dtype=torch.uint8, device=device)
        self.register_buffer("q", q)
        if scheme == "q4_k":  # GGML Q4_K super-blocks (moekit.quant.kquants): (d, dmin) and 6-bit sub-scales
            ns = I // kquants.QK_K
            self.register_buffer("scale", torch.empty(*lead, O, ns, 2, dtype=torch.float16, device=device))
            self.register_buffer("sub", torch.empty(*lead, O, ns, kquants.SCALE_BYTES, dtype=torch.uint8,
                                                    device=device))
        else:
            sdt = torch.uint8 if scheme == "mxfp4" else torch.float16
            self.register_buffer("scale", torch.empty(*lead, O, n_groups, dtype=sdt, device=device))
        self.register_buffer("zero", torch.empty(*lead, O, n_groups, dtype=torch.uint8, device=device)
                             if zero_point else None)

    def _apply(self, fn, recurse=True):
        # Keep the storage dtypes (a float16 scale cast to bf16 would lose bits): move devices only.
        kept = {n: b for n, b in self._buffers.items() if b is not None}
        for n in kept:
            self._buffers[n] = None
        out = super()._apply(fn, recurse)
        device = fn(torch.zeros(1, device=next(iter(kept.values())).device)).device if kept else None
        for n, b in kept.items():
            self._buffers[n] = b if b.device.type == "meta" else b.to(device)
        return out

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor, scheme: str, group_size: int, zero_point: bool = False,
                   scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> QuantizedTensor:
        """Quantize w (round to nearest), or encode w with given float32 group (scale, zero) [..., O, I/G]
        (GPTQ passes the scales it used, and values already on their grid)."""
        mod = cls(tuple(w.shape), scheme, group_size, zero_point, device="meta")
        if scheme == "q4_k":
            if scale is not None:
                raise QuantError("q4_k chooses its own super-block scales (llama.cpp's search); GPTQ cannot "
                                 "drive it: use --method rtn, or --scheme int4 with gptq")
            mod.q, mod.scale, mod.sub = kquants.quantize(w)
            return mod
        w_xNG = w.detach().float().unflatten(-1, (-1, group_size))
        if scale is None:
            scale, zero = formats.group_params(scheme, w_xNG, zero_point)
        codes = formats.to_codes(scheme, w_xNG, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1))
        mod.q = formats.stored_codes(scheme, codes.flatten(-2), zero_point).contiguous()
        mod.scale = formats.scale_to_storage(scheme, scale).contiguous()
        mod.zero = zero.to(torch.uint8).contiguous() if zero_point else None
        return mod

    def params(self, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 (scale, zero) [..., O, I/G] (of matrix `index` of the stack when given). q4_k: the
        effective (d * sc, dmin * m) per 32 inputs, value = code * scale - min (a float min, not a zero)."""
        if self.scheme == "q4_k":
            s, sub = (self.scale, self.sub) if index is None else (self.scale[index], self.sub[index])
            sc, m = kquants.unpack_scales(sub)
            return (s[..., 0:1].float() * sc.float()).flatten(-2), (s[..., 1:2].float() * m.float()).flatten(-2)
        s = self.scale if index is None else self.scale[index]
        z = None if self.zero is None else (self.zero if index is None else self.zero[index]).float()
        return formats.scale_from_storage(self.scheme, s), z

    def codes(self, index: int | None = None) -> torch.Tensor:
        q = self.q if index is None else self.q[index]
        if self.scheme == "q4_k":
            return kquants.unpack_codes(q)
        return formats.loaded_codes(self.scheme, q, self.zero_point)

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        """The float matrix (matrix `index` of the stack), computed in float32 and cast to dtype
        (the same float32 operations as `formats.from_codes`, done in place: one buffer)."""
        if self.scheme == "q4_k":
            pick = (lambda t: t) if index is None else (lambda t: t[index])
            return kquants.dequantize(pick(self.q), pick(self.scale), pick(self.sub)).to(dtype)
        s, z = self.params(index)
        c_xNG = self.codes(index).unflatten(-1, (-1, self.group_size))
        if self.scheme == "mxfp4":
            w = formats.from_codes(self.scheme, c_xNG, s.unsqueeze(-1), None)
        else:
            w = c_xNG.float()
            if z is not None:
                w.sub_(z.unsqueeze(-1))
            w.mul_(s.unsqueeze(-1))
        return w.flatten(-2).to(dtype)

    def int4pack(self, index: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Matrix `index` in the layout of torch's CPU int4 matmul (`aten._weight_int4pack_mm_for_cpu`):
        (packed weight, scales_and_zeros [I/G, O, 2] in dtype). That op computes
        w = (nibble - 8) * scale + zero, so symmetric codes (stored as code + 8) get zero 0 and
        zero-point codes get (8 - z) * scale."""
        if self.scheme == "q4_k":  # code * step - low = (code - 8) * step + (8 * step - low)
            nib = self.codes(index).to(torch.int32)
            s, low = self.params(index)
            zf = 8.0 * s - low
        else:
            # Symmetric codes are stored as code + 8, zero-point codes as they are: both are the nibbles.
            nib = formats.unpack_nibbles(self.q[index]).to(torch.int32)
            s, z = self.params(index)
            zf = torch.zeros_like(s) if z is None else (8.0 - z) * s
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib, 1)
        return packed, torch.stack([s.t(), zf.t()], -1).to(dtype).contiguous()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, scheme={self.scheme}, group_size={self.group_size}, zero_point={self.zero_point}"


class QuantizedExperts(nn.Module):
    """Drop-in for `GroupedExperts` (same interface: num_experts, dim, hidden, act, forward,
    expert_forward) with `qw13` [E, H, D] and `qw2` [E, D, F] quantized; no float expert weights.
    Optional float biases `b13` [E, H] / `b2` [E, D] and the clamped-SwiGLU constants follow
    GroupedExperts (gpt-oss)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, act: str, scheme: str, group_size: int,
                 zero_point: bool = False, device=None, bias: bool = False, alpha: float = 1.702, limit: float = 7.0):
        super().__init__()
        self.num_experts, self.dim, self.hidden, self.act = num_experts, dim, hidden, act
        self.alpha, self.limit = alpha, limit
        H = 2 * hidden if act in GATED_ACTS else hidden
        self.qw13 = QuantizedTensor((num_experts, H, dim), scheme, group_size, zero_point, device)
        self.qw2 = QuantizedTensor((num_experts, dim, hidden), scheme, group_size, zero_point, device)
        self.b13 = nn.Parameter(torch.zeros(num_experts, H, device=device), requires_grad=False) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_experts(cls, experts, scheme: str, group_size: int, zero_point: bool = False) -> QuantizedExperts:
        """Round-to-nearest quantization of a GroupedExperts."""
        return cls.from_tensors(experts.w13, experts.w2, experts.act, scheme, group_size, zero_point, like=experts)

    @classmethod
    def from_tensors(cls, w13_EHD: torch.Tensor, w2_EDF: torch.Tensor, act: str, scheme: str, group_size: int,
                     zero_point: bool = False, q13: QuantizedTensor | None = None,
                     q2: QuantizedTensor | None = None, like: nn.Module | None = None) -> QuantizedExperts:
        """`like`: the float experts these replace, whose biases (kept float) and activation
        constants carry over."""
        E, D, Fh = w2_EDF.shape
        mod = cls(E, D, Fh, act, scheme, group_size, zero_point, device="meta")
        mod.qw13 = q13 or QuantizedTensor.from_float(w13_EHD, scheme, group_size, zero_point)
        mod.qw2 = q2 or QuantizedTensor.from_float(w2_EDF, scheme, group_size, zero_point)
        if like is not None:
            mod.alpha, mod.limit = getattr(like, "alpha", mod.alpha), getattr(like, "limit", mod.limit)
            for name in ("b13", "b2"):
                b = getattr(like, name, None)
                setattr(mod, name, None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False))
        return mod

    @property
    def scheme(self) -> str:
        return self.qw13.scheme

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (w13 [H, D], w2 [D, F]) dequantized to dtype."""
        return self.qw13.dequantize(dtype, e), self.qw2.dequantize(dtype, e)

    def pack(self) -> int:
        """int4 / q4_k on CPU: keep a copy of every expert in the layout of torch's int4 matmul
        (`_weight_int4pack_mm_for_cpu`), which inference then uses instead of dequantizing (measured
        in docs/quantization.md). Returns the bytes added (about the 4-bit codes again); 0 when not
        applicable (not int4, op missing, expert dims not multiples of 16)."""
        op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
        if self.scheme not in ("int4", "q4_k") or op is None or self.qw13.q.device.type != "cpu" or self.dim % 16 \
                or self.hidden % 16:
            self._int4 = None
            return 0
        self._int4 = {}
        return sum(t.nbytes for d in (torch.float32,) for t in self._int4_for(0, d)) * self.num_experts

    def unpack(self) -> None:
        self._int4 = None

    def _int4_for(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (e, dtype)
        if key not in self._int4:
            self._int4[key] = (*self.qw13.int4pack(e, dtype), *self.qw2.int4pack(e, dtype))
        return self._int4[key]

    _int4: dict | None = None

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        if self._int4 is not None and x_ND.dtype in (torch.bfloat16, torch.float32) and not torch.is_grad_enabled():
            p13, sz13, p2, sz2 = self._int4_for(e, x_ND.dtype)
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            g = self.qw13.group_size
            h = mm(x_ND.contiguous(), p13, g, sz13)
            h = self._act(h if self.b13 is None else h + self.b13[e].to(h.dtype)).contiguous()
            y = mm(h, p2, g, sz2)
            return y if self.b2 is None else y + self.b2[e].to(y.dtype)
        w13_HD, w2_DF = self.expert_weights(e, x_ND.dtype)
        h = self._act(F.linear(x_ND, w13_HD, None if self.b13 is None else self.b13[e].to(x_ND.dtype)))
        return F.linear(h, w2_DF, None if self.b2 is None else self.b2[e].to(h.dtype))

    def _act(self, h_SH: torch.Tensor) -> torch.Tensor:
        return activate(h_SH, self.act, self.alpha, self.limit)

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # Plan: one preallocated output; per expert with rows, dequantize its two matrices (only
        # those: an expert's weights are never all materialised at once) and run its FFN.
        out_SD = x_SD.new_empty(x_SD.shape[0], self.dim)
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                out_SD[start:start + n] = self.expert_forward(e, x_SD[start:start + n])
            start += n
        return out_SD


def kernel_code(q: QuantizedTensor, x: torch.Tensor) -> int | None:
    """The low-bit kernel's scheme code when it should run `x @ q.T` now (CPU, float32 / bf16 rows,
    1..`kernels.quant.MAX_LINEAR_ROWS` of them, no autograd, a scheme it decodes, kernels built), else None."""
    if x.device.type != "cpu" or q.q.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not 0 < x.numel() // max(1, x.shape[-1]) <= kq.MAX_LINEAR_ROWS or (torch.is_grad_enabled() and x.requires_grad):
        return None
    code = kq.scheme_code(q.scheme, q.zero_point, q.group_size)
    return code if code is not None and kernels.available() else None


class QuantizedLinear(nn.Module):
    """Drop-in for a bias-optional nn.Linear whose `weight` is read directly (attention's fused
    projections, the output head): `weight` is a property that dequantizes on each access."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int, zero_point: bool = False,
                 bias: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = QuantizedTensor((out_features, in_features), scheme, group_size, zero_point, device)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.compute_dtype = dtype

    @classmethod
    def from_linear(cls, lin: nn.Linear, scheme: str, group_size: int, zero_point: bool = False,
                    qweight: QuantizedTensor | None = None) -> QuantizedLinear:
        w = lin.weight
        mod = cls(w.shape[1], w.shape[0], scheme, group_size, zero_point, bias=False, dtype=w.dtype, device="meta")
        mod.qweight = qweight or QuantizedTensor.from_float(w, scheme, group_size, zero_point)
        mod.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return mod

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        # Follow model.to(dtype) for the dequantized weight's dtype (a device move leaves it).
        self.compute_dtype = fn(torch.zeros(1, dtype=self.compute_dtype)).dtype
        return out

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = kernel_code(self.qweight, x)
        if code is not None:  # decode rows: the integer-dot kernel on the codes (moekit.kernels.quant)
            q = self.qweight
            y = kq.linear_q(x, q.q, q.scale, q.zero, code, q.group_size)
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        return F.linear(x, self.qweight.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantizedDenseFFN(nn.Module):
    """Drop-in for `DenseFFN` (dense layers, shared experts) with quantized w13 / w2."""

    def __init__(self, dim: int, hidden: int, act: str, scheme: str, group_size: int, zero_point: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.act = act
        H = 2 * hidden if act in GATED_ACTS else hidden
        self.w13 = QuantizedLinear(dim, H, scheme, group_size, zero_point, dtype=dtype, device=device)
        self.w2 = QuantizedLinear(hidden, dim, scheme, group_size, zero_point, dtype=dtype, device=device)

    @classmethod
    def from_ffn(cls, ffn, scheme: str, group_size: int, zero_point: bool = False,
                 q13: QuantizedTensor | None = None, q2: QuantizedTensor | None = None) -> QuantizedDenseFFN:
        w13, w2 = ffn.w13.weight, ffn.w2.weight
        mod = cls(w2.shape[0], w2.shape[1], ffn.act, scheme, group_size, zero_point, dtype=w13.dtype, device="meta")
        mod.w13 = QuantizedLinear.from_linear(ffn.w13, scheme, group_size, zero_point, q13)
        mod.w2 = QuantizedLinear.from_linear(ffn.w2, scheme, group_size, zero_point, q2)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(activate(self.w13(x), self.act))


def pack_int4(model: nn.Module) -> int:
    """`QuantizedExperts.pack()` on every int4 expert stack of `model`; returns the bytes added."""
    return sum(m.pack() for m in model.modules() if isinstance(m, QuantizedExperts))


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes of every quantized tensor's codes, scales and zeros in `model`."""
    return sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedTensor))

