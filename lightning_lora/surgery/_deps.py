"""Optional dependencies, checked in one place.

Each helper imports the package inside the function so that ``import lightning_lora`` stays light.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_INSTALL_HINTS = {
    "bitsandbytes": "pip install 'lightning-lora[qlora]'  (or: pip install bitsandbytes)",
    "peft": "pip install peft",
    "gguf": "pip install gguf",
}


def require(package: str) -> ModuleType:
    """Import an optional dependency or raise ``ModuleNotFoundError`` with the exact install line.

    Args:
        package: The importable name, e.g. ``"bitsandbytes"``.

    Raises:
        ModuleNotFoundError: If the package is not installed.
    """
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as err:
        hint = _INSTALL_HINTS.get(package, f"pip install {package}")
        raise ModuleNotFoundError(f"This feature needs the optional package {package!r}. Install it with: {hint}") from err
