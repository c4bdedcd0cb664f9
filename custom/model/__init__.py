"""The model: attention network F and scale classifier G (networks), their losses, mixed
precision, and the shipped model file (checkpoint)."""

from . import checkpoint, losses, networks, precision

__all__ = ["checkpoint", "losses", "networks", "precision"]
