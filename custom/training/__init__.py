"""The self-supervised training workflow: multi-magnification tiles (tiles), the iteration run by
MONAI's SupervisedTrainer (engine) and its Ignite handlers (handlers)."""

from . import engine, handlers, tiles

__all__ = ["engine", "handlers", "tiles"]
