"""End-to-end: the evaluation workflow (evaluate.json, baselines), and the tuning / table scripts, as a user runs them."""

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser
from PIL import Image

from custom.model.networks import AttentionNet
from custom.model.checkpoint import save_attention_network
from tests.conftest import REPO, make_prepared_dataset

CONFIGS = REPO / "bundle" / "configs"
STAIN_TARGET = [[70.0, 10.0, -10.0], [15.0, 8.0, 6.0]]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
# float32 and no channels-last: the bfloat16 autocast of the default config is slow on CPU
FAST = ["--amp_dtype", "float32", "--channels_last", "False"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """3 synthetic 96 x 96 images with labels; splits.json puts 2 of them in "val"."""
    root = make_prepared_dataset(tmp_path_factory.mktemp("eval") / "data", n_images=3, size=96)
    assert len(json.loads((root / "splits.json").read_text())["val"]) == 2
    return root


def run_evaluation(bundle_root: Path, dataset: Path, *extra: str, baseline: str | None = None) -> subprocess.CompletedProcess:
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")]
    if baseline:
        files.append(str(CONFIGS / "baselines" / f"{baseline}.json"))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", "[" + ",".join(f"'{f}'" for f in files) + "]",
           "--dataset_dir", str(dataset), "--bundle_root", str(bundle_root), "--download", "false", "--num_workers", "0", *extra]
    return subprocess.run(cmd, check=False, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], check=False, cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)


def tiny_model(path: Path, stain_target=STAIN_TARGET, postprocess: dict | None = None) -> Path:
    """A width-4 attention network as the bundle's network_def builds it with --width 4 (stain prior "logit")."""
    net = AttentionNet(width=4, stain_prior="logit", stain_prior_gain=2.0, stain_settings={"brightness_percentile": 90.0, "max_std_ratio": None})
    net.stain_target = stain_target
    net.postprocess = dict(postprocess or {})
    return save_attention_network(net, path)


def test_baseline_evaluation_writes_reports_and_overlays(tmp_path, dataset):
    proc = run_evaluation(tmp_path / "bundle", dataset, baseline="hematoxylin_otsu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "bundle" / "runs" / "eval" / "hematoxylin_otsu"
    for name in ("per_image.csv", "summary.json", "summary.csv"):
        assert (out / name).is_file(), name
    val_ids = json.loads((dataset / "splits.json").read_text())["val"]
    assert sorted(p.name for p in (out / "overlays").glob("*.png")) == sorted(f"{i}.png" for i in val_ids)
    assert Image.open(out / "overlays" / f"{val_ids[0]}.png").size == (96, 96)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "hematoxylin_otsu" and summary["n_images"] == 2
    assert summary["settings"]["weights"] is None and summary["settings"]["split"] == "val"
    assert summary["dice"] > 0.8  # purple disks on pink: the foreground is easy
    assert summary["n_true"] > 0 and summary["n_pred"] > 0
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == val_ids
    assert summary["aji"] == pytest.approx(np.mean([float(r["aji"]) for r in rows]))
    assert summary["n_true"] == sum(int(float(r["n_true"])) for r in rows)
    assert not (out / "errors_summary.json").exists()  # the error analysis is off by default


def test_model_evaluation_tiled_with_tuned_postprocessing(tmp_path, dataset):
    tuned = {"threshold": 0.6, "sigma": 0.5, "footprint_radius": 5, "min_size": 3, "local_block_size": 31, "local_offset": 0.02,
             "marker_h": 0.5, "fill_holes": 50}
    model = tiny_model(tmp_path / "tiny.pt", postprocess=tuned)
    # --inference_roi 64 < 96: the images are tiled
    proc = run_evaluation(tmp_path / "bundle", dataset, "--checkpoint", str(model), "--width", "4", "--tta", "False",
                          "--inference_roi", "64", "--error_analysis", "true", *FAST)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "bundle" / "runs" / "eval" / "model"
    summary = json.loads((out / "summary.json").read_text())
    errors = json.loads((out / "errors_summary.json").read_text())  # --error_analysis true: with the same post-processing
    assert errors["n_images"] == 2 and errors["aji"] == pytest.approx(summary["aji"]) and errors["n_pred"] == summary["n_pred"]
    assert errors["mask_params"] == {"morphology_radii": [2, 1], "sigma": 0.5, "footprint_radius": 5, "min_size": 3, "marker_h": 0.5,
                                     "fill_holes": 50}
    assert summary["method"] == "model" and summary["n_images"] == 2
    assert summary["settings"]["weights"] == str(model) and summary["settings"]["tta"] is False
    assert summary["settings"]["postprocess"] == {**tuned, "morphology_radii": [2, 1], "otsu_range": [0.4, 0.6],
                                                  "attention_sigma": 0.0}  # the values stored in the model (defaults for the rest)
    assert summary["settings"]["r"] is None  # the network's own slope
    assert len(list((out / "overlays").glob("*.png"))) == 2


@pytest.mark.parametrize("stored, expected", [
    ({"brightness_percentile": None, "max_std_ratio": 1.5}, (None, 1.5)),
], ids=["stored"])
def test_evaluation_normalises_with_the_models_own_stain_settings(tmp_path, stored, expected):
    net = AttentionNet(width=4, stain_prior="logit", stain_prior_gain=2.0, stain_target=STAIN_TARGET, stain_settings=stored)
    model = save_attention_network(net, tmp_path / "m.pt")
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    # the training defaults say otherwise: the model's settings win
    parser.update({"checkpoint": str(model), "width": 4, "brightness_percentile": 75, "reinhard_max_std_ratio": 3.0})
    normalise = parser.get_parsed_content("eval#stain_normalisation").transform
    assert (normalise.brightness_percentile, normalise.max_std_ratio) == expected


def test_stored_r_and_otsu_threshold_reach_evaluation_and_inference(tmp_path):
    tuned = {"threshold": "otsu", "otsu_range": [0.3, 0.7], "r": 1.0}
    model = tiny_model(tmp_path / "m.pt", postprocess=tuned)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    parser.update({"checkpoint": str(model), "width": 4})
    assert parser.get_parsed_content("eval#inferer").r == 1.0
    post = parser.get_parsed_content("eval#postprocessing").transforms[0].transform.kwargs
    assert post["threshold"] == "otsu" and post["otsu_range"] == (0.3, 0.7)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"model_path": str(model), "width": 4})
    assert parser.get_parsed_content("inferer").r == 1.0
    assert parser.get_parsed_content("postprocess_params")["threshold"] == "otsu"
    parser["inferer#r"] = 4.0  # a user's override wins
    assert parser.get_parsed_content("inferer").r == 4.0


def test_postprocess_key_overrides_single_stored_values_in_evaluation_and_inference(tmp_path):
    """One source: PostprocessParams' defaults, then the model's stored set, then the ``postprocess`` key."""
    from custom.inference.postprocess import PostprocessParams

    model = tiny_model(tmp_path / "m.pt", postprocess={"threshold": "otsu", "min_size": 120, "r": 1.0, "tuned_on": {"split": "val"}})
    for files, key, update in (([CONFIGS / "train.json", CONFIGS / "evaluate.json"], "eval#postprocess_params", {"checkpoint": str(model)}),
                               ([CONFIGS / "inference.json"], "postprocess_params", {"model_path": str(model)})):
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        parser.update({**update, "width": 4, "postprocess": {"min_size": 40}})
        params = parser.get_parsed_content(key)
        assert params == {**PostprocessParams().as_dict(), "threshold": "otsu", "min_size": 40}  # defaults < stored < override
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        parser.update({**update, "width": 4, "postprocess": {"min_sise": 40}})
        with pytest.raises(RuntimeError) as info:
            parser.get_parsed_content(key)
        assert "unknown post-processing parameter 'min_sise'; did you mean 'min_size'?" in str(info.value.__cause__)


def test_tune_postprocess_stores_r_and_may_pick_otsu(tmp_path, dataset):
    model = tiny_model(tmp_path / "m.pt")
    out, config = tmp_path / "tuned.json", tmp_path / "tiny.json"
    config.write_text(json.dumps({"width": 4, "amp_dtype": None, "channels_last": False, "num_workers": 0}))
    proc = run_script("tune_postprocess.py", "--dataset_dir", str(dataset), "--checkpoint", str(model), "--r", "1", "--tta", "False",
                      "--rounds", "1", "--workers", "1", "--out_config", str(out), "--write_model", "--config", str(config))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "otsu=" in proc.stdout  # the per-image threshold is one of the candidates
    assert "round 1 morphology_radii: [2, 1]=" in proc.stdout and ", []=" in proc.stdout  # the paper's radii, down to none
    override = json.loads(out.read_text())
    assert override["eval#inferer#r"] == 1.0 and override["postprocess"]["otsu_range"] == [0.4, 0.6]
    from custom.model.checkpoint import load_attention_weights
    stored = load_attention_weights(AttentionNet(width=4, stain_prior="logit", stain_prior_gain=2.0), str(model)).postprocess
    assert stored["r"] == 1.0 and stored["threshold"] == override["postprocess"]["threshold"]
    nameless = run_script("tune_postprocess.py", "--dataset_dir", str(dataset), "--write_model", "--out_config", str(tmp_path / "n.json"))
    assert nameless.returncode != 0 and "name the model file" in nameless.stdout + nameless.stderr  # the shipped model only by name
    bad = run_script("tune_postprocess.py", "--dataset_dir", str(dataset), "--checkpoint", str(model), "--r", "0", "--out_config", str(out))
    assert bad.returncode != 0 and "--r 0" in bad.stdout + bad.stderr
    # --start stored: the second search starts where the first ended (its AJI), and never ends lower
    first = float(re.search(r"AJI [0-9.]+ -> ([0-9.]+)", proc.stdout).group(1))
    again = run_script("tune_postprocess.py", "--dataset_dir", str(dataset), "--checkpoint", str(model), "--r", "1", "--tta", "False",
                       "--rounds", "1", "--workers", "1", "--out_config", str(out), "--config", str(config), "--start", "stored")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "start (the stored values" in again.stdout and f"): AJI {first:.4f}" in again.stdout
    assert float(re.search(r"AJI [0-9.]+ -> ([0-9.]+)", again.stdout).group(1)) >= first
    untuned = tiny_model(tmp_path / "untuned.pt")
    fresh = run_script("tune_postprocess.py", "--dataset_dir", str(dataset), "--checkpoint", str(untuned), "--config", str(config),
                       "--start", "stored", "--out_config", str(tmp_path / "u.json"))
    assert fresh.returncode != 0 and "stores no tuned post-processing" in fresh.stdout + fresh.stderr
    assert "attention " not in fresh.stdout and not (tmp_path / "u.json").exists()  # refused before any map was computed
    baseline = run_script("tune_postprocess.py", "--dataset_dir", str(dataset), "--method", "hematoxylin_otsu", "--start", "stored",
                          "--out_config", str(tmp_path / "b.json"))
    assert baseline.returncode != 0 and "--start 'stored'" in baseline.stdout + baseline.stderr and not (tmp_path / "b.json").exists()


def test_model_without_stain_target_is_refused(tmp_path, dataset):
    model = tiny_model(tmp_path / "old.pt", stain_target=None)
    proc = run_evaluation(tmp_path / "bundle", dataset, "--checkpoint", str(model), "--width", "4", "--tta", "False",
                          "--inference_roi", "64", *FAST)
    assert proc.returncode != 0
    assert "stain target" in proc.stdout + proc.stderr and str(model) in proc.stdout + proc.stderr
    assert not list((tmp_path / "bundle").rglob("summary.json"))


@pytest.mark.parametrize("value", [False, "false"], ids=["False", "lowercase-false"])
def test_false_from_the_command_line_turns_tta_off(value):
    """``monai.bundle run ... --tta false`` hands the config the string "false" (fire parses only Python literals),
    and ``--tta False`` the bool; both must turn test-time augmentation off."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    parser.update({"tta": value, "channels_last": value})
    inferer = parser.get_parsed_content("eval#inferer")
    assert inferer.tta is False and inferer.channels_last is False


def test_tune_postprocess_refuses_the_test_split(tmp_path, dataset):
    proc = run_script("tune_postprocess.py", "--dataset_dir", str(dataset), "--split", "test", "--out_config", str(tmp_path / "t.json"))
    assert proc.returncode != 0
    assert "test labels" in proc.stdout + proc.stderr
    assert not (tmp_path / "t.json").exists()


# ---------------------------------------------------------------------------------------------------------
# results table
# ---------------------------------------------------------------------------------------------------------


def _summary(folder: Path, method: str, aji: float, ahd=5.0) -> Path:
    folder.mkdir(parents=True)
    s = {"method": method, "n_images": 11, "aji": aji, "aji_plus": aji + 0.1, "dice": 0.7, "ahd": ahd, "pq": 0.4, "dq": 0.5,
         "sq": 0.8, "precision": 0.6, "recall": 0.5, "f1": 0.55, "n_true": 900, "n_pred": 800, "settings": {"split": "val"}}
    (folder / "summary.json").write_text(json.dumps(s))
    return folder


@pytest.fixture
def two_summaries(tmp_path) -> tuple[Path, Path]:
    return _summary(tmp_path / "weak", "weak_method", 0.2512), _summary(tmp_path / "strong", "strong_method", 0.4321)


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]


def test_results_table_sorted_by_aji_with_paper_rows(tmp_path, two_summaries):
    weak, strong = two_summaries
    proc = run_script("results_table.py", str(weak), str(strong / "summary.json"), "--out", str(tmp_path / "table.md"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert rows[0].startswith("| strong_method | val (11) | 800 / 900 | 0.4321 | 5.00 |")
    assert rows[1].startswith("| weak_method |")
    assert [r.split(" | ")[0][2:] for r in rows[2:]] == [
        "CellProfiler (paper)", "Fiji (paper)", "M_-WSI (paper)", "M_proposed (paper)", "CNN3, supervised (paper)"]
    assert (tmp_path / "table.md").read_text().strip() == proc.stdout.strip()
    unsorted = run_script("results_table.py", str(weak), str(strong), "--sort", "False", "--paper", "False")
    assert [r.split(" | ")[0][2:] for r in _rows(unsorted.stdout)] == ["weak_method", "strong_method"]


@pytest.mark.parametrize("flag", ["False", "false"])
def test_results_table_without_paper_rows(two_summaries, flag):
    proc = run_script("results_table.py", *map(str, two_summaries), "--paper", flag)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(paper)" not in proc.stdout
    assert [r.split(" | ")[0][2:] for r in _rows(proc.stdout)] == ["strong_method", "weak_method"]


def test_results_table_errors(tmp_path, two_summaries):
    (tmp_path / "empty").mkdir()
    proc = run_script("results_table.py", str(two_summaries[0]), str(tmp_path / "empty"))
    assert proc.returncode != 0
    assert "no summary.json" in proc.stderr and "empty" in proc.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    proc = run_script("results_table.py", str(bad))
    assert proc.returncode != 0 and "not valid JSON" in proc.stderr


def test_table_formats_missing_values(tmp_path):
    spec = importlib.util.spec_from_file_location("results_table", REPO / "scripts" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.table([{"method": "m", "aji": 0.5, "ahd": float("nan")}], paper=False)
    assert text.splitlines()[2] == "| m | ? (?) | ? / ? | 0.5000 | - | - | - | - | - |"
    folder = _summary(tmp_path / "a", "a", 0.1)
    assert [s["method"] for s in module.load_summaries([folder, folder / "summary.json"])] == ["a", "a"]


def test_the_documents_tables_are_the_generated_ones(tmp_path):
    """README.md, the model card and the pages of docs/ carry the tables results_table.py makes from the
    committed results/ summaries, not typed numbers; --into refills the block."""
    spec = importlib.util.spec_from_file_location("results_table", REPO / "scripts" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = REPO / "results"
    summaries = module.load_summaries(sorted(results.glob("*/summary.json")))
    summaries.sort(key=lambda s: -module._aji_key(s))
    expected = module.table(summaries)

    def block(text: str, name: str) -> str:
        start, end = module.markers(name)
        return text[text.index(start) + len(start): text.index(end)].strip()

    for doc in (REPO / "README.md", REPO / "bundle" / "docs" / "README.md"):
        text = doc.read_text()
        assert block(text, "results") == expected, f"{doc}: run python scripts/results_table.py --into {doc.relative_to(REPO)}"
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{module.START}\nold\n{module.END}\nrest\n")
    proc = run_script("results_table.py", *(str(p) for p in sorted(results.glob("*/summary.json"))), "--into", str(page))
    assert proc.returncode == 0 and page.read_text() == f"intro\n{module.START}\n{expected}\n{module.END}\nrest\n"
    page.write_text("no markers")
    proc = run_script("results_table.py", "--into", str(page))
    assert proc.returncode != 0 and "no '<!-- results table: generated -->'" in proc.stderr
    # every other named block (an archived recipe, a budget study) holds the rows of results/<block>/, a block
    # <root>_seeds the seed table of results/<root>/replicas, a block errors / <root>_errors the error analysis
    docs = [REPO / "README.md", REPO / "bundle" / "docs" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found_names = set()
    for doc in docs:
        text = doc.read_text()
        names = re.findall(r"<!-- ([A-Za-z0-9_ -]+) table: generated -->", text)
        found_names.update(names)
        for name in names:
            if name == "results":
                assert block(text, name) == expected, f"{doc}: run scripts/refresh_tables.sh"
                continue
            if name == "errors" or name.endswith("_errors"):  # the error analysis of results/ or of results/<root>
                archive = results / ("" if name == "errors" else name[: -len("_errors")])
                found = module.load_errors(archive)
                assert found, f"{doc}: block {name!r} but no {archive.relative_to(REPO)}/*/errors_summary.json"
                assert block(text, name) == module.error_table(found), (
                    f"{doc}: run python scripts/results_table.py --errors --eval_root {archive.relative_to(REPO)} "
                    f"--block {name} --into {doc.relative_to(REPO)}")
                continue
            if name.endswith("_seeds"):
                archive = results / name[: -len("_seeds")]
                groups = module.seed_groups(archive)
                assert groups, f"{doc}: block {name!r} but no {archive.relative_to(REPO)}/replicas/*/summary.json"
                assert block(text, name) == module.seed_table(groups), (
                    f"{doc}: run python scripts/results_table.py --seeds --eval_root {archive.relative_to(REPO)} "
                    f"--block {name} --into {doc.relative_to(REPO)}")
                continue
            archive = results / name
            old = module.load_summaries(sorted(archive.glob("*/summary.json")))
            assert old, f"{doc}: block {name!r} but no {archive.relative_to(REPO)}/*/summary.json"
            old.sort(key=lambda s: -module._aji_key(s))
            assert block(text, name) == module.table(old, paper=False), (
                f"{doc}: run python scripts/results_table.py --eval_root {archive.relative_to(REPO)} --paper false "
                f"--block {name} --into {doc.relative_to(REPO)}")
    # every committed summary folder is read by some table: results/ holds nothing else
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        read = folder.name in found_names or (folder / "summary.json").is_file() or any(
            n.startswith(folder.name) for n in found_names)
        assert read, f"results/{folder.name}: no generated table reads it"


def test_results_table_errors_block(tmp_path):
    """--errors reads <eval_root>/*/errors_summary.json (sorted by AJI) into the errors block; none is refused."""
    root = tmp_path / "eval"
    for name, a in (("weak", 0.31), ("strong", 0.52)):
        (root / name).mkdir(parents=True)
        (root / name / "errors_summary.json").write_text(json.dumps({
            "method": name, "n_images": 11, "aji": a, "aji_oracle_split": a + 0.1, "aji_true_foreground": 0.9, "dice": 0.75,
            "n_true": 900, "n_pred": 800, "merges": 20, "merged_true": 45, "split_true": 30, "missed_true": 60, "false_pred": 70}))
    page = tmp_path / "page.md"
    page.write_text("<!-- errors table: generated -->\nold\n<!-- end of errors table -->\n")
    proc = run_script("results_table.py", "--errors", "--eval_root", str(root), "--into", str(page))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert rows == ["| strong | 800 / 900 | 0.5200 | 0.6200 | 0.9000 | 0.7500 | 45 (20) | 30 | 60 | 70 |",
                    "| weak | 800 / 900 | 0.3100 | 0.4100 | 0.9000 | 0.7500 | 45 (20) | 30 | 60 | 70 |"]
    assert "old" not in page.read_text() and "| strong |" in page.read_text()
    none = run_script("results_table.py", "--errors", "--eval_root", str(tmp_path / "nothing"))
    assert none.returncode != 0 and "--error_analysis true" in none.stderr
    both = run_script("results_table.py", "--errors", "--seeds")
    assert both.returncode != 0 and "one table at a time" in both.stderr


def test_named_block_and_eval_root(tmp_path):
    """--eval_root picks the summaries when no paths are given; --block names the block --into fills,
    leaving the other blocks alone; a bad block name is refused."""
    root = tmp_path / "archive"
    _summary(root / "a", "old_a", 0.30)
    _summary(root / "b", "old_b", 0.35)
    page = tmp_path / "page.md"
    keep = "<!-- results table: generated -->\nmain\n<!-- end of results table -->\n"
    page.write_text(keep + "<!-- old recipe table: generated -->\nstale\n<!-- end of old recipe table -->\n")
    proc = run_script("results_table.py", "--eval_root", str(root), "--paper", "false", "--block", "old recipe", "--into", str(page))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [row.split(" | ")[0] for row in _rows(proc.stdout)] == ["| old_b", "| old_a"]
    text = page.read_text()
    assert text.startswith(keep) and "stale" not in text and "| old_b |" in text and "(paper)" not in text
    bad = run_script("results_table.py", "--eval_root", str(root), "--block", "x-->", "--into", str(page))
    assert bad.returncode != 0 and "--block 'x-->'" in bad.stderr and page.read_text() == text
    none = run_script("results_table.py", "--eval_root", str(tmp_path / "nothing"))
    assert none.returncode != 0 and "nothing/*/summary.json" in none.stderr


def test_seed_table_groups_replicas_with_seed_zero(tmp_path):
    """Replicas <variant>_s<seed> join their variant's own row (the shipped model for train);
    each metric is the mean with the range; variants are sorted by mean AJI."""
    root = tmp_path / "eval"
    _summary(root / "model", "model", 0.40, ahd=10.0)
    _summary(root / "replicas" / "train_s1", "train_s1", 0.44, ahd=12.0)
    _summary(root / "replicas" / "train_s2", "train_s2", 0.42, ahd=11.0)
    _summary(root / "minus_smooth", "minus_smooth", 0.30)
    _summary(root / "replicas" / "minus_smooth_s1", "minus_smooth_s1", 0.32)
    _summary(root / "minus_equiv", "minus_equiv", 0.5)  # no replicas: not in the seed table
    page = tmp_path / "page.md"
    page.write_text("a\n<!-- seed table: generated -->\nold\n<!-- end of seed table -->\nb\n")
    proc = run_script("results_table.py", "--seeds", "--eval_root", str(root), "--into", str(page))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(proc.stdout)[1:]  # after the header
    assert rows == ["| train (the shipped recipe) | 3 | 0.4200 (0.4000-0.4400) | 0.7000 (0.7000-0.7000) | 11.00 (10.00-12.00) "
                    "| 0.4000 (0.4000-0.4000) |",
                    "| minus_smooth | 2 | 0.3100 (0.3000-0.3200) | 0.7000 (0.7000-0.7000) | 5.00 (5.00-5.00) | 0.4000 (0.4000-0.4000) |"]
    assert page.read_text().startswith("a\n<!-- seed table: generated -->\n| variant (training seeds) |")
    assert page.read_text().endswith("<!-- end of seed table -->\nb\n")
    empty = run_script("results_table.py", "--seeds", "--eval_root", str(tmp_path / "nothing"))
    assert empty.returncode != 0 and "no seed replicas" in empty.stderr


def _evaluate_all(runs: Path, *names: str) -> subprocess.CompletedProcess:
    """scripts/evaluate_all.sh with PYTHON=echo: every command it would run is printed instead."""
    return subprocess.run(["bash", "scripts/evaluate_all.sh", "DATA", str(runs), *names], check=False, cwd=REPO,
                          env={**ENV, "PYTHON": "echo"}, capture_output=True, text=True, timeout=60)


def test_evaluate_all_dispatches_ablations_and_seed_replicas(tmp_path):
    runs = tmp_path / "runs"
    for name in ("train", "minus_smooth", "train_s1", "minus_smooth_s2", "notes"):
        (runs / name).mkdir(parents=True)
        if name != "notes":
            (runs / name / "model.pt").write_bytes(b"")
    proc = _evaluate_all(runs)
    assert proc.returncode == 0, proc.stderr
    evaluated = {line.split("--method ")[1].split()[0]: line for line in proc.stdout.splitlines() if "run evaluating" in line}
    # the shipped model three times, two baselines twice each, then every run folder with a model except train
    assert set(evaluated) == {"model", "model_hmaxima", "model_paper_postprocess", "hematoxylin_otsu", "hematoxylin_otsu_tuned",
                              "hematoxylin_local", "hematoxylin_local_tuned", "minus_smooth", "train_s1", "minus_smooth_s2"}
    assert "ablations/minus_smooth.json" in evaluated["minus_smooth"]
    assert evaluated["minus_smooth"].count("--eval_dir") == 1 and "--eval_dir bundle/runs/eval/minus_smooth " in evaluated["minus_smooth"]
    assert "--eval_dir bundle/runs/eval/model_paper_postprocess " in evaluated["model_paper_postprocess"]
    assert "inference_hmaxima.json" in evaluated["model_hmaxima"] and "inference_hmaxima" not in evaluated["model"]
    assert "ablations/minus_smooth.json" in evaluated["minus_smooth_s2"]
    assert evaluated["minus_smooth_s2"].count("--eval_dir") == 1
    assert "--eval_dir bundle/runs/eval/replicas/minus_smooth_s2" in evaluated["minus_smooth_s2"]
    assert "ablations" not in evaluated["train_s1"] and "--eval_dir bundle/runs/eval/replicas/train_s1" in evaluated["train_s1"]
    tuned = [line for line in proc.stdout.splitlines() if "tune_postprocess.py" in line and "--checkpoint" in line]
    assert len(tuned) == 3 and all("--write_model" in line and line.endswith("--r 1") for line in tuned)
    own_slope = subprocess.run(["bash", "scripts/evaluate_all.sh", "DATA", str(runs), "minus_smooth"], check=False, cwd=REPO,
                               env={**ENV, "PYTHON": "echo", "R": ""}, capture_output=True, text=True, timeout=60)
    assert own_slope.returncode == 0 and "tune_postprocess.py" in own_slope.stdout and "--r " not in own_slope.stdout

    only = _evaluate_all(runs, "train_s1")
    assert only.returncode == 0, only.stderr
    assert [line.split("--method ")[1].split()[0] for line in only.stdout.splitlines() if "run evaluating" in line] == ["train_s1"]
    archived = subprocess.run(["bash", "scripts/evaluate_all.sh", "DATA", str(runs), "minus_smooth", "minus_smooth_s2"], check=False,
                              cwd=REPO, env={**ENV, "PYTHON": "echo", "EVAL_ROOT": "results/old"}, capture_output=True,
                              text=True, timeout=60)
    assert archived.returncode == 0, archived.stderr
    lines = archived.stdout.splitlines()
    assert [line.split("--eval_dir ")[1].split()[0] for line in lines if "run evaluating" in line] == [
        "results/old/minus_smooth", "results/old/replicas/minus_smooth_s2"]
    assert lines[-1] == "scripts/results_table.py --eval_root results/old"  # no replicas there: no seed table
    missing = _evaluate_all(runs, "notes")
    assert missing.returncode != 0 and "notes/model.pt: not found" in missing.stderr


def test_evaluate_heldout_scores_the_training_split_without_retuning(tmp_path):
    """scripts/evaluate_heldout.sh with PYTHON=echo: the model and both baselines (plain and with their
    validation-tuned configs) are evaluated on the training split into their own folders; nothing is tuned."""
    proc = subprocess.run(["bash", "scripts/evaluate_heldout.sh", "DATA", str(tmp_path / "held")], check=False, cwd=REPO,
                          env={**ENV, "PYTHON": "echo"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    runs = [line for line in proc.stdout.splitlines() if "run evaluating" in line]
    methods = [line.split("--method ")[1].split()[0] for line in runs]
    assert methods == ["model", "model_hmaxima", "model_paper_postprocess", "hematoxylin_otsu", "hematoxylin_otsu_tuned",
                       "hematoxylin_local", "hematoxylin_local_tuned"]
    assert all("--eval_split train" in line and f"--eval_dir {tmp_path / 'held'}/" in line for line in runs)
    assert "baselines/hematoxylin_local_tuned.json" in runs[-1] and "tune_postprocess" not in proc.stdout
    assert proc.stdout.splitlines()[-1] == f"scripts/results_table.py --eval_root {tmp_path / 'held'} --paper false"
    untuned = subprocess.run(["bash", "scripts/evaluate_heldout.sh", "DATA", str(tmp_path / "held2")], check=False, cwd=REPO,
                             env={**ENV, "PYTHON": "echo", "BASELINES": "hematoxylin_untuned"}, capture_output=True, text=True, timeout=60)
    assert untuned.returncode != 0 and "baselines/hematoxylin_untuned_tuned.json: not found" in untuned.stderr
    assert "run evaluating" not in untuned.stdout  # refused before any evaluation


def test_ablation_study_trains_each_variant_at_one_budget_and_fixes_the_postprocessing(tmp_path):
    """scripts/research/ablation_study.sh with PYTHON=echo: the control and each ablation train one epoch of the given
    iterations into their own folder; every row, and the reference model, is evaluated twice with the same
    post-processing (the paper's, and the reference model's tuned values); bad arguments are refused."""
    reference = tmp_path / "ref.pt"
    reference.write_bytes(b"")
    env = {**ENV, "PYTHON": "echo", "RUNS_ROOT": str(tmp_path / "runs")}

    def study(*args, **extra):
        return subprocess.run(["bash", "scripts/research/ablation_study.sh", "DATA", *args], check=False, cwd=REPO,
                              env={**env, **extra}, capture_output=True, text=True, timeout=60)

    proc = study("7", str(reference))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    trained = [line for line in lines if "run training" in line]
    assert len(trained) == 4 and all("--epochs 1 --iterations_per_epoch 7 " in line for line in trained)
    assert "ablations" not in trained[0] and f"--output_dir {tmp_path}/runs/b7_control " in trained[0]
    assert [line.split("ablations/")[1].split(".json")[0] for line in trained[1:]] == ["minus_smooth", "minus_equiv", "minus_sparse"]
    evaluated = [line for line in lines if "run evaluating" in line]
    names = [line.split("--method ")[1].split()[0] for line in evaluated]
    assert names == [n for n in ("control", "minus_smooth", "minus_equiv", "minus_sparse", "reference") for _ in (0, 1)]
    assert all("--tta false" in line for line in evaluated)
    paper, fixed = evaluated[0::2], evaluated[1::2]
    assert all('--eval#tuned {}' in line and "budget7_paper_postprocess/" in line for line in paper)
    override = f"{tmp_path}/runs/budget7_reference_postprocess.json"
    assert all(override in line and "budget7_reference_postprocess/" in line and "eval#tuned" not in line for line in fixed)
    assert f"--checkpoint {reference} " in evaluated[-1]
    assert lines[-2:] == [f"scripts/results_table.py --eval_root bundle/runs/eval/budget7_{p}_postprocess --paper false"
                          for p in ("paper", "reference")]
    some = study("3", str(reference), VARIANTS="control minus_sparse", REFERENCE_NAME="old", TTA="true")
    assert some.returncode == 0, some.stderr
    assert sum("run training" in line for line in some.stdout.splitlines()) == 2
    assert "--method old " in some.stdout and "--tta false" not in some.stdout
    replica = study("3", str(reference), VARIANTS="control minus_smooth", SEED="1")
    assert replica.returncode == 0, replica.stderr
    lines = replica.stdout.splitlines()
    assert [line.split("--output_dir ")[1].split()[0] for line in lines if "run training" in line] == [
        f"{tmp_path}/runs/b3_control_s1", f"{tmp_path}/runs/b3_minus_smooth_s1"]
    assert all("--seed 1 " in line for line in lines if "run training" in line)
    assert [line.split("--eval_dir ")[1].split()[0] for line in lines if "run evaluating" in line] == [
        f"bundle/runs/eval/budget3_{p}_postprocess/replicas/{n}_s1" for n in ("control", "minus_smooth") for p in ("paper", "reference")]
    assert "--method reference " not in replica.stdout  # the reference is a row of seed 0 already
    for args, extra, message in [(("0",), {}, "ITERATIONS=0"), (("5", str(reference)), {"SEED": "one"}, "SEED=one"), (("5", str(tmp_path / "none.pt")), {}, "none.pt: not found"),
                                 (("5", str(reference)), {"VARIANTS": "minus_foo"}, "minus_foo is neither control")]:
        bad = study(*args, **extra)
        assert bad.returncode == 2 and message in bad.stderr and "run training" not in bad.stdout
    # a reference model without tuned post-processing is refused before anything is trained (real python)
    from custom.model.networks import AttentionNet
    from custom.model.checkpoint import save_attention_network

    untuned = save_attention_network(AttentionNet(width=4), tmp_path / "untuned.pt")
    bad = study("5", str(untuned), PYTHON=sys.executable)
    assert bad.returncode == 2 and "REFERENCE_MODEL: " in bad.stderr and "stores no tuned post-processing" in bad.stderr
    assert not (tmp_path / "runs" / "b5_control").exists() and "Traceback" not in bad.stderr


def test_refresh_tables_refills_every_generated_block(tmp_path):
    """scripts/refresh_tables.sh, run on copies of the documents (README.md, the model card, docs/*.md)
    whose every generated block has been blanked, gives back the committed documents: one command
    regenerates all their tables from results/."""
    docs = ["README.md", "bundle/docs/README.md", *(str(p.relative_to(REPO)) for p in sorted((REPO / "docs").glob("*.md")))]
    for rel in (*docs, "scripts/results_table.py", "scripts/refresh_tables.sh"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((REPO / rel).read_bytes())
    (tmp_path / "results").symlink_to(REPO / "results")
    (tmp_path / "custom").symlink_to(REPO / "custom")
    blanked = 0
    for rel in docs:
        doc = tmp_path / rel
        text, n = re.subn(r"(<!-- (\S+) table: generated -->\n).*?(\n<!-- end of \2 table -->)", r"\1stale\3",
                          doc.read_text(), flags=re.S)
        if rel in ("README.md", "bundle/docs/README.md"):
            assert n >= 1 and "| 0." not in text.split("<!-- results table: generated -->")[1].split("<!-- end of")[0]
        doc.write_text(text)
        blanked += n
    proc = subprocess.run(["bash", "scripts/refresh_tables.sh"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    for rel in docs:
        assert (tmp_path / rel).read_text() == (REPO / rel).read_text(), f"{rel}: a block refresh_tables.sh does not refill"
    assert blanked >= 12
    proc = run_script("results_table.py", "--refresh_all")
    assert proc.returncode != 0 and "--refresh_all: name the Markdown file to refill with --into." in proc.stderr
    (tmp_path / "plain.md").write_text("no generated blocks here\n")
    proc = run_script("results_table.py", "--refresh_all", "--into", str(tmp_path / "plain.md"))
    assert proc.returncode != 0 and "no '<!-- NAME table: generated -->' block to refresh" in proc.stderr
    assert (tmp_path / "plain.md").read_text() == "no generated blocks here\n"
