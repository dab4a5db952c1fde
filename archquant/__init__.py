"""archquant: post-training quantization for Mamba, diffusion transformers and VGGT.

Sub-packages installed from the repository's top-level folders: ``archquant.models``
(``models/``) and ``archquant.eval`` (``eval/``); ``archquant.kernels`` is ``archquant/kernels/``
(a top-level ``kernels/`` would shadow Hugging Face's ``kernels`` package when run from the root).
"""
from .api import load_quantized, quantize_, save_quantized
from .core import (ActQuantizer, LinearGroup, ModelStructure, OnlineHadamard, QuantLinear, QuantSpec, Quantize,
                   QuantizeWeights, Recipe, RotateResidual, SmoothQuant)
from .core.presets import RecipeOptions
from .core.safe_io import OutputExistsError
from .core.serialization import CheckpointError

__version__ = "0.1.0"
__all__ = ["quantize_", "save_quantized", "load_quantized", "Recipe", "RecipeOptions", "QuantSpec", "Quantize", "QuantizeWeights",
           "SmoothQuant", "RotateResidual", "OnlineHadamard", "QuantLinear", "ActQuantizer", "ModelStructure",
           "LinearGroup", "CheckpointError", "OutputExistsError"]
