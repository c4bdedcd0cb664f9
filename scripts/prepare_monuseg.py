"""Prepare MoNuSeg in the project's layout (images/*.png, labels/*.png, splits.json).

From the official archive extracted by hand (any nesting of ``*.tif`` + ``*.xml``)::

    python scripts/prepare_monuseg.py --raw_dir "/path/to/MoNuSeg 2018 Training Data" --out_dir data/monuseg

Or download it (needs internet; Google Drive through gdown) and convert::

    python scripts/prepare_monuseg.py --out_dir data/monuseg --download

Run from the repository root. Errors are printed on stderr with a non-zero exit status.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

from custom.command_line import flag
from custom.data.monuseg import ensure_monuseg, has_prepared_data, prepare_monuseg


def prepare(out_dir: str, raw_dir: str | None = None, download: bool = False, archive: str = "train") -> None:
    """Convert (``--raw_dir``) or download and convert (``--download``) MoNuSeg into ``out_dir``.

    Parameters
    ----------
    out_dir : str
        Destination folder of the prepared layout.
    raw_dir : str, optional
        The extracted official archive. Given: convert it (existing files of the same ids
        in ``out_dir`` are replaced).
    download : bool
        Without ``raw_dir``: download the official archive into ``out_dir/raw`` and convert
        it, unless ``out_dir`` already holds prepared data.
    archive : {"train", "test"}
        Which official archive ``--download`` fetches.
    """
    out = Path(str(out_dir))
    if raw_dir is not None:
        ids = prepare_monuseg(Path(str(raw_dir)), out)
        print(f"prepared {len(ids)} images from {raw_dir} in {out}")
        return
    if not flag(download, "--download"):  # Fire passes --download false as the string 'false'
        raise ValueError("give --raw_dir DIR (the extracted official archive) or --download.")
    if has_prepared_data(out):
        print(f"{out} already holds prepared data (images/*.png); nothing to do.")
        return
    ensure_monuseg(out, download=True, archive=archive)
    print(f"prepared {len(list((out / 'images').glob('*.png')))} images in {out}")


def main(argv: list[str] | None = None) -> int:
    try:
        fire.Fire(prepare, command=argv)
    except Exception as e:  # noqa: BLE001 - a CLI: report the message, not a traceback
        print(f"prepare_monuseg: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
