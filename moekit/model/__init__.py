"""Decoder LMs built from the MoE layer (or dense FFNs)."""

from moekit.model.attention import Attention, KVCache, RMSNorm
from moekit.model.params import ParamCount, count_params, dense_equivalent
from moekit.model.transformer import Block, ModelOutput, Transformer, build_model

__all__ = ["Attention", "Block", "KVCache", "ModelOutput", "ParamCount", "RMSNorm", "Transformer", "build_model",
           "count_params", "dense_equivalent"]
