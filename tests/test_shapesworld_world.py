"""ShapesWorld generator: exact rendering, GenEval/GEdit-shaped examples, fixed and disjoint splits."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from danceopd_diffusers.shapesworld import (
    EDIT_CATEGORIES,
    EVAL_EDIT_PER_CATEGORY,
    EVAL_T2I_PER_CATEGORY,
    LOCAL_EDIT_CATEGORIES,
    OBJECT_COLOURS,
    PALETTE,
    SHAPES,
    SIZES,
    T2I_CATEGORIES,
    Obj,
    Scene,
    build_dataset,
    build_edit_dataset,
    build_t2i_dataset,
    edit_mask,
    edit_rows,
    make_edit_example,
    make_t2i_example,
    object_mask,
    relative_position,
    render,
    save_dataset_to_folder,
    t2i_rows,
)
from danceopd_diffusers.shapesworld.world import (
    BACKGROUND_COLOURS,
    GAP,
    MARGIN,
    NEGATIVE_BACKGROUNDS,
    object_bbox,
)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def _colours_in(img: Image.Image) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in _pixels(img).reshape(-1, 3)}


def _random_scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    cats = list(T2I_CATEGORIES)
    return [make_t2i_example(cats[i % len(cats)], rng)["scene"] for i in range(n)]


@pytest.fixture(scope="module")
def eval_t2i() -> list[dict]:
    return t2i_rows("eval")


@pytest.fixture(scope="module")
def eval_edits() -> list[dict]:
    return edit_rows("eval")


def test_vocabulary_is_rich_enough_and_palette_well_separated():
    assert len(SHAPES) >= 4 and len(OBJECT_COLOURS) >= 6 and len(SIZES) >= 2
    rgb = np.array(list(PALETTE.values()), dtype=float)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert d.min() >= 100  # far apart, so nearest-colour labelling is unambiguous
    assert not set(OBJECT_COLOURS) & set(BACKGROUND_COLOURS)


@pytest.mark.parametrize("size", [64, 96, 128])
def test_render_is_exact_palette_and_sized(size):
    for scene in _random_scenes(20, seed=size):
        for style in ("solid", "outline"):
            img = render(scene, size, style)
            assert img.size == (size, size) and img.mode == "RGB"
            allowed = {PALETTE[scene.background]} | {PALETTE[o.colour] for o in scene.objects}
            assert _colours_in(img) <= allowed  # no anti-aliasing: exact palette colours only


def test_render_rejects_small_or_unknown():
    scene = Scene("black", [Obj("circle", "red", "small", 0.5, 0.5)])
    with pytest.raises(ValueError):
        render(scene, 32)
    with pytest.raises(ValueError):
        render(scene, 64, style="striped")
    with pytest.raises(ValueError):
        render(Scene("black", [Obj("hexagon", "red", "small", 0.5, 0.5)]), 64)


def test_every_shape_and_size_draws_its_full_footprint():
    for shape in SHAPES:
        for size_name in SIZES:
            obj = Obj(shape, "red", size_name, 0.5, 0.5)
            m = object_mask(obj, 64)
            x0, y0, x1, y1 = object_bbox(obj, 64)
            ys, xs = np.nonzero(m)
            assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
            assert xs.max() - xs.min() + 1 == SIZES[size_name]  # full width at 64 px
            img = render(Scene("black", [obj]), 64)
            assert (np.all(_pixels(img) == PALETTE["red"], axis=-1) == m).all()


def test_random_scenes_keep_margin_and_gap():
    for scene in _random_scenes(300, seed=1):
        assert 1 <= len(scene.objects) <= 4
        boxes = [object_bbox(o, 64) for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert min(x0, y0) >= MARGIN and max(x1, y1) <= 64 - MARGIN
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                gap_x = max(b[0] - a[2], a[0] - b[2])
                gap_y = max(b[1] - a[3], a[1] - b[3])
                assert max(gap_x, gap_y) >= GAP


def test_negative_style_is_rgb_complement():
    for scene in _random_scenes(30, seed=2):
        scene.background = NEGATIVE_BACKGROUNDS[len(scene.objects) % 2]  # black or white: exact complement
        solid, neg = _pixels(render(scene, 64)), _pixels(render(scene, 64, "negative"))
        assert (neg.astype(int) == 255 - solid.astype(int)).all()


def test_outline_style_keeps_only_a_ring():
    centres = [(0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7)]
    scene = Scene("gray", [Obj(s, "blue", "small", x, y) for s, (x, y) in zip(SHAPES, centres, strict=True)])
    solid = np.all(_pixels(render(scene, 64)) == PALETTE["blue"], axis=-1)
    ring = np.all(_pixels(render(scene, 64, "outline")) == PALETTE["blue"], axis=-1)
    assert (ring <= solid).all() and ring.sum() < 0.8 * solid.sum()


def test_relative_position_follows_geneval_rule():
    a, b = (0, 0, 10, 10), (30, 2, 40, 12)
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    assert relative_position((0, 0, 10, 10), (1, 30, 11, 40)) == {"above"}
    assert relative_position((1, 30, 11, 40), (0, 0, 10, 10)) == {"below"}
    # Offsets smaller than 0.1 * (summed widths) are no relation at all.
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()
    # Diagonal: both relations hold.
    assert relative_position((0, 0, 10, 10), (40, 40, 50, 50)) == {"left of", "above"}


def _scene_satisfies(spec: dict) -> bool:
    """Check GenEval metadata directly on the ground-truth scene (no image analysis involved)."""
    objs = Scene.from_dict(spec["scene"]).objects
    groups = []
    for req in spec["include"]:
        found = [o for o in objs if o.shape == req["class"]]
        if len(found) < req["count"]:
            return False
        if "color" in req and sum(o.colour == req["color"] for o in found) < req["count"]:
            return False
        if "position" in req:
            rel, g = req["position"]
            for o in found:
                for t in groups[g]:
                    if rel not in relative_position(object_bbox(o, 64), object_bbox(t, 64)):
                        return False
        groups.append(found)
    return all(sum(o.shape == r["class"] for o in objs) < r["count"] for r in spec["exclude"])


def test_t2i_examples_mirror_geneval(eval_t2i):
    assert len(eval_t2i) == 6 * EVAL_T2I_PER_CATEGORY == 96
    assert Counter(r["category"] for r in eval_t2i) == {c: EVAL_T2I_PER_CATEGORY for c in T2I_CATEGORIES}
    for r in eval_t2i:
        spec = json.loads(r["spec"])
        assert r["task"] == "t2i" and r["source_image"] is None and r["prompt"].startswith("a photo of ")
        assert spec["tag"] == r["category"] and spec["prompt"] == r["prompt"]
        assert _scene_satisfies(spec), r["prompt"]
        assert (_pixels(r["target_image"]) == _pixels(render(Scene.from_dict(spec["scene"]), 64))).all()
        n_named = sum(req["count"] for req in spec["include"])
        assert len(spec["scene"]["objects"]) == n_named  # ground truth holds exactly the named objects
        if r["category"] == "counting":
            assert spec["exclude"][0]["count"] == spec["include"][0]["count"] + 1
        if r["category"] in ("colors", "color_attr"):
            assert all("color" in req for req in spec["include"])
        if r["category"] in ("two_object", "position", "color_attr"):
            assert len({req["class"] for req in spec["include"]}) == 2


def test_edit_triplets_mirror_gedit(eval_edits):
    assert len(eval_edits) == 6 * EVAL_EDIT_PER_CATEGORY == 48
    assert Counter(r["category"] for r in eval_edits) == {c: EVAL_EDIT_PER_CATEGORY for c in EDIT_CATEGORIES}
    styles = set()
    for r in eval_edits:
        spec = json.loads(r["spec"])
        src, tgt = _pixels(r["source_image"]), _pixels(r["target_image"])
        mask = edit_mask(spec)
        assert mask.dtype == bool and mask.shape == (64, 64)
        assert spec["instruction"] == r["prompt"] and spec["category"] == r["category"]
        if r["category"] in LOCAL_EDIT_CATEGORIES:
            assert r["task"] == "local_edit" and spec["kind"] == "local"
            changed = np.any(src != tgt, axis=-1)
            assert changed.any() and not (changed & ~mask).any()  # the edit stays inside its mask
            assert mask.mean() < 0.4
        else:
            assert r["task"] == "global_edit" and spec["kind"] == "global" and mask.all()
            styles.add(spec["target_style"])
            before = Scene.from_dict(spec["source_scene"])
            after = Scene.from_dict(spec["target_scene"])
            assert before.objects == after.objects  # global edits keep the layout
        expected = render(Scene.from_dict(spec["target_scene"]), 64, spec["target_style"])
        assert (tgt == _pixels(expected)).all()
    assert styles == {"solid", "outline", "negative"}


def test_edit_instructions_name_unique_objects():
    rng = np.random.default_rng(5)
    for _ in range(50):
        for cat in ("subject_replace", "color_alter", "subject_remove"):
            ex = make_edit_example(cat, rng)
            pairs = [(o.shape, o.colour) for o in ex["source_scene"].objects]
            assert len(pairs) == len(set(pairs))
            named = ex["edit"].get("object") or ex["edit"]["old"]
            assert (named["shape"], named["colour"]) in pairs
        ex = make_edit_example("subject_add", rng)
        assert len(ex["target_scene"].objects) == len(ex["source_scene"].objects) + 1


def test_splits_have_fixed_sizes_and_columns():
    ds = build_dataset("eval")
    assert ds.column_names == ["prompt", "task", "category", "source_image", "target_image", "spec"]
    assert len(ds) == 96 + 48
    assert Counter(ds["task"]) == {"t2i": 96, "local_edit": 32, "global_edit": 16}
    assert ds[0]["source_image"] is None and isinstance(ds[0]["target_image"], Image.Image)
    assert isinstance(ds[-1]["source_image"], Image.Image)
    assert len(build_edit_dataset("eval", kind="global")) == 16
    assert len(build_dataset("eval", tasks=("local_edit",))) == 32
    assert len(build_t2i_dataset("train", n_per_category=3)) == 18
    with pytest.raises(ValueError):
        build_dataset("test")
    with pytest.raises(ValueError):
        build_edit_dataset("eval", kind="both")


def _fingerprint(rows: list[dict]) -> list[tuple]:
    return [
        (
            r["prompt"],
            r["spec"],
            r["target_image"].tobytes(),
            r["source_image"] and r["source_image"].tobytes(),
        )
        for r in rows
    ]


def test_generation_is_deterministic_and_prefix_stable(eval_t2i, eval_edits):
    assert _fingerprint(t2i_rows("eval")) == _fingerprint(eval_t2i)
    assert _fingerprint(edit_rows("eval")) == _fingerprint(eval_edits)
    a, b = t2i_rows("train", 12), t2i_rows("train", 12)
    assert _fingerprint(a) == _fingerprint(b)
    short = t2i_rows("train", 5)
    assert _fingerprint(short) == [f for i, f in enumerate(_fingerprint(a)) if i % 12 < 5]
    assert _fingerprint(t2i_rows("train", 5, seed=1)) != _fingerprint(short)  # seed selects another draw


def _keys(rows: list[dict]) -> set[str]:
    out = set()
    for r in rows:
        spec = json.loads(r["spec"])
        spec.pop("size")
        out.add(json.dumps(spec, sort_keys=True))
    return out


def test_train_and_eval_are_disjoint(eval_t2i, eval_edits):
    train_t2i = t2i_rows("train", 150)
    train_edit = edit_rows("train", n_per_category=60)
    assert not _keys(train_t2i) & _keys(eval_t2i)
    assert not _keys(train_edit) & _keys(eval_edits)
    eval_images = {r["target_image"].tobytes() for r in eval_t2i}
    assert not eval_images & {r["target_image"].tobytes() for r in train_t2i}
    assert len(_keys(train_t2i)) > 0.9 * len(train_t2i)  # train is diverse, not a few repeated scenes


def test_bigger_images_render_the_same_scene():
    rows = t2i_rows("eval", n_per_category=2, size=128)
    assert all(r["target_image"].size == (128, 128) for r in rows)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in t2i_rows("eval", n_per_category=2)]


def test_save_dataset_to_folder_writes_relative_pngs(tmp_path):
    ds = build_dataset("eval", n_per_category=2)
    meta = save_dataset_to_folder(ds, tmp_path / "sw")
    with open(meta, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == len(ds) == 12 + 12
    for rec, row in zip(lines, ds, strict=True):
        assert {k: rec[k] for k in ("prompt", "task", "category", "spec")} == {
            k: row[k] for k in ("prompt", "task", "category", "spec")
        }
        assert not rec["target_image"].startswith("/")
        img = Image.open(tmp_path / "sw" / rec["target_image"])
        assert (np.asarray(img.convert("RGB")) == _pixels(row["target_image"])).all()
        if row["task"] == "t2i":
            assert rec["source_image"] is None
        else:
            assert (tmp_path / "sw" / rec["source_image"]).is_file()


def test_prepare_buckets_are_readable_by_the_script_and_all_reuses_their_images(tmp_path):
    from danceopd_diffusers.data import DataColumns, TaskBuckets, load_training_dataset
    from danceopd_diffusers.shapesworld.prepare import write_buckets

    counts = write_buckets(tmp_path, ["t2i", "local", "global", "all", "edits"], 2, workers=2)
    assert counts == {"t2i": 12, "local": 8, "global": 4, "all": 24, "edits": 12}
    assert not (tmp_path / "data" / "edits" / "images").exists()
    assert not (tmp_path / "data" / "all" / "images").exists()
    ds, base = load_training_dataset(str(tmp_path / "data" / "all" / "metadata.jsonl"))
    buckets = TaskBuckets(ds, DataColumns(), base)
    assert {k: len(v) for k, v in buckets.buckets.items()} == {"t2i": 12, "local_edit": 8, "global_edit": 4}
    assert buckets.images([buckets.buckets["t2i"][0]], "target_image")[0].size == (64, 64)
    first_edit = buckets.buckets["local_edit"][0]
    source = buckets.images([first_edit], "source_image")[0]
    # the same row as the in-memory generator's, whatever the worker count
    expected = build_dataset("train", tasks=("local_edit",), n_per_category=2)[0]["source_image"]
    assert np.array_equal(np.asarray(source), np.asarray(expected.convert("RGB")))
