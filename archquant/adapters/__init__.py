"""Family adapters. Importing this package registers every family."""
from .base import FamilyAdapter, adapter_for, families, get_adapter, register_adapter
from . import mamba, mamba_real, toy  # noqa: F401  (registers the families and their real-quant blocks)

__all__ = ["FamilyAdapter", "adapter_for", "families", "get_adapter", "register_adapter"]
