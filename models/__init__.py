"""Model code archquant owns, its loaders, and the committed reference models."""
from pathlib import Path

#: the committed reference models (``models/reference/<name>``; installed with the package)
REFERENCE_ROOT = Path(__file__).resolve().parent / "reference"


def reference_dir(name: str) -> Path:
    """Directory of the committed reference model ``name``."""
    return REFERENCE_ROOT / name


def existing_reference_dir(name: str) -> Path:
    """``reference_dir(name)``, refused with a one-line error naming the option when it is missing."""
    folder = reference_dir(name)
    if not folder.is_dir():
        raise FileNotFoundError(f"model.options.reference={name!r}: no reference model at {folder}")
    return folder
