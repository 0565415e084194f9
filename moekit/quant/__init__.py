"""Weight-only quantization of MoE models: stacked experts, dense FFNs, optional attention and head.

`quantize_model(model, ...)` quantizes in memory (RTN or GPTQ, optional router calibration);
`save_quantized` / `moekit.load_model` round-trip it; `moekit quant-report`
(moekit.quant.cli.run_report) measures what it did to routing and quality. See docs/quantization.md.
"""

from moekit.quant import backend as _backend  # registers the cpu-quant expert backend
from moekit.quant.apply import quantize_rtn
from moekit.quant.calibrate import quantize_model
from moekit.quant.checkpoint import save_quantized
from moekit.quant.config import QuantConfig, QuantError
from moekit.quant.modules import (QuantizedDenseFFN, QuantizedExperts, QuantizedLinear, QuantizedTensor, pack_int4,
                                  quantized_nbytes)

__all__ = ["QuantConfig", "QuantError", "QuantizedDenseFFN", "QuantizedExperts", "QuantizedLinear",
           "QuantizedTensor", "pack_int4", "quantize_model", "quantize_rtn",
           "quantized_nbytes", "save_quantized"]
