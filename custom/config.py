"""Config values as they arrive from the command line.

``python -m monai.bundle run ... --tta false`` hands the config the *string*
``"false"`` (Fire converts only ``False``), and ``bool("false")`` is True. Every
boolean setting therefore goes through :func:`flag`.
"""

from __future__ import annotations

__all__ = ["flag"]

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0", "none", "")


def flag(value, name: str = "value") -> bool:
    """``value`` as a bool: bools, 0/1, None (False) and the strings true/false, yes/no,
    on/off, 1/0 in any case. Anything else raises a ValueError naming ``name``."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}.")
