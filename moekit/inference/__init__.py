"""Inference: batched generation over a preallocated KV cache, sampling, `moekit generate`."""

from moekit.inference.engine import ContextLengthError, Engine, Generation, GenerationStats, generate
from moekit.inference.sampling import SamplingError, SamplingParams, sample

__all__ = ["ContextLengthError", "Engine", "Generation", "GenerationStats", "SamplingError", "SamplingParams",
           "generate", "sample"]
