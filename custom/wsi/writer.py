"""Whole-slide inference outputs: an Ignite handler that turns window attention
maps into stitched nuclei and writes, per slide::

    <name>.geojson          nucleus polygons, level-0 pixel coordinates (QuPath: File > Import objects)
    <name>.csv              one row per nucleus: id, centroid, area (um^2), perimeter (um), eccentricity, mean hematoxylin
    <name>_overlay.png      downsampled picture with nucleus outlines
    <name>_instances.png    labelled instance map (plain-image inputs only; uint16 PNG, or .tiff int32 above 65535 nuclei)
    <name>.json             run summary (slide, magnification, tissue area, nuclei, seconds, settings), written LAST

A slide's ``seconds`` count from the start of the inference run (the first slide) or the end
of the previous slide, so they include reading and inferring its first window, and the slides'
seconds add up to the run's; the progress bar of a slide opens at the same moment. Windows are
post-processed in worker processes (``workers``) while the network infers the next ones, so a
slide ends, and the next one's bar opens, while the network already works on that next slide.

Every file is written under a temporary name and renamed when complete; the
summary comes last and lists the others, so a slide counts as done only when its
summary exists and every file it lists is there (:func:`complete_slides`).

A slide without tissue gets empty but valid outputs (a FeatureCollection without
features, a CSV with its header only, the overlay and the summary with the
warning). A slide that could not be used (``"error"`` in its ``slides_info``
entry, see :mod:`custom.wsi.datasets`) gets no file at all; after the run
:meth:`SlideNucleiWriter.finish_empty_slides` raises a
:class:`custom.wsi.slide.SlideError` listing those slides, once the others are written.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
import uuid
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image, ImageDraw
from tqdm import tqdm

from custom.atomic_write import write_atomic
from custom.evaluation.reports import OUTLINE_WIDTH, engine_items
from custom.inference.inferer import AUTO, cpu_cores
from custom.inference.postprocess import attention_to_instances, keep_centred
from custom.wsi.export import (
    GeoJSONWriter,
    NucleusCSVWriter,
    instance_polygons,
    nucleus_feature,
    nucleus_measurements,
)
from custom.wsi.slide import Slide, SlideError

__all__ = ['SlideNucleiWriter', 'complete_slides', 'slide_outputs', 'window_nuclei']


logger = logging.getLogger(__name__)

# zlib level 1: the same pixels as Pillow's default level 6, encoded several times faster, in somewhat larger files
PNG_OPTIONS = {"compress_level": 1}


def slide_outputs(output_dir: str | Path, name: str, is_image: bool) -> dict[str, Path]:
    """Paths of a slide's outputs (see the module docstring)."""
    out = Path(output_dir)
    paths = {"geojson": out / f"{name}.geojson", "csv": out / f"{name}.csv", "overlay": out / f"{name}_overlay.png",
             "summary": out / f"{name}.json"}
    if is_image:
        paths["instances"] = out / f"{name}_instances.png"
    return paths


def complete_slides(output_dir: str | Path) -> list[str]:
    """Names of the slides whose outputs in ``output_dir`` are complete: a readable summary
    whose listed files all exist (a rerun skips them)."""
    out = Path(output_dir)
    done = []
    if not out.is_dir():
        return done
    for summary in sorted(out.glob("*.json")):
        try:
            info = json.loads(summary.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(info, dict) or "outputs" not in info or "slide" not in info:
            continue
        if all((out / f).is_file() for f in info["outputs"].values()):
            done.append(str(info["slide"]))
    return done


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def window_nuclei(attention: np.ndarray, rgb: np.ndarray, postprocess: dict, core: tuple[int, int, int, int], max_size: int,
                  origin: tuple[int, int], scale: float, tolerance: float, mpp: float) -> tuple[np.ndarray, dict, list[dict]]:
    """The nuclei of one window: instances of its attention (``(h, w)``, the window's valid box), those centred
    in ``core`` (:func:`custom.inference.postprocess.keep_centred`), their polygons in level-0 pixels and their
    measurements (``rgb``: ``(h, w, 3)`` uint8). A pure function: :class:`SlideNucleiWriter` runs it in worker
    processes. Returns ``(labels, polygons, measurements)``."""
    labels = keep_centred(attention_to_instances(attention, **postprocess), core, max_size)
    if not labels.max(initial=0):
        return labels, {}, []
    polygons = instance_polygons(labels, offset=origin, scale=scale, tolerance=tolerance)
    return labels, polygons, nucleus_measurements(labels, rgb, mpp)


def _resolved(value) -> Future:
    """A finished future holding ``value`` (the in-process path shares the worker path's queue)."""
    future: Future = Future()
    future.set_result(value)
    return future


class _SlideRun:
    """Open outputs of one slide while its windows arrive."""

    def __init__(self, info: dict, output_dir: Path, overlay_size: int, t0: float, progress: tqdm | None = None):
        self.info = info
        self.paths = slide_outputs(output_dir, info["name"], info["is_image"])
        self.t0 = t0  # the run's start or the end of the previous slide: before this slide's first window was read
        self.progress = progress
        self.geojson = GeoJSONWriter(self.paths["geojson"])
        self.csv = NucleusCSVWriter(self.paths["csv"])
        backend = info["backend"] if info["backend"] in ("cucim", "openslide") else "cucim"  # Pillow/tifffile files open the same way
        with Slide(info["path"], backend, mpp=info["mpp"]) as slide:
            self.thumb, self.thumb_factor = slide.thumbnail(overlay_size)
        self.overlay = Image.fromarray(self.thumb)
        self.draw = ImageDraw.Draw(self.overlay)
        self.canvas = np.zeros(info["analysis_shape"], np.int32) if info["is_image"] else None
        self.windows_done = 0
        self.next_id = 1

    def abort(self) -> None:
        self.geojson.abort()
        self.csv.abort()
        if self.progress is not None:
            self.progress.close()


class SlideNucleiWriter:
    """Ignite handler for whole-slide inference (items of :class:`custom.wsi.datasets.SlideWindowDataset`).

    For each window: the attention inside the window's valid box (core + halo) is
    turned into instances (:func:`custom.inference.postprocess.attention_to_instances`), the
    instances centred in the core are kept (:func:`custom.inference.postprocess.keep_centred`),
    and their polygons, measurements and outlines are appended to the slide's outputs.
    When a slide's last window is done its files are closed and renamed and its
    summary written. Slides without tissue get empty but valid outputs at the start.
    On an exception the open slide's temporary files are deleted. Slides that could not
    be used (``"error"`` in their ``slides_info``) get no outputs, and
    :meth:`finish_empty_slides`, the last step of the run, raises for them.

    Args:
        output_dir: folder for the outputs.
        slides_info: ``SlideWindowDataset.slides_info``.
        postprocess: keyword arguments of :func:`attention_to_instances` (threshold, morphology_radii, ...).
        settings: extra JSON-serialisable entries for every summary (model, TTA, ...).
        max_nucleus_um2: instances larger than this area are dropped (0: no limit; see
            :func:`custom.inference.postprocess.keep_centred`).
        polygon_tolerance: outline simplification in analysis pixels (Douglas-Peucker; 0: exact pixel edges).
        overlay_size: long side of the overlay picture in pixels.
        image_key, pred_key: batch key of the unnormalised RGB window (uint8 ``(3, h, w)``), output key of the attention.
        progress: show a progress bar per slide, opened before its first window is read.
        workers: processes that post-process windows (:func:`window_nuclei`) while the network infers the
            next ones (inference.json's ``postprocess_workers``); 0: in this process, one window after the other;
            ``"auto"``: one per core of this process (:func:`custom.inference.inferer.cpu_cores`). The
            post-processing costs about 10x the compact network per window on a CPU, so it gets the cores:
            on 2 cores, 2 workers made the window loop about 1.45x faster than none (docs/speed.md).
            The outputs are the same either way: windows are added to their slides in the order they came.
    """

    def __init__(self, output_dir: str, slides_info: list[dict], postprocess: dict | None = None, settings: dict | None = None,
                 max_nucleus_um2: float = 0.0, polygon_tolerance: float = 1.0, overlay_size: int = 2048, image_key: str = "rgb", pred_key: str = "pred",
                 progress: bool = True, workers: int | str = AUTO):
        if workers == AUTO:
            workers = cpu_cores()
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
            raise ValueError(f"postprocess_workers must be {AUTO!r} or an integer >= 0, got {workers!r}.")
        self.output_dir = Path(output_dir)
        self.slides_info = slides_info
        self.postprocess = dict(postprocess or {})
        self.settings = dict(settings or {})
        self.max_nucleus_um2 = float(max_nucleus_um2)
        self.polygon_tolerance = float(polygon_tolerance)
        self.overlay_size = int(overlay_size)
        self.image_key, self.pred_key, self.progress = image_key, pred_key, progress
        self.runs: dict[int, _SlideRun] = {}
        self.finished: list[str] = []
        self._clock: float | None = None  # start of the next slide's time: the run's start, then each slide's end
        self._bars: dict[int, tqdm] = {}  # progress bars opened before their slide's first window arrives
        self.workers = int(workers)
        self._pool: ProcessPoolExecutor | None = None  # post-processing of window k while the network infers window k + 1
        self._pending: deque = deque()  # (slide, window, origin, future) in arrival order

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._complete)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._exception)
        engine.add_event_handler(Events.TERMINATE, self._abort)

    def _run(self, si: int) -> _SlideRun:
        if si not in self.runs:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            t0 = self._clock if self._clock is not None else time.perf_counter()
            info = self.slides_info[si]
            bar = self._bars.pop(si) if si in self._bars else self._open_bar(info)
            try:
                self.runs[si] = _SlideRun(info, self.output_dir, self.overlay_size, t0, bar)
            except BaseException:
                if bar is not None:
                    bar.close()
                raise
        return self.runs[si]

    def _open_bar(self, info: dict) -> tqdm | None:
        if not self.progress or not info["num_windows"]:
            return None
        return tqdm(total=info["num_windows"], desc=info["name"], unit="window", leave=True)

    def _open_next_bar(self) -> None:
        """Open the progress bar of the next slide to be segmented (windows come slide by slide,
        in order), so that it shows before that slide's first window is read and inferred."""
        if not self.progress:
            return
        done = set(self.finished)
        pending = [info for info in self.slides_info if info["num_windows"] and "error" not in info and info["name"] not in done
                   and info["index"] not in self.runs]
        if pending and pending[0]["index"] not in self._bars:
            self._bars[pending[0]["index"]] = self._open_bar(pending[0])

    def _start(self, engine: Engine) -> None:
        if self.workers and self._pool is None:
            if "fork" in multiprocessing.get_all_start_methods():  # forked: the workers inherit the imported modules
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
            else:
                logger.info("post-processing in this process: this platform cannot fork worker processes")
        self._write_empty_slides()
        self._clock = time.perf_counter()  # the slides' time starts with the run, before the first window is read
        self._open_next_bar()

    def _write_empty_slides(self) -> None:
        for info in self.slides_info:
            if info["num_windows"] == 0 and "error" not in info and info["name"] not in self.finished:
                self._finish(self._run(info["index"]))

    def finish_empty_slides(self) -> None:
        """Write the (empty, valid) outputs of slides without tissue windows, once, then
        raise for the slides that could not be used. Called when the engine starts (the
        outputs only) and after the run (inference.json's last step): an engine whose
        loader is empty (every slide blank) does not start at all.

        Raises:
            SlideError listing the slides with an ``"error"`` in ``slides_info``, after the
            outputs of the others are written.
        """
        self._write_empty_slides()
        failed = [info for info in self.slides_info if "error" in info]
        if failed:
            done = len(self.slides_info) - len(failed)
            raise SlideError(f"{len(failed)} of {len(self.slides_info)} slides could not be segmented (the outputs of the other {done} are "
                             f"written):\n" + "\n".join(f"  {info['error']}" for info in failed))

    def __call__(self, engine: Engine) -> None:
        for item, out in engine_items(engine):
            si, wi = int(_np(item["slide"])), int(_np(item["window"]))
            info = self.slides_info[si]
            attention = _np(out[self.pred_key]).astype(np.float32)
            attention = attention[0] if attention.ndim == 3 else attention
            vy0, vx0, vy1, vx1 = (int(v) for v in _np(item["valid"]))
            cy0, cx0, cy1, cx1 = (int(v) for v in _np(item["core"]))
            by, bx = (int(v) for v in _np(item["box"])[:2])
            rgb = np.moveaxis(_np(item[self.image_key]), 0, -1)[vy0:vy1, vx0:vx1].astype(np.uint8)
            origin = (by + vy0, bx + vx0)
            args = (np.ascontiguousarray(attention[vy0:vy1, vx0:vx1]), np.ascontiguousarray(rgb), self.postprocess,
                    (cy0 - vy0, cx0 - vx0, cy1 - vy0, cx1 - vx0), int(self.max_nucleus_um2 / info["analysis_mpp"] ** 2),
                    origin, info["scale_to_level0"], self.polygon_tolerance, info["analysis_mpp"])
            if self._pool is None:
                self._pending.append((si, wi, origin, _resolved(window_nuclei(*args))))
            else:
                self._pending.append((si, wi, origin, self._pool.submit(window_nuclei, *args)))
            self._drain(wait=len(self._pending) > self.workers)

    def _drain(self, wait: bool) -> None:
        """Add the finished windows to their slides, in the order they came; with ``wait``, wait for the oldest."""
        while self._pending and (self._pending[0][3].done() or wait):
            si, wi, origin, future = self._pending.popleft()
            wait = False
            labels, polygons, measured = future.result()
            run = self._run(si)
            self._add_nuclei(run, labels, polygons, measured, origin)
            run.windows_done += 1
            if run.progress is not None:
                run.progress.update(1)
            if run.windows_done == run.info["num_windows"]:
                self._finish(run)
            elif wi + 1 == run.info["num_windows"] and run.windows_done != run.info["num_windows"]:
                raise RuntimeError(f"{run.info['path']}: its last window arrived after {run.windows_done} of {run.info['num_windows']}; "
                                   "windows must come in order (shuffle off).")

    def _add_nuclei(self, run: _SlideRun, labels: np.ndarray, polygons: dict, measured: list[dict], origin: tuple[int, int]) -> None:
        """Append the instances of one window (:func:`window_nuclei`'s results; origin: its (y, x) in analysis pixels)."""
        n = int(labels.max(initial=0))
        if n == 0:
            return
        f = run.info["scale_to_level0"]
        ids = np.zeros(n + 1, np.int32)  # window label -> nucleus id (0: not written)
        for row in measured:
            lab = row["label"]
            if lab not in polygons:
                continue
            nid = run.next_id
            run.next_id += 1
            cx, cy = (row["centroid_x"] + origin[1] + 0.5) * f, (row["centroid_y"] + origin[0] + 0.5) * f
            values = {k: row[k] for k in ("area_um2", "perimeter_um", "eccentricity", "mean_hematoxylin")}
            feature = nucleus_feature(polygons[lab], values, object_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{run.info['path']}#{nid}")))
            feature["properties"]["name"] = str(nid)  # the row id in <name>.csv
            run.geojson.add(feature)
            run.csv.add(nid, cx, cy, values)
            ring = np.asarray(polygons[lab], dtype=np.float64) / run.thumb_factor
            run.draw.line([tuple(p) for p in ring], fill=(255, 230, 0), width=OUTLINE_WIDTH, joint="curve")
            ids[lab] = nid
        if run.canvas is not None:
            y0, x0 = origin
            sub = run.canvas[y0 : y0 + labels.shape[0], x0 : x0 + labels.shape[1]]
            written = ids[labels]
            sub[written > 0] = written[written > 0]  # one pass over the window, not one per nucleus

    def _finish(self, run: _SlideRun) -> None:
        info = run.info
        try:
            run.geojson.close()
            run.csv.close()
            write_atomic(run.paths["overlay"], lambda tmp: run.overlay.save(tmp, format="PNG", **PNG_OPTIONS))
            if run.canvas is not None:
                if run.canvas.max(initial=0) > 65535:
                    run.paths["instances"] = run.paths["instances"].with_suffix(".tiff")
                    import tifffile

                    write_atomic(run.paths["instances"], lambda tmp: tifffile.imwrite(tmp, run.canvas))
                else:
                    write_atomic(run.paths["instances"], lambda tmp: Image.fromarray(run.canvas.astype(np.uint16)).save(tmp, format="PNG", **PNG_OPTIONS))
        except BaseException:
            run.abort()
            raise
        if run.progress is not None:
            run.progress.close()
        summary = {
            "slide": info["name"],
            "path": info["path"],
            "backend": info["backend"],
            "level0_shape": info["level0_shape"],
            "mpp": info["mpp"],
            "mpp_source": info["mpp_source"],
            "magnification": info["magnification"],
            "analysis_mpp": info["analysis_mpp"],
            "roi": info["roi"],
            "tissue_mm2": round(info["tissue_mm2"], 4),
            "windows": info["num_windows"],
            "nuclei": run.next_id - 1,
            "seconds": round(time.perf_counter() - run.t0, 2),
            "warnings": info["warnings"],
            "postprocess": {**self.postprocess, "max_nucleus_um2": self.max_nucleus_um2},
            **self.settings,
            "outputs": {k: p.name for k, p in run.paths.items() if k != "summary"},
        }
        write_atomic(run.paths["summary"], lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, default=str)))
        self.finished.append(info["name"])
        del self.runs[info["index"]]
        logger.info("%s: %d nuclei in %.1f s -> %s", info["name"], summary["nuclei"], summary["seconds"], run.paths["geojson"])
        if info["num_windows"]:  # the next slide's time and bar start now, before its first window is read
            self._clock = time.perf_counter()
            self._open_next_bar()

    def _complete(self, engine: Engine) -> None:
        try:
            while self._pending:
                self._drain(wait=True)
        finally:
            self._shutdown()
        self._close_pending_bars()
        if self.runs:
            names = [r.info["name"] for r in self.runs.values()]
            self._abort(engine)
            raise RuntimeError(f"inference ended before every window of {names} was processed; their outputs were not written.")

    def _exception(self, engine: Engine, e: BaseException) -> None:
        self._abort(engine)
        raise e  # Ignite hands exceptions to EXCEPTION_RAISED handlers instead of raising them

    def _shutdown(self) -> None:
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _abort(self, engine: Engine) -> None:
        self._shutdown()
        for run in self.runs.values():
            run.abort()
        self.runs.clear()
        self._close_pending_bars()

    def _close_pending_bars(self) -> None:
        """Close the bars opened ahead for slides whose first window never came."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
