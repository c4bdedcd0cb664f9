"""Adapt the nucleus network to your own slides, without annotating them: self-training
(``bundle/configs/selftrain.json``) on tissue tiles of your unlabeled slides or images
(``bundle/configs/adapt.json``), starting from the shipped student.

Usage::

    python scripts/adapt.py SLIDE_OR_FOLDER --out my_model.pt
    python scripts/adapt.py ../shared/data/monuseg/images --out adapted.pt --base_magnification 40 --adapt_tiles 30
    python scripts/segment.py SLIDE_OR_FOLDER --out output --model my_model.pt

``--adapt_tiles`` tissue tiles of ``--adapt_tile_size`` pixels at 40x are drawn from the slides in
turn; the teacher (stage 1, ``bundle/models/attention.pt``, or ``--teacher_path``) makes confident
pseudo-instances of them under the 8 dihedral transforms, and the student (``--model``, default the
shipped ``bundle/models/model.pt``) is fine-tuned on those with strong augmentation for
``--selftrain_epochs`` epochs. No label is read and no validation is run: the last epoch's model is
written to ``--out`` with everything the input model carried (stain target, tuned post-processing),
so ``scripts/segment.py --model`` takes it as it is. Any other key of the configs can be given too
(``--selftrain_learning_rate 2e-4``, ``--pseudo_min_agreement 0.8``, ``--device cuda``, ...).
"""

from __future__ import annotations

import shutil
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "bundle" / "configs" / name for name in ("train.json", "distill.json", "selftrain.json", "adapt.json")]


def adapt(input: str, out: str, model: str | None = None, teacher_path: str | None = None, backend: str = "cucim",
          mpp: float | None = None, base_magnification: float | None = None, work_dir: str | None = None, **overrides) -> None:
    """Fine-tune the student on unlabeled slides or images and write the adapted model.

    Args:
        input: slide file, image, folder, CSV with a ``path`` column, or a list of these.
        out: the adapted model file (``.pt``) to write.
        model: the student to start from (default: the bundle's ``models/model.pt``).
        teacher_path: the network whose confident instances are the targets (default: stage 1, ``models/attention.pt``).
        backend: "cucim" or "openslide".
        mpp: level-0 um/px for slides without that metadata (applies to all inputs).
        base_magnification: level-0 magnification instead of ``mpp`` (e.g. 40 for MoNuSeg-like PNGs).
        work_dir: where the run keeps its tile index, logs and TensorBoard events (default: ``bundle/runs/adapt``).
        **overrides: any other key of train.json, distill.json, selftrain.json or adapt.json.
    """
    from custom.atomic_write import write_atomic
    from custom.command_line import refuse_unknown_keys
    from custom.wsi.slide import list_slides

    list_slides(input)  # a missing input or an empty folder fails here, before the configs are parsed
    out_path = Path(out)
    if out_path.suffix != ".pt":
        raise ValueError(f"{out}: the adapted model is a .pt file (e.g. --out my_model.pt).")
    from monai.bundle import ConfigWorkflow

    refuse_unknown_keys(overrides, [str(c) for c in CONFIGS])
    inputs = [str(p) for p in input] if isinstance(input, (list, tuple)) else str(input)
    settings = {"slides": inputs, "wsi_backend": backend, "wsi_mpp": mpp, "wsi_base_magnification": base_magnification,
                "bundle_root": str(REPO / "bundle"), **overrides}
    if model is not None:
        settings["student_init_path"] = str(model)
    if teacher_path is not None:
        settings["teacher_path"] = str(teacher_path)
    if work_dir is not None:
        settings["output_dir"] = str(work_dir)
    workflow = ConfigWorkflow(config_file=[str(c) for c in CONFIGS], workflow_type="train", run_id="selftraining",
                              logging_file=str(REPO / "bundle" / "configs" / "logging.conf"), **settings)
    workflow.initialize()
    try:
        workflow.run()
        trained = Path(workflow.parser.get_parsed_content("model_path"))
    finally:
        workflow.finalize()
    write_atomic(out_path, lambda tmp: shutil.copyfile(trained, tmp))  # no half-written model under the final name
    print(f"adapted model: {out_path}")


def main(argv: list[str] | None = None) -> None:
    """Run :func:`adapt` from the command line; errors end with their root cause and exit status 1."""
    from custom.command_line import run_command

    run_command(adapt, "adapt.py", argv)


if __name__ == "__main__":
    main()
