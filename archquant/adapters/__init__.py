"""Family adapters. Importing this package registers every family."""
from .base import FamilyAdapter, adapter_for, families, get_adapter, register_adapter
from . import toy  # noqa: F401  (registers the family)

__all__ = ["FamilyAdapter", "adapter_for", "families", "get_adapter", "register_adapter"]
