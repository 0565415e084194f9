"""Peak memory of importing a gpt-oss checkpoint whose experts are MXFP4 (the hub layout).

    python benchmarks/gpt_oss_mxfp4_load.py [--layers 4 --dim 1024 --experts 32 --ffn 1024] [--out DIR]

Writes a random gpt-oss-shaped Hugging Face directory (bf16 attention/embeddings/router, experts as
`*_blocks` / `*_scales` uint8 like openai/gpt-oss-20b), then loads it with `moekit.load_model` in a
fresh process (`moekit.quant.memprobe`) and prints the load's peak resident memory over the file
size, with the bytes a bf16 copy of the experts would need for comparison. The weights are random
bytes (scales kept near 2^-4 so values stay finite): this measures the loader, not a model.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_checkpoint(out: Path, layers: int, dim: int, experts: int, ffn: int, vocab: int = 8192) -> int:
    """The gpt-oss HF directory; returns the number of expert weights."""
    # Plan: 1. config.json as the hub writes it (MXFP4 quantization_config); 2. one safetensors
    # file, tensor by tensor in the hub's names and shapes.
    g = torch.Generator().manual_seed(0)
    heads, kv, hd = 8, 2, dim // 8
    cfg = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": vocab, "hidden_size": dim,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": hd, "num_local_experts": experts, "num_experts_per_tok": 4,
           "sliding_window": 128, "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "mxfp4"}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))

    def bf16(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def mx(e, o, i):
        blocks = torch.randint(0, 256, (e, o, i // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(120, 124, (e, o, i // 32), dtype=torch.uint8, generator=g)
        return blocks, scales

    sd = {"model.embed_tokens.weight": bf16(vocab, dim), "lm_head.weight": bf16(vocab, dim),
          "model.norm.weight": torch.ones(dim, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
        for n, o in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
            sd[p + f"self_attn.{n}_proj.weight"], sd[p + f"self_attn.{n}_proj.bias"] = bf16(o, dim), bf16(o)
        sd[p + "self_attn.o_proj.weight"], sd[p + "self_attn.o_proj.bias"] = bf16(dim, heads * hd), bf16(dim)
        sd[p + "self_attn.sinks"] = bf16(heads)
        sd[p + "mlp.router.weight"], sd[p + "mlp.router.bias"] = bf16(experts, dim), bf16(experts)
        x = p + "mlp.experts."
        sd[x + "gate_up_proj_blocks"], sd[x + "gate_up_proj_scales"] = mx(experts, 2 * ffn, dim)
        sd[x + "down_proj_blocks"], sd[x + "down_proj_scales"] = mx(experts, dim, ffn)
        sd[x + "gate_up_proj_bias"], sd[x + "down_proj_bias"] = bf16(experts, 2 * ffn), bf16(experts, dim)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return layers * experts * 3 * dim * ffn


def main() -> None:
    from moekit.quant.memprobe import probe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None, help="keep the checkpoint here (default: a temp dir)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = a.out or Path(tmp) / "gpt-oss-mxfp4"
        n_expert = write_checkpoint(d, a.layers, a.dim, a.experts, a.ffn)
        r = probe(d)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.machine())
    r.update(expert_weights=n_expert, experts_bf16_bytes=2 * n_expert, cpu=cpu,
             shape=vars(a) | {"out": str(a.out) if a.out else None})
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
