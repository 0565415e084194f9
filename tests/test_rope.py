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
