"""Whole-slide benchmark on this machine: tile reads per backend, and whole-slide inference.

    python scripts/bench_wsi.py                          # 8192x8192 slide, 30 % tissue, 300 reads
    python scripts/bench_wsi.py --skip_inference         # tile reads only (about a minute)
    python scripts/bench_wsi.py --size 16384 --tissue_fraction 0.4 --reads 500 --work_dir /data/bench

It generates (once, cached in ``--work_dir``) a 3-level pyramidal TIFF at 40x
(0.25 um/px, zlib, 256-pixel tiles) of ``size`` x ``size`` pixels: an irregular
blob of synthetic H&E (pink stroma, purple nuclei) covering ``tissue_fraction`` of
the slide, glass elsewhere. Then:

1. **Tile reads**: for each backend (cuCIM, OpenSlide) and magnification (10x, 20x,
   40x), ``reads`` random 224x224 tissue tiles through
   :meth:`custom.wsi_data.WSITileDataset.read_tile` (the multi-magnification training
   path), after a warm-up; reads/s and MB/s of decoded RGB. The slide file was just
   written or read, so it is in the page cache: this measures decoding, not the disk.
2. **Whole-slide inference**: ``scripts/segment.py`` (the bundle's ``inference.json``
   through ``monai.bundle.ConfigWorkflow``) in a child process with the shipped model,
   TTA off and the config's defaults otherwise (bf16 autocast, 1024-pixel windows,
   one loader worker). Throughput is in tissue megapixels per second at 40x (the
   tissue area of the slide's summary at 0.25 um/px); the time is the child's whole
   run (start-up, tissue mask and stain statistics included) and, separately, the
   window loop alone (the summary's ``seconds``). Memory: the peak resident set of
   the largest process (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and the peak
   proportional set size of the child's whole process tree (main + loader worker,
   shared pages counted once), both compared with the slide's level-0 RGB size.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import fire
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custom.wsi import write_pyramidal_tiff  # noqa: E402
from custom.wsi_data import WSITileDataset  # noqa: E402

MPP = 0.25  # level-0 um/px (40x)
MAGNIFICATIONS = (10, 20, 40)
TILE = 224
BACKENDS = ("cucim", "openslide")
GLASS, STROMA, NUCLEUS = (245, 245, 245), (225, 150, 195), (80, 45, 135)


def _fail(message: str) -> None:
    print(f"bench_wsi.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def _blob_radius(theta: np.ndarray, r0: float) -> np.ndarray:
    """Radius of the irregular tissue blob at polar angle ``theta``."""
    return r0 * (1 + 0.08 * np.sin(3 * theta) + 0.05 * np.sin(7 * theta + 1.0))


def _blob(size: int, tissue_fraction: float):
    """Tissue test ``inside(y, x)`` of a blob centred in a ``size`` square whose area is ``tissue_fraction``."""
    aspect = 1.1  # the blob is a wavy ellipse, taller than wide
    # mean of r(theta)^2 over theta: 1 + (0.08^2 + 0.05^2) / 2
    r0 = size * math.sqrt(tissue_fraction / (math.pi * (1 + (0.08**2 + 0.05**2) / 2)))
    c = (size - 1) / 2

    def inside(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        dy, dx = (y - c) / aspect, (x - c) * aspect
        return np.hypot(dy, dx) <= _blob_radius(np.arctan2(dy, dx), r0)

    return inside


def make_slide(path: Path, size: int, tissue_fraction: float, seed: int = 0, nuclei_per_mpx: int = 2500, strip: int = 512) -> float:
    """Write the synthetic pyramidal slide; returns its actual tissue fraction. The level-0
    array (``size``^2 x 3 bytes) is the only large allocation: it is filled strip by strip."""
    rng = np.random.default_rng(seed)
    inside = _blob(size, tissue_fraction)
    img = np.empty((size, size, 3), np.uint8)
    xs = np.arange(size, dtype=np.float32)[None, :]
    tissue_px = 0
    for y0 in range(0, size, strip):
        ys = np.arange(y0, min(size, y0 + strip), dtype=np.float32)[:, None]
        m = inside(ys, xs)
        tissue_px += int(m.sum())
        img[y0 : y0 + len(ys)] = GLASS
        img[y0 : y0 + len(ys)][m] = STROMA
    n = int(nuclei_per_mpx * tissue_px / 1e6)
    yy, xx = np.mgrid[-9:10, -9:10]
    disks = {r: yy**2 + xx**2 <= r * r for r in range(5, 10)}
    placed = 0
    while placed < n:
        cy, cx = rng.integers(10, size - 10, 4096), rng.integers(10, size - 10, 4096)
        keep = inside(cy.astype(np.float32), cx.astype(np.float32))
        for y, x, r in zip(cy[keep][: n - placed], cx[keep][: n - placed], rng.integers(5, 10, int(keep.sum()))):
            img[y - 9 : y + 10, x - 9 : x + 10][disks[int(r)]] = NUCLEUS
            placed += 1
    for y0 in range(0, size, strip):
        part = img[y0 : y0 + strip]
        part[:] = np.clip(part.astype(np.int16) + rng.integers(-8, 9, part.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    write_pyramidal_tiff(path, img, mpp=MPP, levels=3, compression="zlib")
    return tissue_px / size**2


def bench_reads(path: Path, work_dir: Path, backend: str, reads: int, warmup: int, seed: int) -> list[dict]:
    """Random tissue tiles per magnification through WSITileDataset.read_tile."""
    ds = WSITileDataset(str(path), magnifications=MAGNIFICATIONS, tile_size=TILE, tile_coverage=0.7, backend=backend,
                        cache_dir=str(work_dir / "tile_index"))
    rng = np.random.default_rng(seed)
    rows = []
    for m, mag in enumerate(MAGNIFICATIONS):
        picks = ds.offsets[m] + rng.integers(ds.class_sizes[m], size=warmup + reads)
        for i in picks[:warmup]:
            ds.read_tile(int(i))
        t0 = time.perf_counter()
        nbytes = 0
        for i in picks[warmup:]:
            nbytes += ds.read_tile(int(i)).nbytes
        dt = time.perf_counter() - t0
        rows.append({"backend": backend, "magnification": mag, "tiles": ds.class_sizes[m], "reads": reads, "seconds": dt,
                     "reads_s": reads / dt, "mb_s": nbytes / dt / 1e6})
        print(f"  {backend:9s} {mag:>2}x: {reads} reads of {ds.class_sizes[m]} tissue tiles in {dt:.2f} s = "
              f"{reads / dt:,.0f} reads/s, {nbytes / dt / 1e6:,.1f} MB/s", flush=True)
    return rows


def _descendants(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def bench_inference(path: Path, work_dir: Path, backend: str, extra: dict) -> dict:
    """segment.py in a child process; seconds, tissue MP, nuclei and peak memory."""
    out = work_dir / "segmentation"
    log = work_dir / "segment.log"
    cmd = [sys.executable, str(REPO / "scripts" / "segment.py"), str(path), "--out", str(out), "--backend", backend,
           "--tta", "False", "--overwrite", "True", "--progress", "False"]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    print(f"  $ {shlex.join(cmd)}  (log: {log})", flush=True)
    peak_pss = [0]
    t0 = time.perf_counter()
    with log.open("w") as logf:
        child = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(REPO))
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.5):
                peak_pss[0] = max(peak_pss[0], sum(_pss_kib(p) for p in _descendants(child.pid)))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        rc = child.wait()
        done.set()
        watcher.join()
    seconds = time.perf_counter() - t0
    max_rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(f"segment.py exited with status {rc}; last lines of {log}:\n" + "\n".join(tail))
    summary = json.loads((out / f"{path.stem}.json").read_text())
    tissue_mp = summary["tissue_mm2"] / (MPP * 1e-3) ** 2 / 1e6
    return {"seconds": seconds, "loop_seconds": float(summary["seconds"]), "tissue_mm2": summary["tissue_mm2"], "tissue_mp": tissue_mp,
            "windows": summary["windows"], "nuclei": summary["nuclei"], "max_rss_mib": max_rss_kib / 1024,
            "peak_pss_mib": peak_pss[0] / 1024, "amp_dtype": summary.get("amp_dtype"), "window": summary.get("window"),
            "halo": summary.get("halo")}


def _inference_region(extra: dict) -> tuple[int, int]:
    """(core window, region read per window incl. halo and receptive context) in 40x pixels, from inference.json."""
    cfg = json.loads((REPO / "bundle" / "configs" / "inference.json").read_text())
    window, halo = int(extra.get("window", cfg["window"])), int(extra.get("halo", cfg["halo"]))
    context = 1 + 2 * sum(int(d) for d in cfg["dilations"])  # custom.inference.receptive_field_radius of AttentionNet
    return window, window + 2 * (halo + context)


def main(size: int = 8192, tissue_fraction: float = 0.3, reads: int = 300, warmup: int = 30, backends: str | tuple = BACKENDS,
         skip_inference: bool = False, inference_backend: str = "cucim", work_dir: str = "/tmp/bench_wsi", seed: int = 0,
         **inference_overrides) -> None:
    """Print tile-read and whole-slide inference figures, then a markdown table.

    Args:
        size: level-0 side of the generated square slide in pixels (40x; 2048 .. 32768).
        tissue_fraction: share of the slide covered by tissue (0.05 .. 0.5).
        reads: timed tile reads per (backend, magnification).
        warmup: untimed reads before them.
        backends: "cucim", "openslide" or both (comma-separated or a list).
        skip_inference: tile reads only.
        inference_backend: backend of the inference run.
        work_dir: folder for the generated slide (reused when present), tile index and outputs.
        seed: generator and tile-pick seed.
        inference_overrides: inference.json keys for the child run, e.g. ``--window 2048`` or ``--num_workers 0``.
    """
    if isinstance(backends, str):
        backends = tuple(b.strip() for b in backends.split(",") if b.strip())
    backends = tuple(backends)
    if isinstance(size, bool) or not isinstance(size, int) or not 2048 <= size <= 32768:
        _fail(f"--size must be an integer from 2048 to 32768 (level-0 pixels; 10x tiles need size/4 >= {TILE} with tissue), got {size!r}.")
    if isinstance(tissue_fraction, bool) or not isinstance(tissue_fraction, (int, float)) or not 0.05 <= tissue_fraction <= 0.5:
        _fail(f"--tissue_fraction must be a number from 0.05 to 0.5, got {tissue_fraction!r}.")
    for name, v, lo in (("reads", reads, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            _fail(f"--{name} must be an integer >= {lo}, got {v!r}.")
    if not backends or any(b not in BACKENDS for b in backends):
        _fail(f"--backends must be among {', '.join(BACKENDS)}, got {backends!r}.")
    if inference_backend not in BACKENDS:
        _fail(f"--inference_backend must be one of {', '.join(BACKENDS)}, got {inference_backend!r}.")
    known = json.loads((REPO / "bundle" / "configs" / "inference.json").read_text())
    unknown = sorted(k for k in inference_overrides if k not in known or k in ("input", "output_dir", "backend", "tta", "overwrite", "progress"))
    if unknown:
        _fail(f"unknown option(s) {', '.join('--' + k for k in unknown)}: not a bench_wsi.py option nor an inference.json key this "
              "benchmark lets you change (input, output_dir, backend, tta, overwrite and progress are set by it).")
    if not isinstance(skip_inference, bool):
        _fail(f"--skip_inference is a flag (True/False), got {skip_inference!r}.")
    command = shlex.join(["python", "scripts/bench_wsi.py", *sys.argv[1:]])
    t_start = time.perf_counter()

    import torch

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"synthetic_{size}_t{round(tissue_fraction * 100)}_s{seed}.tiff"
    level0_mb = size * size * 3 / 1e6
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    if slide.is_file():
        print(f"slide: {slide} (cached)")
    else:
        t0 = time.perf_counter()
        print(f"slide: generating {slide} ...", flush=True)
        make_slide(slide, size, float(tissue_fraction), seed)
        print(f"  written in {time.perf_counter() - t0:.1f} s")
    print(f"  {size} x {size} px at 40x ({MPP} um/px), 3 levels (40x, 20x, 10x), zlib, file {slide.stat().st_size / 1e6:.0f} MB; "
          f"level 0 = {size * size / 1e6:.1f} MP = {level0_mb:.0f} MB of RGB; tissue target {tissue_fraction:.0%}")

    rows = []
    print(f"\n1. tile reads: random {TILE}x{TILE} tissue tiles (coverage >= 70 %), {warmup} warm-up + {reads} timed per row, page cache warm")
    for b in backends:
        rows += bench_reads(slide, work, b, reads, warmup, seed)

    inf = None
    if not skip_inference:
        window, region = _inference_region(inference_overrides)
        print(f"\n2. whole-slide inference ({inference_backend}, TTA off, shipped model, inference.json defaults"
              f"{', ' + str(inference_overrides) if inference_overrides else ''})")
        print(f"  window: {window}x{window} core ({window**2 / 1e6:.2f} MP), read as {region}x{region} with halo + context "
              f"({region**2 / 1e6:.2f} MP, {region**2 * 3 / 1e6:.1f} MB RGB); level 0 holds {size * size / window**2:.0f} cores")
        inf = bench_inference(slide, work, inference_backend, inference_overrides)
        mp_s, loop_mp_s = inf["tissue_mp"] / inf["seconds"], inf["tissue_mp"] / inf["loop_seconds"]
        print(f"  tissue {inf['tissue_mm2']:.2f} mm2 = {inf['tissue_mp']:.1f} MP at 40x ({inf['tissue_mp'] / (size * size / 1e6):.0%} of the slide), "
              f"{inf['windows']} windows, {inf['nuclei']:,} nuclei, amp {inf['amp_dtype']}")
        print(f"  {inf['seconds']:.1f} s end to end = {mp_s:.3f} tissue MP/s; window loop {inf['loop_seconds']:.1f} s = {loop_mp_s:.3f} MP/s")
        print(f"  peak RSS (largest process) {inf['max_rss_mib']:,.0f} MiB = {inf['max_rss_mib'] * 1.048576 / level0_mb:.2f}x level 0 "
              f"({level0_mb:.0f} MB); peak PSS of the process tree {inf['peak_pss_mib']:,.0f} MiB = "
              f"{inf['peak_pss_mib'] * 1.048576 / level0_mb:.2f}x level 0")

    print(f"\nTotal {time.perf_counter() - t_start:.0f} s. Markdown:\n")
    print(f"`{command}` ({os.cpu_count()} CPU cores, no GPU; slide {size}x{size} at 40x = {level0_mb:.0f} MB of RGB at level 0, "
          f"3-level zlib TIFF, 256-px tiles)\n")
    tiles = {r["magnification"]: r["tiles"] for r in rows}
    print(f"Tile reads: {reads} random {TILE}x{TILE} tissue tiles per cell (drawn from "
          f"{', '.join(f'{tiles[m]:,} at {m}x' for m in MAGNIFICATIONS)}), after {warmup} warm-up reads, page cache warm.\n")
    print("| backend | 10x reads/s (MB/s) | 20x reads/s (MB/s) | 40x reads/s (MB/s) |")
    print("| --- | --- | --- | --- |")
    for b in backends:
        cells = [f"{r['reads_s']:,.0f} ({r['mb_s']:,.1f})" for r in rows if r["backend"] == b]
        print(f"| {b} | {' | '.join(cells)} |")
    if inf is not None:
        print()
        print("| whole-slide inference, 40x, TTA off, bf16 | tissue MP | windows | seconds | tissue MP/s | nuclei | peak RSS / PSS (level 0) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print(f"| {inference_backend}, {inf['window']} px windows, {inf['halo']} px halo | {inf['tissue_mp']:.1f} | {inf['windows']} | "
              f"{inf['seconds']:.0f} ({inf['loop_seconds']:.0f} in the window loop) | {inf['tissue_mp'] / inf['seconds']:.3f} "
              f"({inf['tissue_mp'] / inf['loop_seconds']:.3f}) | {inf['nuclei']:,} | {inf['max_rss_mib'] / 1024:.2f} / "
              f"{inf['peak_pss_mib'] / 1024:.2f} GiB ({level0_mb:.0f} MB) |")


if __name__ == "__main__":
    fire.Fire(main)
