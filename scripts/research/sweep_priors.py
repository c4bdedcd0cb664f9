"""Exploration sweep (a research script, not the bundle workflow): which priors make the
attention land on nuclei? Needs a GPU for useful speed (6 variants run concurrently).

Each variant trains F+G with the bundle's own modules and transforms, and every
`eval_every` iterations measures, on the 11 validation images at 40x (whole images,
no TTA, running tau), Dice between A>thr and the ground-truth foreground.

python scripts/research/sweep_priors.py launch scripts/research/sweep_priors.json DATASET_DIR OUT_DIR --iterations 1500 --eval_every 250
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch
from monai.transforms import Compose, EnsureTyped, NormalizeIntensityd, RandSpatialCropd, ScaleIntensityRanged

import custom
from custom.data.prepared import list_ids, load_rgb
from custom.model.losses import ScaleAttentionLoss
from custom.model.networks import AttentionNet, ScaleAttentionModel, scale_classifier
from custom.training.tiles import BalancedMagnificationBatchSampler, MultiMagnificationDataset, reinhard_target
from custom.transforms import RandDihedrald, RandHEDJitterd, ReinhardNormalize, ReinhardNormalized

MEAN, STD = custom.transforms.IMAGENET_MEAN, custom.transforms.IMAGENET_STD


def _val_set(data, ids, target):
    from PIL import Image

    norm = ReinhardNormalize(target[0], target[1], 90)
    xs, ys = [], []
    for i in ids:
        rgb = np.moveaxis(load_rgb(Path(data) / "images" / f"{i}.png"), -1, 0).astype(np.float32) / 255.0
        rgb = norm(rgb)
        x = (rgb - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(np.array(Image.open(Path(data) / "labels" / f"{i}.png")) > 0))
    return xs, ys


@torch.no_grad()
def _evaluate(net, xs, ys, device, thresholds=(0.1, 0.3, 0.5, 0.7)):
    net.eval()
    dice = {t: [] for t in thresholds}
    inv = []
    for x, y in zip(xs, ys):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            a = net(x[None].to(device).contiguous(memory_format=torch.channels_last))[0, 0].float().cpu()
        for t in thresholds:
            p = a > t
            dice[t].append(float(2 * (p & y).sum() / max(int(p.sum() + y.sum()), 1)))
        p = a <= 0.5
        inv.append(float(2 * (p & y).sum() / max(int(p.sum() + y.sum()), 1)))
    net.train()
    return {f"dice@{t}": float(np.mean(v)) for t, v in dice.items()} | {"dice_inv@0.5": float(np.mean(inv))}


def run(name, data, out, iterations=3000, eval_every=250, kw="{}", width=64, batch=32, seed=0, workers=2, lr=2e-4):
    kw = json.loads(kw) if isinstance(kw, str) else dict(kw)
    torch.manual_seed(seed)
    np.random.seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = list_ids(data, "train"), list_ids(data, "val")
    tiles = MultiMagnificationDataset(data, train_ids, (10, 20, 40), 40)
    target = reinhard_target(tiles.base_images, None, 90)
    tf = Compose([
        RandSpatialCropd("image", (160, 160), random_size=False),
        ScaleIntensityRanged("image", 0, 255, 0.0, 1.0),
        RandDihedrald("image"),
        ReinhardNormalized("image", target[0], target[1], 90),
        RandHEDJitterd("image", sigma=kw.pop("hed_sigma", 0.03)),
        NormalizeIntensityd("image", subtrahend=MEAN, divisor=STD, channel_wise=True),
        EnsureTyped(["image", "label"], track_meta=False),
    ])
    tiles.transform = tf
    sampler = BalancedMagnificationBatchSampler(len(train_ids), 3, batch, iterations, seed)
    loader = torch.utils.data.DataLoader(tiles, batch_sampler=sampler, num_workers=workers, persistent_workers=True, prefetch_factor=4)
    weights = {k: kw.pop(k, 1.0) for k in ("scale_weight", "smooth_weight", "equiv_weight")}
    net = AttentionNet(width=width, **kw)
    model = ScaleAttentionModel(net, scale_classifier(3), equivariance=weights["equiv_weight"] > 0, amp_dtype="bfloat16").to(device)
    loss_fn = ScaleAttentionLoss(**weights)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    xs, ys = _val_set(data, val_ids, target)
    log = open(out / f"{name}.jsonl", "w")
    best, t0 = -1.0, time.time()
    rec = {"it": 0} | _evaluate(net, xs, ys, device)
    log.write(json.dumps(rec) + "\n")
    log.flush()
    acc_hist, loss_hist = [], []
    for it, batch_ in enumerate(loader, 1):
        x, y = batch_["image"].to(device, non_blocking=True), batch_["label"].to(device)
        o = model(x)
        losses = loss_fn(o, y)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        acc_hist.append(float((o["scale_logits"].argmax(1) == y).float().mean()))
        loss_hist.append({k: float(v) for k, v in losses.items()})
        if it % eval_every == 0 or it == iterations:
            rec = {"it": it, "sec": round(time.time() - t0, 1), "acc": float(np.mean(acc_hist[-eval_every:])),
                   "tau": float(net.activation.running_tau)}
            rec |= {k: float(np.mean([h[k] for h in loss_hist[-eval_every:]])) for k in loss_hist[-1]}
            rec |= _evaluate(net, xs, ys, device)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(name, json.dumps(rec), flush=True)
            if rec["dice@0.5"] > best:
                best = rec["dice@0.5"]
                torch.save(net.state_dict(), out / f"{name}_best.pt")
    torch.save(net.state_dict(), out / f"{name}_final.pt")


def launch(spec, data, out, iterations=3000, eval_every=250, workers=2):
    """spec: JSON file {name: {kw...}}; runs all variants in parallel on the one GPU."""
    import subprocess

    variants = json.loads(Path(spec).read_text())
    procs = []
    for name, kw in variants.items():
        width = kw.pop("width", 64)
        cmd = [sys.executable, __file__, "run", "--name", name, "--data", data, "--out", out, "--iterations", str(iterations),
               "--eval_every", str(eval_every), "--kw", json.dumps(kw), "--width", str(width), "--workers", str(workers)]
        procs.append(subprocess.Popen(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"}))
    for p in procs:
        p.wait()


if __name__ == "__main__":
    fire.Fire({"run": run, "launch": launch})
