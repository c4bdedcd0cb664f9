"""Segment nuclei in whole slides or images: the bundle's inference workflow
(``bundle/configs/inference.json``) for people who do not write configs.

Usage::

    python scripts/segment.py SLIDE_OR_FOLDER --out DIR [--model bundle/models/model.pt]
    python scripts/segment.py ../shared/data/wsi/cmu_small_region.svs --out output
    python scripts/segment.py slide_without_metadata.svs --out output --mpp 0.25
    python scripts/segment.py ../shared/data/monuseg/images --out output --base_magnification 40
    python scripts/segment.py SLIDE --out output --config bundle/configs/inference_20x.json   # faster, analysed at 20x
    python scripts/segment.py SLIDE --out output --config bundle/configs/inference_hmaxima.json  # h-maxima markers: slower, AJI +0.003

Per slide it writes ``<name>.geojson`` (QuPath: File > Import objects),
``<name>.csv``, ``<name>_overlay.png``, ``<name>.json`` (and ``<name>_instances.png``
for plain images) into ``--out``; slides whose outputs are complete are skipped
unless ``--overwrite``. Any other key of inference.json can be given too, e.g.
``--window 2048 --halo 128 --backend openslide --roi "[0, 0, 4096, 4096]"``.

Bad inputs: a file that cannot be used (missing, empty, damaged or truncated, not
the format its suffix says, an unsupported suffix, a grayscale image, a PNG/JPEG
too large to decode whole, no pixel size, ...) stops with a one-line
``segment.py: error: <path>: <what is wrong>. <what to do>`` and exit status 1,
and leaves no output for that file. In a batch (a folder, a CSV or a list) the
other slides are segmented first: each bad one is logged as an ERROR when it is
found, and the run ends with exit status 1 and the list of the bad ones (a rerun
skips the finished slides). A slide without tissue is not an error: a WARNING, empty
but valid outputs, exit status 0. RGBA, palette, CMYK and 16-bit images are
converted to 8-bit RGB with a WARNING (see ``custom/wsi/slide.py``).
"""

from __future__ import annotations

from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def segment(input: str, out: str = "segmentation", model: str | None = None, backend: str = "cucim", mpp: float | None = None,
            base_magnification: float | None = None, tta: bool = False, device: str | None = None, overwrite: bool = False,
            config: str | list[str] | None = None, **overrides) -> None:
    """Segment the nuclei of a slide, a folder of slides/images or a CSV of slide paths.

    Args:
        input: slide file (svs, tiff, ndpi, ...), image (png, jpg), folder, CSV with a ``path`` column,
            or a list of these (``'["a.svs", "b.png"]'``).
        out: output folder.
        model: attention network weights (default: the bundle's ``models/model.pt``).
        backend: "cucim" or "openslide".
        mpp: level-0 um/px for slides without that metadata (applies to all inputs).
        base_magnification: level-0 magnification instead of ``mpp`` (e.g. 40).
        tta: test-time augmentation (7 dihedral transforms): about 7x slower, and it did not pay in the measurements (docs/speed.md).
        device: "cpu", "cuda", "cuda:1", ...; default: CUDA when available.
        overwrite: recompute slides whose outputs are already complete.
        config: override file(s) merged over inference.json, e.g. ``bundle/configs/inference_20x.json``
            (analysis at 20x: about 2x faster on 40x slides, 0.004-0.009 lower AJI) or
            ``bundle/configs/inference_hmaxima.json`` (markers from the h-maxima of the distance, the set tuned
            before 0.15.0: about 1.2x slower, 0.003-0.005 higher AJI); docs/speed.md.
        **overrides: any other inference.json key (window, halo, roi, magnification, amp_dtype, num_workers, ...).
    """
    from custom.command_line import refuse_unknown_keys
    from custom.wsi.slide import list_slides

    list_slides(input)  # a missing input or an empty folder fails here, before the bundle is parsed and the model loaded
    extra = [] if config is None else [config] if isinstance(config, str) else list(config)
    missing = [str(f) for f in extra if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"--config {missing[0]}: no such file (the override files are in {REPO / 'bundle' / 'configs'}).")
    import torch
    from monai.bundle import ConfigParser, ConfigWorkflow

    config_file = [str(REPO / "bundle" / "configs" / "inference.json"), *(str(f) for f in extra)]
    for f in extra:  # an override file's keys too: a typo there would be silently ignored as well
        refuse_unknown_keys(ConfigParser.load_config_file(f), config_file[0], advice=f"(in --config {f})")
    refuse_unknown_keys(overrides, config_file)  # a typo would otherwise be silently ignored

    inputs = [str(p) for p in input] if isinstance(input, (list, tuple)) else str(input)
    settings = {"input": inputs, "output_dir": str(out), "backend": backend, "mpp": mpp, "base_magnification": base_magnification,
                "tta": tta, "overwrite": overwrite, "bundle_root": str(REPO / "bundle"), **overrides}
    if model is not None:
        settings["model_path"] = str(model)
    if device is not None:
        settings["device"] = torch.device(device)
    workflow = ConfigWorkflow(config_file=config_file, workflow_type="infer",
                              logging_file=str(REPO / "bundle" / "configs" / "logging.conf"), **settings)
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()


def error_message(e: BaseException) -> str:
    """What to tell the user about an exception the bundle may have wrapped: the first
    ``custom.wsi.slide.SlideError`` in its chain of causes (it names the input and what to do),
    else the root cause."""
    from custom.command_line import cause_chain
    from custom.wsi.slide import SlideError

    chain = cause_chain(e)
    return str(next((c for c in chain if isinstance(c, SlideError)), chain[-1]))


def main(argv: list[str] | None = None) -> None:
    """Run :func:`segment` from the command line (``argv``: the arguments, default ``sys.argv[1:]``);
    errors end with their message (see :func:`error_message`) and exit status 1."""
    from custom.command_line import run_command

    run_command(segment, "segment.py", argv, error_message)


if __name__ == "__main__":
    main()
