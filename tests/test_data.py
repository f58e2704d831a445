"""Data loading and the size policy of edits."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from danceopd_diffusers.config import RouteSpec
from danceopd_diffusers.data import (
    DataColumns,
    TaskBuckets,
    fit_image,
    images_to_tensor,
    load_training_dataset,
)
from danceopd_diffusers.families import edit_size


def test_edit_size_keeps_aspect_and_area():
    assert edit_size(1024, 1024, 512) == (512, 512)
    h, w = edit_size(1600, 900, 1024)  # landscape 16:9
    assert h % 16 == 0 and w % 16 == 0 and w > h
    assert abs(w / h - 16 / 9) < 0.05 and abs(h * w - 1024**2) / 1024**2 < 0.05


def test_fit_image_covers_and_centre_crops():
    img = Image.new("RGB", (40, 20), "red")
    img.paste(Image.new("RGB", (10, 20), "blue"), (0, 0))  # a blue strip on the left edge
    out = fit_image(img, 16, 16)
    assert out.size == (16, 16)
    assert np.asarray(out)[8, 8].tolist() == [
        255,
        0,
        0,
    ]  # the centre survives, the edge strip is cropped away
    t = images_to_tensor([img], 16, 32)
    assert t.shape == (1, 3, 16, 32) and t.min() >= -1 and t.max() <= 1


def test_jsonl_with_relative_images_and_buckets(tmp_path):
    (tmp_path / "d" / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8), "green").save(tmp_path / "d" / "img" / "a.png")
    rows = [
        {"prompt": "p1", "task": "edit", "source_image": "img/a.png", "target_image": "img/a.png"},
        {"prompt": "p2", "task": "t2i", "source_image": None, "target_image": "img/a.png"},
    ]
    (tmp_path / "d" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds, base = load_training_dataset(train_data_dir=str(tmp_path / "d"))
    buckets = TaskBuckets(ds, DataColumns(), base)
    assert buckets.buckets == {"edit": [0], "t2i": [1]}
    assert buckets.is_edit_bucket("edit") and not buckets.is_edit_bucket("t2i")
    buckets.check_routes(
        [RouteSpec("x", "t2i"), RouteSpec("y", "edit")],
        need_target=True,
        can_edit=True,
        editing_families=["flux-kontext"],
    )
    img = buckets.images([0], "source_image")[0]
    assert img.size == (8, 8) and img.getpixel((0, 0)) == (0, 128, 0)


def test_imagefolder(tmp_path):
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "prompt": f"p{i}"}) + "\n" for i in range(2))
    )
    ds, base = load_training_dataset(train_data_dir=str(tmp_path))
    buckets = TaskBuckets(ds, DataColumns(), base)
    assert buckets.columns.target_image == "image" and buckets.prompts([1]) == ["p1"]
    buckets.check_routes([RouteSpec("x", "t2i")], need_target=True, can_edit=False, editing_families=[])
