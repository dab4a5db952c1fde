"""The VGGT family's real-backend converters: its MLPs (aggregator blocks and the DINOv2 embedder's
alike, one ``Mlp`` class) run as row-chunked real MLPs on the CPU (``backends/mlp.py``)."""
from __future__ import annotations

from ..models.vggt.layers import Mlp
from .mlp import convert_mlp
from .real import register_real_converter


@register_real_converter(Mlp)
def _convert_vggt_mlp(mlp: Mlp, kernels: str):
    return convert_mlp(mlp, kernels)
