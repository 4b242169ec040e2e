"""Recipes in the package, --data and its split, --checkpoint's model and head, class names in every
checkpoint, and class folders mapped to a model's classes by name (issue 23).

Data: class folders with real names, made from scikit-learn's handwritten digits at 32 px; the
model is hrnet-w18-small, a few steps, so each training here takes seconds on a CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import hrnet
from hrnet.cli import main as hrnet_main
from hrnet.data import ImageDataset, eval_transform, imagenet_names
from hrnet.data.dataset import DatasetError, load_split, split_per_class
from hrnet.training.config import load_config
from hrnet.training.recipes import RECIPES_DIR, recipe_names
from hrnet.training.state import checkpoints, load_state

SRC = Path(hrnet.__file__).resolve().parent.parent
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TINY = ["--set", "data.batch_size=4", "--set", "schedule.epochs=1", "--set", "data.workers=0"]
SCRATCH = ["--set", "model.pretrained=false", "--set", "model.name=hrnet-w18-small", "--set", "data.input_size=32"]


def make_photos(root: Path, classes: tuple[str, ...] = ("bird", "cat", "dog"), per_class: int = 6) -> Path:
    """``root/<name>/*.png``: digit k's scans under the k-th name."""
    from sklearn.datasets import load_digits

    from hrnet.data.digits import digit_image

    digits = load_digits()
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in [i for i, t in enumerate(digits.target) if t == k % 10][:per_class]:
            digit_image(digits.images[i], 32).save(root / name / f"{i}.png")
    return root


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = hrnet_main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HRNET_OFFLINE", "1")


# ---- recipes -----------------------------------------------------------------------------------

def test_recipes_lists_every_packaged_recipe_and_prints_one(capsys):
    files = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert files == recipe_names() and {"digits", "finetune", "imagenet"} <= set(files)
    rc, out, _ = cli(capsys, "recipes")
    assert rc == 0 and [line.split()[0] for line in out.splitlines()] == files
    rc, out, _ = cli(capsys, "recipes", "--json")
    rows = json.loads(out)
    for row in rows:  # the description is the file's first comment line
        first = next(line for line in Path(row["path"]).read_text().splitlines() if line.startswith("#"))
        assert first.lstrip("# ").rstrip(":") == row["description"] != ""
    rc, out, _ = cli(capsys, "recipes", "finetune")
    assert rc == 0 and out == (RECIPES_DIR / "finetune.yaml").read_text()


def test_a_printed_recipe_runs_as_a_file_and_a_name_as_the_packaged_one(tmp_path, capsys):
    _, text, _ = cli(capsys, "recipes", "finetune")
    (tmp_path / "my.yaml").write_text(text)
    assert load_config(tmp_path / "my.yaml") == load_config("finetune")
    assert load_config("finetune").data.val_fraction == 0.15 and load_config("finetune").data.val is None
    rc, _, err = cli(capsys, "train", "finetunee")
    assert rc == 1 and err.count("\n") == 1 and "no such recipe" in err and "digits, finetune, imagenet" in err


@pytest.mark.slow
def test_recipe_names_resolve_from_another_directory_after_install(tmp_path):
    """The console script, run where no configs/ folder is: the recipe comes from the package."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HRNET_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).parent / "hrnet"
    printed = subprocess.run([str(script), "recipes", "digits"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
    assert printed.returncode == 0 and printed.stdout == (RECIPES_DIR / "digits.yaml").read_text()
    make_photos(tmp_path / "photos")
    run = subprocess.run([str(script), "train", "finetune", "--data", "photos", *SCRATCH, *TINY, "--set",
                          "output.dir=runs/ft", "--json", "-q"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["class_names"] == ["bird", "cat", "dog"] and result["start"] == "random"
    assert (tmp_path / "runs" / "ft" / "best.safetensors").is_file()
    assert "Warning" not in run.stderr


# ---- the split ---------------------------------------------------------------------------------

def test_the_split_is_per_class_reproducible_and_seeded(tmp_path):
    data = ImageDataset(make_photos(tmp_path / "p", per_class=20))
    a, b = split_per_class(data, 0.15, seed=0), split_per_class(data, 0.15, seed=0)
    assert a == b
    assert sorted(a["train"] + a["val"]) == sorted(data.relative(p) for p, _ in data.samples)
    assert not set(a["train"]) & set(a["val"])
    for name in ("bird", "cat", "dog"):  # round(20 x 0.15) = 3 of each class
        assert sum(f.startswith(name + "/") for f in a["val"]) == 3
    assert split_per_class(data, 0.15, seed=1)["val"] != a["val"]


@pytest.mark.slow
def test_data_dir_is_split_into_the_run_dir_and_resume_reuses_it(tmp_path, capsys):
    photos = make_photos(tmp_path / "photos", per_class=8)
    run = tmp_path / "run"
    args = ["train", "finetune", "--data", str(photos), "--val-fraction", "0.25", *SCRATCH, *TINY,
            "--set", f"output.dir={run}", "-q"]
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 6 and len(split["train"]) == 18 and split["classes"] == ["bird", "cat", "dog"]
    assert "val top-1" in out
    # a new image in the folder does not move the split of a resumed run
    shutil.copy(next((photos / "cat").glob("*.png")), photos / "cat" / "new.png")
    rc, _, err = cli(capsys, *args[:-1], "--set", "schedule.epochs=2", "--resume", "-q")
    assert rc == 0, err
    assert json.loads((run / "split.json").read_text()) == split
    val = load_split(run / "split.json", "val")
    assert sorted(val.relative(p) for p, _ in val.samples) == sorted(split["val"])


@pytest.mark.slow
def test_data_dir_with_train_and_val_folders_uses_them(tmp_path, capsys):
    make_photos(tmp_path / "pets" / "train")
    make_photos(tmp_path / "pets" / "val", classes=("cat", "dog"), per_class=2)  # a subset, labelled by name
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "finetune", "--data", str(tmp_path / "pets"), *SCRATCH, *TINY,
                     "--set", f"output.dir={run}", "-q")
    assert rc == 0, err
    assert not (run / "split.json").exists()
    saved = load_config(run / "config.yaml")
    assert (saved.data.train, saved.data.val) == (str(tmp_path / "pets" / "train"), str(tmp_path / "pets" / "val"))


# ---- --checkpoint, heads and names -------------------------------------------------------------

def _checkpoint(path: Path, num_classes: int, names=None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = hrnet.create_model("hrnet-w18-small", num_classes=num_classes)
    model.eval_cfg = hrnet.models.EvalConfig(input_size=32, resize_size=36)
    model.class_names = tuple(names) if names else None
    hrnet.save_checkpoint(model, path)
    return model


@pytest.mark.slow
def test_checkpoint_gives_model_and_input_size_and_a_new_head_says_so(tmp_path, capsys):
    _checkpoint(tmp_path / "w.safetensors", 10)
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "finetune", "--data", str(make_photos(tmp_path / "photos")), "--checkpoint",
                     str(tmp_path / "w.safetensors"), *TINY, "--set", f"output.dir={run}")
    assert rc == 0, err
    saved = load_config(run / "config.yaml")
    assert (saved.model.name, saved.data.input_size) == ("hrnet-w18-small", 32)  # no --set needed
    notes = [line for line in err.splitlines() if "head" in line]
    assert notes == [f"hrnet: {tmp_path / 'w.safetensors'}: its 10-class head replaced by a new 3-class head for "
                     "the data's classes"]


@pytest.mark.slow
def test_a_head_whose_names_match_is_kept_mapped_by_name(tmp_path, capsys):
    start = _checkpoint(tmp_path / "w.safetensors", 3, names=("dog", "bird", "cat"))
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "finetune", "--data", str(make_photos(tmp_path / "photos")), "--checkpoint",
                     str(tmp_path / "w.safetensors"), *TINY, "--set", "optim.lr=1e-30",
                     "--set", "train.label_smoothing=0", "--set", f"output.dir={run}")
    assert rc == 0, err
    assert "replaced" not in err and "matched by name" in err
    with safe_open(run / "best.safetensors", "pt") as f:
        weight = f.get_tensor("classifier.weight")
        names = json.loads(f.metadata()["class_names"])
    assert names == ["bird", "cat", "dog"]  # the folders' order
    old = start.classifier.weight.detach()
    assert torch.allclose(weight, old[[1, 2, 0]], atol=1e-6)  # bird, cat, dog rows of (dog, bird, cat)
    state = load_state(checkpoints(run / "checkpoints")[-1])
    assert state["class_names"] == ["bird", "cat", "dog"]
    assert hrnet.create_model("hrnet-w18-small", checkpoint=run / "best.safetensors").class_names == \
        ("bird", "cat", "dog")


# ---- class folders mapped by name --------------------------------------------------------------

def test_a_folder_the_model_does_not_know_is_refused_naming_it(tmp_path):
    photos = make_photos(tmp_path / "p", classes=("bird", "cat", "emu"), per_class=1)
    with pytest.raises(DatasetError, match=r"folder 'emu' is not one of the model's 3 classes \(bird, cat, dog\)"):
        ImageDataset(photos, class_names=("bird", "cat", "dog"))
    with pytest.raises(DatasetError, match="3 class folders, but the model has 10 classes and no class names"):
        ImageDataset(photos, num_classes=10)
    assert ImageDataset(photos, num_classes=3).classes == ["bird", "cat", "emu"]
    with pytest.raises(DatasetError, match=r"folder 'bird' is neither an ImageNet wnid nor one of the model's "
                                           r"ImageNet class names; 2 other folders neither; .* \(n01440764, n01443537"):
        ImageDataset(photos, class_names=imagenet_names())


@torch.no_grad()
def _predictions(model, dataset) -> dict[str, tuple[int, int]]:
    """{relative path: (label, predicted index)} of every image, one at a time."""
    out = {}
    for i in range(len(dataset)):
        sample = dataset[i]
        out[dataset.relative(dataset.samples[i][0])] = (sample.label, model(sample.image[None]).argmax(1).item())
    return out


@pytest.mark.slow
def test_eval_of_a_subset_folder_equals_the_full_accuracy_restricted_to_it(tmp_path, capsys):
    full = make_photos(tmp_path / "full", classes=NAMES, per_class=4)
    run = tmp_path / "run"  # a model whose predictions depend on the image: 1 epoch on these digits
    rc, _, err = cli(capsys, "train", "finetune", "--data", str(full), "--val-fraction", "0", *SCRATCH, *TINY,
                     "--set", f"output.dir={run}", "-q")
    assert rc == 0, err
    model = hrnet.create_model("hrnet-w18-small", checkpoint=run / "best.safetensors").eval()
    assert model.class_names == tuple(sorted(NAMES))
    tf = eval_transform(model)
    whole = _predictions(model, ImageDataset(full, transform=tf, class_names=model.class_names))
    keep = ("one", "three", "four", "six", "seven", "eight", "nine")
    subset = tmp_path / "subset"
    for name in keep:
        shutil.copytree(full / name, subset / name)
    part = _predictions(model, ImageDataset(subset, transform=tf, class_names=model.class_names))
    # independently: the full folder's per-image results, restricted to the kept classes
    expected = [pred == model.class_names.index(path.split("/")[0]) for path, (_, pred) in whole.items()
                if path.split("/")[0] in keep]
    got = [label == pred for label, pred in part.values()]
    assert len(got) == len(expected) == 28
    assert sum(got) == sum(expected)
    assert part == {p: v for p, v in whole.items() if p.split("/")[0] in keep}
    # and `hrnet eval` itself (the funnel) labels the subset by name, and refuses a folder it does not know
    result = hrnet.evaluate("hrnet-w18-small", subset, checkpoint=run / "best.safetensors", batch_size=7)
    assert result["n"] == 28 and result["top1"] == pytest.approx(100.0 * sum(expected) / 28)
    (subset / "emu").mkdir()
    shutil.copy(next((subset / "one").iterdir()), subset / "emu" / "x.png")
    rc, _, err = cli(capsys, "eval", "hrnet-w18-small", "--checkpoint", str(run / "best.safetensors"),
                     "--data", str(subset))
    assert rc == 1 and err.count("\n") == 1 and "folder 'emu' is not one of the model's 10 classes" in err
