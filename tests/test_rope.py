"""RoPE frequencies and attention scaling equal transformers' for every scaling variant."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from moekit.model.rope import rope_init

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
     "mscale": 1.0, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: "default" if s is None else s["rope_type"] + str(s["factor"]))
def test_rope_init_matches_transformers(scaling):
    tr = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, head_dim, max_pos = 500000.0, 64, 131072
    rope_parameters = {"rope_type": "default", "rope_theta": theta}
    if scaling:
        rope_parameters.update(scaling)
    cfg = tr.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=max_pos,
                         rope_parameters=rope_parameters)
    ours, our_scale = rope_init(head_dim, theta, scaling, max_pos)
    if scaling is None:
        expected = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        assert_close(ours, expected)
        return
    theirs, their_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-9)
    assert our_scale == pytest.approx(their_scale, rel=1e-6)


def test_dynamic_rope_matches_transformers_as_the_sequence_grows():
    """Dynamic NTK scaling: the cos/sin tables equal transformers' for sequences below, at and past the
    trained length, growing as in generation (the base grows with the longest position seen), then a
    single decode position far out, then a short sequence again (back to the unscaled frequencies)."""
    tr = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from moekit.model.rope import RotaryEmbedding

    theta, head_dim, trained = 10000.0, 64, 256
    cfg = tr.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=trained,
                         rope_parameters={"rope_type": "dynamic", "rope_theta": theta, "factor": 2.0})
    theirs = LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding(head_dim, theta, {"rope_type": "dynamic", "factor": 2.0,
                                             "original_max_position_embeddings": trained}, 4 * trained)
    x = torch.zeros(1, 1, head_dim)
    cases = [torch.arange(n)[None] for n in (100, 256, 300, 700)] + [torch.tensor([[699]]), torch.tensor([[700]]),
                                                                     torch.arange(50)[None]]
    for pos in cases:
        cos, sin = ours(pos, torch.float32)
        ref_cos, ref_sin = theirs(x, pos)
        assert_close(cos, ref_cos, rtol=1e-5, atol=2e-5, msg=lambda m: f"positions up to {int(pos.max())}: {m}")
        assert_close(sin, ref_sin, rtol=1e-5, atol=2e-5)
    # Past the trained length the tables really differ from plain RoPE (the test would catch a no-op).
    plain = RotaryEmbedding(head_dim, theta, None, 4 * trained)
    pos = torch.arange(700)[None]
    assert (ours(pos, torch.float32)[0] - plain(pos, torch.float32)[0]).abs().max() > 0.1
