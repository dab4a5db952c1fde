"""The family-agnostic core: formats, observers, transforms, quantized modules, calibration, recipes.

Nothing in here imports a model family, the runner, ``eval`` or ``kernels``.
"""
from .formats import QuantSpec, dequantize, fake_quantize, quantize, register_format
from . import twinlog  # registers the "twinlog" format and its "twinlog_mse" observer
from .modules import ActQuantizer, QuantConv1d, QuantLinear, QuantMatmul
from .recipe import OnlineHadamard, Quantize, QuantizeWeights, Recipe, RotateResidual, SmoothQuant, apply_recipe
from .structure import LinearGroup, ModelStructure
from . import ars  # registers the AdaptiveRotation step and the duquant / chain online transforms

__all__ = ["QuantSpec", "quantize", "dequantize", "fake_quantize", "register_format", "ActQuantizer",
           "QuantLinear", "QuantConv1d", "QuantMatmul", "Recipe", "SmoothQuant", "RotateResidual",
           "OnlineHadamard", "Quantize", "QuantizeWeights", "apply_recipe", "LinearGroup", "ModelStructure"]
