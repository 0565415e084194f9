"""Weight-only quantization of MoE models: stacked experts, dense FFNs, optional attention and head.

`quantize_model(model, ...)` quantizes in memory (RTN or GPTQ, optional router calibration);
`save_quantized` / `moekit.load_model` round-trip it; `quant_report` measures what it did to routing
and quality. See docs/quantization.md.
"""

from moekit.quant.apply import quantize_rtn
from moekit.quant.config import QuantConfig, QuantError
from moekit.quant.modules import QuantizedDenseFFN, QuantizedExperts, QuantizedLinear, QuantizedTensor, quantized_nbytes

__all__ = ["QuantConfig", "QuantError", "QuantizedDenseFFN", "QuantizedExperts", "QuantizedLinear",
           "QuantizedTensor", "quantize_rtn", "quantized_nbytes"]
