"""Stain normalisation of a slide's windows: each colour computed once (the colour table) against every pixel.

    python -m scripts.bench.stain ../shared/data/wsi/tcga-cr-7395-01a-01-ts1.svs --base_magnification 40
    python -m scripts.bench.stain SLIDE --repeats 3

Run it as a module from the repository root. It builds the windows and the preprocessing of
``bundle/configs/inference.json`` (read, copy, scale to [0, 1], Reinhard with the slide's statistics,
ImageNet normalisation) and reads every window of the slide through them, in this process, alternately
with the colour table (:class:`custom.transforms.ReinhardNormalize`'s lookup from a slide's second window
on; ``stain_colour_table`` true, the default) and with every pixel computed (``stain_colour_table``
false), ``repeats`` times each; each pass starts with a fresh transform. It
checks that both give the same values, then prints the seconds of each pass and a markdown row.
"""

from __future__ import annotations

import time

import fire
import numpy as np


def _pass(parser, table: bool) -> tuple[float, list[np.ndarray]]:
    """Seconds to read and preprocess every window once, and the normalised images."""
    parser["stain_colour_table"] = table
    dataset = parser.get_parsed_content("dataset", instantiate=True, lazy=False)  # a fresh transform: an empty table
    t0 = time.perf_counter()
    images = [np.asarray(dataset[i]["image"]) for i in range(len(dataset))]
    return time.perf_counter() - t0, images


def main(slide: str, base_magnification: float | None = None, mpp: float | None = None, repeats: int = 2) -> None:
    """Print the seconds of each pass (table, direct, alternated) and a markdown row.

    Args:
        slide: a slide or image file.
        base_magnification, mpp: for a slide without pixel-size metadata.
        repeats: passes of each kind.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config("bundle/configs/inference.json")
    parser.update({"bundle_root": "bundle", "input": slide, "base_magnification": base_magnification, "mpp": mpp,
                   "output_dir": "/tmp/bench_stain", "overwrite": True})
    seconds: dict[str, list[float]] = {"table": [], "direct": []}
    reference = None
    for _ in range(int(repeats)):
        for kind in ("table", "direct"):
            s, images = _pass(parser, kind == "table")
            seconds[kind].append(s)
            if reference is None:
                reference = images
            elif not all(np.array_equal(a, b) for a, b in zip(reference, images)):
                raise SystemExit(f"the {kind} pass gave other values than the first pass")
            print(f"{kind}: {s:.2f} s for {len(images)} windows", flush=True)
    print("\n| windows | colour table, s | every pixel, s | same values |\n| --- | --- | --- | --- |")
    print(f"| {len(reference)} | {', '.join(f'{s:.1f}' for s in seconds['table'])} | "
          f"{', '.join(f'{s:.1f}' for s in seconds['direct'])} | yes |")


if __name__ == "__main__":
    fire.Fire(main)
