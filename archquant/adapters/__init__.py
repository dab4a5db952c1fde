"""Family adapters. Families register lazily: ``get_adapter("mamba")`` imports the Mamba adapter
(and its model code) the first time it is asked for (``base.FAMILY_MODULES``)."""
from .base import FAMILY_MODULES, FamilyAdapter, adapter_for, families, get_adapter, register_adapter, register_family

__all__ = ["FAMILY_MODULES", "FamilyAdapter", "adapter_for", "families", "get_adapter", "register_adapter",
           "register_family"]
