"""Distributed runs on CPU with ``torchrun --standalone --nproc_per_node=2`` (Gloo):
training with ``multi_gpu_train.json`` (DistributedDataParallel) and whole-slide
inference sharded over ranks (``RANK``/``WORLD_SIZE`` in ``inference.json``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from custom.training.tiles import BalancedMagnificationBatchSampler
from tests.conftest import REPO, make_prepared_dataset

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

# written by the test: each rank saves what it trained, to compare ranks afterwards
SAVE_EACH_RANK = {
    "finalize": [
        "$torch.save({'state': @network.module.state_dict(), 'optimizer': @optimizer.state_dict(), "
        "'iteration': @train#trainer.state.iteration}, os.path.join(@output_dir, 'rank' + str(@rank) + '.pt'))",
        "$@summary_writer.close()",
        "$dist.is_initialized() and dist.destroy_process_group()",
    ]
}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_distributed_sampler_ranks_split_one_balanced_global_batch():
    ranks = [BalancedMagnificationBatchSampler(5, 3, batch_size=4, num_batches=6, seed=1, rank=r, world_size=3) for r in range(3)]
    single = BalancedMagnificationBatchSampler(5, 3, batch_size=12, num_batches=6, seed=1)
    for batches, whole in zip(zip(*[list(s) for s in ranks]), single):
        assert all(len(b) == 4 for b in batches)
        assert sorted(sum(batches, [])) == sorted(whole)  # the ranks' slices make up the single-process batch
        counts = np.bincount([i // 5 for i in sum(batches, [])], minlength=3)
        assert counts.tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="rank"):
        BalancedMagnificationBatchSampler(5, 3, batch_size=4, num_batches=2, rank=2, world_size=2)


def _torchrun_training(tmp_path, extra: dict, iterations: int, *args: str) -> tuple[subprocess.CompletedProcess, object]:
    """2-rank CPU training of a width-4 F on a small generated dataset, ``train.json`` +
    ``multi_gpu_train.json`` + the test's ``extra`` config; returns (process, output folder)."""
    dataset = make_prepared_dataset(tmp_path / "data", n_images=4, size=256)
    out = tmp_path / "run"
    extra_file = tmp_path / "extra.json"
    extra_file.write_text(json.dumps(extra))
    configs = f"['bundle/configs/train.json','bundle/configs/multi_gpu_train.json','{extra_file}']"
    cmd = TORCHRUN + ["-m", "monai.bundle", "run", "training", "--config_file", configs,
                      "--dataset_dir", str(dataset), "--download", "False", "--output_dir", str(out),
                      "--model_path", str(out / "model.pt"), "--width", "4", "--crop_size", "64", "--batch_size", "6",
                      "--epochs", "1", "--iterations_per_epoch", str(iterations), "--num_workers", "0", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400), out


def test_torchrun_two_ranks_train_with_identical_weights(tmp_path):
    proc, out = _torchrun_training(tmp_path, SAVE_EACH_RANK, iterations=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # only rank 0's engines log progress: one "new best" line per evaluator metric in one epoch, not one per rank
    best = re.findall(r"Got new best metric of (\S+):", proc.stdout + proc.stderr)
    assert best and len(best) == len(set(best)), best

    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["iteration"] == r1["iteration"] == 2
    for r in (r0, r1):  # both ranks took 2 optimiser steps
        steps = {int(s["step"]) for s in r["optimizer"]["state"].values()}
        assert steps == {2}
    params = [k for k, v in r0["state"].items() if isinstance(v, torch.Tensor)]
    assert len(params) > 100
    different = [k for k in params if not torch.equal(r0["state"][k], r1["state"][k])]
    assert not different, f"ranks disagree after training: {different[:5]}"
    # rank 0 alone wrote checkpoints, the exported F and TensorBoard events in output_dir
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_latest.pt"] and (out / "model.pt").is_file()
    assert len(list(out.glob("events.out.tfevents*"))) == 1


def test_torchrun_mid_epoch_resume_restores_every_ranks_draws(tmp_path):
    """Two ranks stopped after iteration 2 of an epoch of 4 (checkpoint every 2) and resumed from
    rank 0's checkpoint end with the weights of the uninterrupted run: the checkpoint holds each rank's
    random generators (``rng_by_rank``) and each rank restores its own, so rank 1 draws the equivariance
    transforms it drew in the uninterrupted run (with rank 0's state only, rank 1 drew others)."""
    stop_after_2 = dict(SAVE_EACH_RANK, training=[
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once=2), lambda e: e.terminate())",
        "$@train#trainer.run()",
    ])
    full_proc, full = _torchrun_training(tmp_path / "full", SAVE_EACH_RANK, 4, "--checkpoint_interval", "2")
    assert full_proc.returncode == 0, full_proc.stdout[-3000:] + full_proc.stderr[-3000:]
    stopped, run = _torchrun_training(tmp_path / "run", stop_after_2, 4, "--checkpoint_interval", "2")
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    checkpoint = run / "checkpoints" / "checkpoint_latest.pt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["trainer"]["iteration"] == 2 and len(saved["epoch_seed"]["rng_by_rank"]) == 2
    resumed, _ = _torchrun_training(tmp_path / "run", SAVE_EACH_RANK, 4, "--checkpoint_interval", "2", "--resume_from", str(checkpoint))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "without the random generators' state" not in resumed.stdout + resumed.stderr
    expected, got = (torch.load(out / "rank1.pt", weights_only=False) for out in (full, run))
    assert got["iteration"] == expected["iteration"] == 4
    different = [k for k, v in expected["state"].items() if isinstance(v, torch.Tensor) and not torch.equal(v, got["state"][k])]
    assert not different, f"the resumed run's weights differ from the uninterrupted run's: {different[:5]}"


def test_torchrun_non_finite_loss_on_one_rank_stops_both(tmp_path):
    """NaN pixels reach rank 1's tiles at iteration 2: both ranks stop at iteration 2 (rank 1
    names its loss, rank 0 says another rank's was not finite; without the all-reduced check
    rank 0 failed in the gradient all-reduce with Gloo's "Connection closed by peer"); rank 0's
    checkpoint_latest.pt (checkpoint_interval 1) holds the finite state after iteration 1. Rank 0's
    exception callback (the saver's "resume from" message) is slowed by 4 s: rank 1 must wait for it
    (custom.training.handlers.NonFiniteStopBarrier), or torchrun stops rank 0 when rank 1 exits."""
    nan_on_rank1 = {"training": [
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_STARTED(once=2), "
        "lambda e: e.state.batch['image'][0, :, :4, :4].fill_(float('nan')) if @rank == 1 else None)",
        "$@train#checkpoint_saver.logger.__setattr__('warning', (lambda w: lambda m: (os.system('sleep 4'), w(m)))"
        "(@train#checkpoint_saver.logger.warning)) if @rank == 0 else None",
        "$@train#trainer.run()",
    ]}
    proc, out = _torchrun_training(tmp_path, nan_on_rank1, 3, "--checkpoint_interval", "1")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "non-finite training loss at iteration 2:" in text, text[-3000:]
    assert "non-finite training loss at iteration 2 on another rank" in text, text[-3000:]
    assert f"holds iteration 1: go on from there with --resume_from {out / 'checkpoints' / 'checkpoint_latest.pt'}" in text, text[-3000:]
    final = torch.load(out / "checkpoints" / "checkpoint_latest.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in final["network"].values() if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_torchrun_two_ranks_shard_slides_each_output_once(tmp_path):
    images = make_prepared_dataset(tmp_path / "data", n_images=3, size=192) / "images"
    slides = tmp_path / "slides"
    slides.mkdir()
    for i, path in enumerate(sorted(images.glob("*.png"))):
        shutil.copy(path, slides / f"slide{i}.png")
    out = tmp_path / "out"
    cmd = TORCHRUN + ["scripts/segment.py", str(slides), "--out", str(out), "--base_magnification", "40", "--tta", "False",
                      "--use_tissue_mask", "False", "--progress", "False"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(summaries) == ["slide0", "slide1", "slide2"]
    # slides rank::world_size: rank 0 takes slides 0 and 2, rank 1 slide 1
    ranks = {name: (s["rank"], s["world_size"]) for name, s in summaries.items()}
    assert ranks == {"slide0": (0, 2), "slide1": (1, 2), "slide2": (0, 2)}
    for name in summaries:
        assert (out / f"{name}.geojson").is_file() and (out / f"{name}.csv").is_file()
    # each slide segmented once: the writer logs "<slide>: N nuclei in S s" once per slide it finishes
    finished = re.findall(r"(slide\d): \d+ nuclei in", proc.stdout + proc.stderr)
    assert sorted(finished) == ["slide0", "slide1", "slide2"]


def test_multi_gpu_overrides_name_existing_items():
    """multi_gpu_train.json overrides items of train.json by id; each must still exist there
    (an override of a missing id would silently add a new key), and handler 1 must be the
    epoch seeding that gets the rank (and that the checkpoint saves)."""
    from monai.bundle import ConfigParser

    train = ConfigParser()
    train.read_config(str(REPO / "bundle" / "configs" / "train.json"))
    multi = json.loads((REPO / "bundle" / "configs" / "multi_gpu_train.json").read_text())
    assert train["train#handlers#1#_target_"] == "custom.training.handlers.EpochSeedHandler"
    assert train["train#checkpoint_saver#save_dict#epoch_seed"] == train["train#checkpoint_loader#load_dict#epoch_seed"] == "@train#handlers#1"
    for key in multi:
        parent = key.rpartition("#")[0]
        if parent and key not in ("train#handlers#1#rank", "train#sampler#rank", "train#sampler#world_size"):
            assert parent in train, f"multi_gpu_train.json overrides {key}, but train.json has no {parent}"
