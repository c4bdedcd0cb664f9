"""Output files that are whole or absent: a crash or a bad input never leaves a half-written file
that looks complete. Standard library only, so that light scripts (the table script) load fast."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ['write_atomic']


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a half file.

    Args:
        path: the file to create or replace; its folder is created if missing.
        write: a callable taking the temporary path (``path`` + ".tmp", same folder) and writing it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
