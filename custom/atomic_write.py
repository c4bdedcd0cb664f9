"""Output files that are whole or absent: a crash or a bad input never leaves a half-written file
that looks complete. Standard library only, so that light scripts (the table script) load fast."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ['AtomicTextWriter', 'temporary_path', 'write_atomic']


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a half file.

    Args:
        path: the file to create or replace; its folder is created if missing.
        write: a callable taking the temporary path (``path`` + ".tmp", same folder) and writing it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    write(tmp)
    os.replace(tmp, path)


def temporary_path(path: str | os.PathLike) -> Path:
    """Where ``path`` is written before the rename: ``<path>.tmp`` in the same folder (same file system)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


class AtomicTextWriter:
    """A text file written in pieces (streamed): writes ``<path>.tmp``; ``close()`` renames it to
    ``path``, ``abort()`` (or an exception inside a ``with`` block) deletes it. Subclasses add a
    ``_footer`` and their own ``add`` methods writing to ``self._file``."""

    _newline: str | None = None

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.partial = temporary_path(self.path)
        self.count = 0
        self._file = open(self.partial, "w", encoding="utf-8", newline=self._newline)
        self._state = "open"

    def _check_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"{type(self).__name__} for {self.path} is {self._state}")

    def _footer(self) -> str:
        return ""

    def close(self) -> Path:
        """Finish the file, flush, fsync and rename ``<path>.tmp`` to ``path``; returns ``path``."""
        if self._state == "closed":
            return self.path
        self._check_open()
        try:
            self._file.write(self._footer())
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.partial, self.path)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Close and delete ``<path>.tmp``; ``path`` is left untouched."""
        if self._state == "closed":
            return
        self._file.close()
        self.partial.unlink(missing_ok=True)
        self._state = "aborted"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

