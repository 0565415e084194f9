"""GGUF export of quantized experts: the file's blocks dequantize (with the gguf package's own
reference code) to exactly moekit's dequantized weights, and the exported model reloads to the same
logits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from moekit import build_model, get_preset, load_model  # noqa: E402
from moekit.quant import QuantError, quantize_model  # noqa: E402
from moekit.quant.gguf_export import export_quantized_gguf  # noqa: E402


def tiny_mixtral(qk_norm: bool = False):
    cfg = get_preset("tiny-mixtral").replace(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                                             max_seq_len=64, qk_norm=qk_norm)
    return build_model(cfg.replace(moe=dataclasses.replace(cfg.moe, expert_dim=64)), seed=0).eval()


@pytest.mark.parametrize("scheme,want", [("int8", "Q8_0"), ("int4", "Q4_0"), ("mxfp4", "MXFP4")])
@pytest.mark.parametrize("qk_norm", [False, True])  # llama (q/k rows permuted) and qwen3moe layouts
def test_exported_blocks_equal_moekit_weights(tmp_path, scheme, want, qk_norm):
    from gguf.quants import dequantize

    q, _ = quantize_model(tiny_mixtral(qk_norm), scheme, 32, attention="int8")
    path = export_quantized_gguf(q, tmp_path / "m.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    ex = q.layers[1].ffn.experts
    F_ = ex.hidden
    for name, ref in [("ffn_gate_exps", ex.qw13.dequantize()[:, :F_]), ("ffn_up_exps", ex.qw13.dequantize()[:, F_:]),
                      ("ffn_down_exps", ex.qw2.dequantize())]:
        t = tensors[f"blk.1.{name}.weight"]
        assert t.tensor_type.name == want
        assert np.array_equal(dequantize(t.data, t.tensor_type).reshape(ref.shape), ref.numpy())
    v = tensors["blk.0.attn_v.weight"]
    assert v.tensor_type.name == "Q8_0"
    x = torch.randint(0, 512, (1, 12))
    with torch.no_grad(), pytest.warns(UserWarning, match="tokenizer"):
        back = load_model(path)
        torch.testing.assert_close(back(x).logits, q(x).logits, rtol=1e-5, atol=1e-6)


def test_zero_point_int4_and_other_group_sizes_are_refused(tmp_path):
    q, _ = quantize_model(tiny_mixtral(), "int4", 32, zero_point=True)
    with pytest.raises(QuantError, match="no-zero-point"):
        export_quantized_gguf(q, tmp_path / "a.gguf")
    q, _ = quantize_model(tiny_mixtral(), "int8", 64)
    with pytest.raises(QuantError, match="group-size 32"):
        export_quantized_gguf(q, tmp_path / "b.gguf")
