"""Family adapters. Importing this package registers every family."""
from .base import FamilyAdapter, adapter_for, families, get_adapter, register_adapter
from . import mamba, toy  # noqa: F401  (registers the families)

__all__ = ["FamilyAdapter", "adapter_for", "families", "get_adapter", "register_adapter"]
