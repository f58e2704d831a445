"""ShapesWorld scorer: ground truth scores (near) perfectly, wrong or degenerate images score low.

Thresholds stated in each test: ground truth >= 0.99 GenEval overall and >= 9.9 GEdit average; wrong colour /
count / position, blank and noise images: T2I accuracy <= 0.05; unchanged, noise and unrelated outputs for
edits: average <= 0.5; a local edit that also repaints the background: average <= 1.5. The audit's lenient
anchors (a background change that also resizes, moves or outlines every object or repaints only part of the
background, a removal that leaves a ghost) score 0; harmless variations (blur sigma <= 1, shifts <= 2 px, JPEG
quality >= 75, colour jitter) keep every category >= 9 (style change >= 7.5 under JPEG: see the test).
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from danceopd_diffusers.shapesworld import (
    EDIT_CATEGORIES,
    LOCAL_EDIT_CATEGORIES,
    OBJECT_COLOURS,
    SHAPES,
    T2I_CATEGORIES,
    Obj,
    Scene,
    analyze,
    connected_components,
    edit_rows,
    make_t2i_example,
    object_mask,
    render,
    score_edit,
    score_t2i,
    summarize_edit,
    summarize_t2i,
    t2i_rows,
)
from danceopd_diffusers.shapesworld.world import (
    BACKGROUND_COLOURS,
    NEGATIVE_BACKGROUNDS,
    PALETTE,
    binary_dilate,
)


@pytest.fixture(scope="module")
def eval_t2i() -> list[dict]:
    return t2i_rows("eval")


@pytest.fixture(scope="module")
def eval_edits() -> list[dict]:
    return edit_rows("eval")


def _degrade(img: Image.Image, blur: float, sigma: float, seed: int) -> Image.Image:
    """Mild generative-model-like degradation: Gaussian blur plus Gaussian pixel noise."""
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, dtype=np.float64)
    arr = arr + np.random.default_rng(seed).normal(0.0, sigma, arr.shape)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))


def _noise(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _random_scenes(n: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    cats = ("single_object", "two_object", "counting", "color_attr")  # 1 to 4 objects, any shape/colour
    scenes = []
    for i in range(n):
        scene = make_t2i_example(cats[i % len(cats)], rng)["scene"]
        scene.background = list(BACKGROUND_COLOURS)[int(rng.integers(len(BACKGROUND_COLOURS)))]
        scenes.append(scene)
    return scenes


def _recovered(scene: Scene, img: Image.Image, size: int, style: str = "solid") -> bool:
    """Every object found once with the right shape, colour, place and fill; nothing else; right background."""
    a = analyze(img)
    neg = {"red": "cyan", "cyan": "red", "green": "magenta", "magenta": "green", "blue": "yellow"}
    neg |= {"yellow": "blue", "black": "white", "white": "black", "gray": "gray"}
    col = (lambda c: neg[c]) if style == "negative" else (lambda c: c)
    if a.background != col(scene.background) or len(a.objects) != len(scene.objects):
        return False
    for o in scene.objects:
        ys, xs = np.nonzero(object_mask(o, size))
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        hits = [
            d
            for d in a.objects
            if d.shape == o.shape
            and d.colour == col(o.colour)
            and abs(d.centroid[0] - cx) <= 0.03 * size
            and abs(d.centroid[1] - cy) <= 0.03 * size
            and d.hollow == (style == "outline")
        ]
        if len(hits) != 1:
            return False
    return True


# ------------------------------------------------------------------------------------------------------------
# Segmentation
# ------------------------------------------------------------------------------------------------------------


def test_connected_components_is_4_connected_and_per_label():
    lab = np.full((8, 8), -1)
    lab[1:3, 1:3] = 0  # block A
    lab[3, 3] = 0  # touches A only diagonally: separate
    lab[1:3, 3:5] = 1  # touches A but another colour: separate
    lab[6, :] = 0  # a long line: one component
    comp = connected_components(lab)
    assert comp[1, 1] == comp[2, 2] != comp[3, 3]
    assert comp[1, 3] not in (comp[1, 1], comp[3, 3])
    assert len(set(comp[6].tolist())) == 1
    assert (comp[lab < 0] == -1).all()
    assert comp.max() + 1 == 4


def test_connected_components_converges_on_a_serpentine():
    n = 41
    lab = np.full((n, n), -1)
    lab[0:n:2, :] = 0  # full rows joined alternately at the right and left end: one very long 1-px path
    for k, row in enumerate(range(1, n, 2)):
        lab[row, n - 1 if k % 2 == 0 else 0] = 0
    lab[0:n:2, n // 2] = 1  # a second colour cuts every row: many pieces, counted by a plain BFS
    comp = connected_components(lab)
    expected = sum(_bfs_count(lab == c) for c in (0, 1))
    assert comp.max() + 1 == expected
    lab[0:n:2, n // 2] = 0
    assert connected_components(lab).max() == 0  # one serpentine component


def _bfs_count(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


@pytest.mark.parametrize("style", ["solid", "outline", "negative"])
def test_segmentation_recovers_200_random_scenes_exactly(style):
    scenes = _random_scenes(200, seed=11)
    if style == "negative":
        for i, s in enumerate(scenes):
            s.background = NEGATIVE_BACKGROUNDS[i % len(NEGATIVE_BACKGROUNDS)]
    failures = [i for i, s in enumerate(scenes) if not _recovered(s, render(s, 64, style), 64, style)]
    assert failures == []
    # every shape x colour was exercised
    assert {(o.shape, o.colour) for s in scenes for o in s.objects} == {
        (s, c) for s in SHAPES for c in OBJECT_COLOURS
    }


@pytest.mark.parametrize("size", [96, 128])
def test_segmentation_at_larger_sizes(size):
    scenes = _random_scenes(20, seed=size)
    for style in ("solid", "outline"):
        assert all(_recovered(s, render(s, size, style), size, style) for s in scenes)


def test_segmentation_is_robust_to_mild_blur_and_noise():
    scenes = _random_scenes(200, seed=12)
    solid = [i for i, s in enumerate(scenes) if not _recovered(s, _degrade(render(s, 64), 0.7, 10, i), 64)]
    assert solid == []  # blur sigma 0.7 px + noise sigma 10/255
    outline = [
        i
        for i, s in enumerate(scenes[:100])
        if not _recovered(s, _degrade(render(s, 64, "outline"), 0.5, 5, i), 64, "outline")
    ]
    assert outline == []  # 2-px outlines tolerate blur sigma 0.5 px + noise sigma 5/255
    shifted = [
        i for i, s in enumerate(scenes[:100]) if not _recovered(s, _shift_colours(render(s, 64), 35), 64)
    ]
    assert shifted == []  # a uniform colour cast of 35/255 per channel


def _shift_colours(img: Image.Image, amount: int) -> Image.Image:
    arr = np.asarray(img, dtype=np.int16) + np.array([amount, -amount, amount // 2], dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def test_noise_and_blank_images_have_no_objects():
    for seed in range(10):
        assert analyze(_noise(seed)).objects == []
    assert analyze(render(Scene("white"), 64)).objects == []


# ------------------------------------------------------------------------------------------------------------
# Text-to-image (GenEval rules)
# ------------------------------------------------------------------------------------------------------------


def test_t2i_ground_truth_scores_perfectly(eval_t2i):
    summary = summarize_t2i([score_t2i(r["target_image"], r["spec"]) for r in eval_t2i])
    assert set(summary) == set(T2I_CATEGORIES) | {"overall"}
    assert summary["overall"] >= 0.99
    assert min(summary[c] for c in T2I_CATEGORIES) >= 0.99


def test_t2i_ground_truth_survives_mild_degradation(eval_t2i):
    res = [score_t2i(_degrade(r["target_image"], 0.7, 8, i), r["spec"]) for i, r in enumerate(eval_t2i)]
    assert summarize_t2i(res)["overall"] >= 0.97


def _variant(row: dict, edit) -> Image.Image:
    spec = json.loads(row["spec"])
    scene = Scene.from_dict(spec["scene"])
    return render(edit(scene, spec), 64)


def _recolour(scene: Scene, spec: dict) -> Scene:
    named = {req["class"]: req["color"] for req in spec["include"] if "color" in req}
    objs = []
    for o in scene.objects:
        wrong = next(c for c in OBJECT_COLOURS if c != named.get(o.shape, o.colour))
        objs.append(Obj(o.shape, wrong, o.size, o.cx, o.cy))
    return Scene(scene.background, objs)


def _miscount(scene: Scene, spec: dict) -> Scene:
    n = spec["include"][0]["count"]
    if n > 2:  # one too few
        return Scene(scene.background, scene.objects[:-1])
    # one too many: place an extra object of the same shape in a free spot
    for y in np.linspace(0.17, 0.83, 7):
        for x in np.linspace(0.17, 0.83, 7):
            extra = Obj(scene.objects[0].shape, "red", "small", float(x), float(y))
            probe = Scene(scene.background, [*scene.objects, extra])
            m = render(probe, 64)
            if len(analyze(m).objects) == n + 1:
                return probe
    raise AssertionError("no free spot")


def _mirror(scene: Scene, spec: dict) -> Scene:
    rel = spec["include"][1]["position"][0]
    horizontal = rel in ("left of", "right of")
    objs = [
        Obj(o.shape, o.colour, o.size, 1 - o.cx if horizontal else o.cx, o.cy if horizontal else 1 - o.cy)
        for o in scene.objects
    ]
    return Scene(scene.background, objs)


@pytest.mark.parametrize(
    "categories, edit",
    [(("colors", "color_attr"), _recolour), (("counting",), _miscount), (("position",), _mirror)],
    ids=["wrong-colour", "wrong-count", "wrong-position"],
)
def test_t2i_wrong_images_fail(eval_t2i, categories, edit):
    rows = [r for r in eval_t2i if r["category"] in categories]
    res = [score_t2i(_variant(r, edit), r["spec"]) for r in rows]
    summary = summarize_t2i(res)
    assert all(summary[c] <= 0.05 for c in categories), summary


def test_t2i_blank_and_noise_fail(eval_t2i):
    blank = render(Scene("gray"), 64)
    assert summarize_t2i([score_t2i(blank, r["spec"]) for r in eval_t2i])["overall"] <= 0.05
    noisy = summarize_t2i([score_t2i(_noise(i), r["spec"]) for i, r in enumerate(eval_t2i)])
    assert noisy["overall"] <= 0.05


def test_t2i_result_explains_failures(eval_t2i):
    row = next(r for r in eval_t2i if r["category"] == "counting")
    res = score_t2i(render(Scene("black"), 64), json.loads(row["spec"]))
    assert res["correct"] is False and res["score"] == 0.0 and "expected" in res["reason"]
    assert res["category"] == "counting" and res["detected"] == []


# ------------------------------------------------------------------------------------------------------------
# Editing (GEdit-style SC / PQ / overall)
# ------------------------------------------------------------------------------------------------------------


def test_edit_ground_truth_scores_perfectly(eval_edits):
    res = [score_edit(r["source_image"], r["target_image"], r["spec"]) for r in eval_edits]
    summary = summarize_edit(res)
    assert set(EDIT_CATEGORIES) | {"local", "global", "average"} == set(summary)
    assert summary["average"] >= 9.9 and min(summary[c] for c in EDIT_CATEGORIES) >= 9.9
    for r in res:
        assert r["success"] == 1.0 and r["preservation"] >= 0.99 and r["on_palette"] >= 0.99
        assert r["overall"] == pytest.approx(10 * min(r["success"], r["preservation"]))


def test_edit_ground_truth_survives_mild_degradation(eval_edits):
    res = [
        score_edit(r["source_image"], _degrade(r["target_image"], 0.5, 5, i), r["spec"])
        for i, r in enumerate(eval_edits)
    ]
    assert summarize_edit(res)["average"] >= 9.5


def test_unchanged_noise_and_unrelated_outputs_score_low(eval_edits):
    unchanged = [score_edit(r["source_image"], r["source_image"], r["spec"]) for r in eval_edits]
    noise = [score_edit(r["source_image"], _noise(i), r["spec"]) for i, r in enumerate(eval_edits)]
    n = len(eval_edits)
    other = [
        score_edit(r["source_image"], eval_edits[(i + n // 2 + 1) % n]["target_image"], r["spec"])
        for i, r in enumerate(eval_edits)
    ]
    for name, res in (("unchanged", unchanged), ("noise", noise), ("unrelated", other)):
        summary = summarize_edit(res)
        assert summary["average"] <= 0.5, (name, summary)
    assert max(r["on_palette"] for r in noise) <= 0.4  # noise is mostly off-palette


def test_over_edited_local_edits_score_low(eval_edits):
    """The right object edited, but the whole background repainted as well."""
    res = []
    for r in eval_edits:
        spec = json.loads(r["spec"])
        if spec["kind"] != "local":
            continue
        scene = Scene.from_dict(spec["target_scene"])
        scene.background = next(b for b in BACKGROUND_COLOURS if b != scene.background)
        out = score_edit(r["source_image"], render(scene, 64), spec)
        assert out["success"] == 1.0  # the instruction itself was followed ...
        res.append(out)
    summary = summarize_edit(res)
    assert summary["average"] <= 1.5, summary  # ... but preservation collapses


def test_moving_untouched_objects_costs_preservation():
    scene = Scene(
        "black", [Obj("circle", "red", "large", 0.3, 0.3), Obj("square", "blue", "large", 0.7, 0.7)]
    )
    spec = {
        "category": "color_alter",
        "kind": "local",
        "instruction": "make the red circle green",
        "source_scene": scene.to_dict(),
        "target_scene": Scene(
            "black", [Obj("circle", "green", "large", 0.3, 0.3), scene.objects[1]]
        ).to_dict(),
        "source_style": "solid",
        "target_style": "solid",
        "edit": {
            "op": "recolor",
            "old": scene.objects[0].to_dict(),
            "new": {**scene.objects[0].to_dict(), "colour": "green"},
        },
        "size": 64,
    }
    src = render(scene, 64)
    good = render(Scene.from_dict(spec["target_scene"]), 64)
    moved = render(
        Scene("black", [Obj("circle", "green", "large", 0.3, 0.3), Obj("square", "blue", "large", 0.7, 0.3)]),
        64,
    )
    assert score_edit(src, good, spec)["overall"] == pytest.approx(10.0)
    moved_score = score_edit(src, moved, json.dumps(spec))
    assert moved_score["success"] == 1.0 and moved_score["preservation"] <= 0.2


def test_added_object_may_go_anywhere(eval_edits):
    row = next(r for r in eval_edits if r["category"] == "subject_add")
    spec = json.loads(row["spec"])
    src = Scene.from_dict(spec["source_scene"])
    new = Obj.from_dict(spec["edit"]["object"])
    placed = 0
    for y in np.linspace(0.2, 0.8, 7):
        for x in np.linspace(0.2, 0.8, 7):
            cand = Obj(new.shape, new.colour, new.size, float(x), float(y))
            out = Scene(src.background, [*src.objects, cand])
            if len(analyze(render(out, 64)).objects) != len(out.objects):
                continue  # touches an existing object: not a clean placement
            res = score_edit(row["source_image"], render(out, 64), spec)
            assert res["overall"] >= 9.9, (x, y, res)
            placed += 1
    assert placed >= 3


def test_edit_output_size_is_normalised(eval_edits):
    row = eval_edits[0]
    spec = json.loads(row["spec"])
    big = render(Scene.from_dict(spec["target_scene"]), 128, spec["target_style"])
    assert score_edit(row["source_image"], big, spec)["overall"] >= 9.5


def test_summaries_average_categories_not_samples():
    t2i = [{"category": "counting", "score": 1.0}] * 3 + [{"category": "colors", "score": 0.0}]
    assert summarize_t2i(t2i) == {"counting": 1.0, "colors": 0.0, "overall": 0.5}
    edits = [
        {"category": "subject_add", "overall": 10.0, "SC": 10.0, "PQ": 10.0},
        {"category": "subject_add", "overall": 10.0, "SC": 10.0, "PQ": 10.0},
        {"category": "color_alter", "overall": 4.0, "SC": 4.0, "PQ": 4.0},
        {"category": "style_change", "overall": 1.0, "SC": 1.0, "PQ": 1.0},
    ]
    s = summarize_edit(edits)
    assert s["local"] == pytest.approx(7.0) and s["global"] == pytest.approx(1.0)
    assert s["average"] == pytest.approx(5.0)
    assert set(LOCAL_EDIT_CATEGORIES) >= {"subject_add", "color_alter"}
    assert Counter(k for k in s) == Counter(
        ["subject_add", "color_alter", "style_change", "local", "global", "average"]
    )


# ------------------------------------------------------------------------------------------------------------
# The audit's probes: lenient anchors fail, a speck costs only its pixels, harmless variations pass
# ------------------------------------------------------------------------------------------------------------

_NEXT_SIZE = {"small": "medium", "medium": "large", "large": "medium"}


def _target_scene(row: dict) -> tuple[dict, Scene]:
    spec = json.loads(row["spec"])
    return spec, Scene.from_dict(spec["target_scene"])


def _bg_change_resized(row: dict) -> Image.Image:
    _, scene = _target_scene(row)
    return render(
        Scene(
            scene.background, [Obj(o.shape, o.colour, _NEXT_SIZE[o.size], o.cx, o.cy) for o in scene.objects]
        )
    )


def _bg_change_moved_5px(row: dict) -> Image.Image:
    _, scene = _target_scene(row)
    step = 5 / 64
    moved = [
        Obj(o.shape, o.colour, o.size, o.cx + (step if o.cx < 0.5 else -step), o.cy) for o in scene.objects
    ]
    return render(Scene(scene.background, moved))


def _bg_change_outlined(row: dict) -> Image.Image:
    return render(_target_scene(row)[1], 64, "outline")


def _bg_change_partial(row: dict) -> Image.Image:
    """The new background on the top 60 % of the image, the old one below."""
    spec, scene = _target_scene(row)
    arr = np.asarray(render(scene)).copy()
    old = np.zeros(arr.shape[:2], dtype=bool)
    old[round(0.6 * 64) :] = True
    old &= (arr == PALETTE[scene.background]).all(-1)
    arr[old] = PALETTE[spec["source_scene"]["background"]]
    return Image.fromarray(arr)


def _remove_leaving_ghost(row: dict) -> Image.Image:
    """The object removed, but its silhouette left in another background colour (on-palette, object-shaped)."""
    spec, scene = _target_scene(row)
    arr = np.asarray(render(scene)).copy()
    ghost = next(b for b in BACKGROUND_COLOURS if b != scene.background)
    arr[object_mask(Obj.from_dict(spec["edit"]["object"]), 64)] = PALETTE[ghost]
    return Image.fromarray(arr)


def _local_plus_outline(row: dict) -> Image.Image:
    """The right local edit, plus a whole-image outline style nobody asked for."""
    return render(_target_scene(row)[1], 64, "outline")


@pytest.mark.parametrize(
    "categories, make, ceiling",
    [
        (("background_change",), _bg_change_resized, 0.0),
        (("background_change",), _bg_change_moved_5px, 0.0),
        (("background_change",), _bg_change_outlined, 0.0),
        (("background_change",), _bg_change_partial, 0.0),
        (("subject_remove",), _remove_leaving_ghost, 0.0),
        (LOCAL_EDIT_CATEGORIES, _local_plus_outline, 4.5),
    ],
    ids=["bg-resized", "bg-moved-5px", "bg-outlined", "bg-partial", "remove-ghost", "local-plus-outline"],
)
def test_lenient_anchors_fail(eval_edits, categories, make, ceiling):
    rows = [r for r in eval_edits if r["category"] in categories]
    res = [score_edit(r["source_image"], make(r), r["spec"]) for r in rows]
    summary = summarize_edit(res)
    assert all(summary[c] <= ceiling for c in categories), summary
    if ceiling == 0.0:
        assert max(r["overall"] for r in res) == 0.0


def test_a_speck_costs_only_its_pixels(eval_edits):
    """A 4x4 object-coloured speck in the background is below the object size: it must not zero preservation,
    even when the edited object was the only one (then no other object's core carries the object term)."""
    checked = only_object = 0
    for r in eval_edits:
        spec, scene = _target_scene(r)
        if spec["kind"] != "local":
            continue
        src = Scene.from_dict(spec["source_scene"])
        occupied = np.zeros((64, 64), dtype=bool)
        for o in src.objects + scene.objects:
            occupied |= object_mask(o, 64)
        free = ~binary_dilate(occupied, 4)
        y, x = next(
            (y, x) for y in range(4, 56, 2) for x in range(4, 56, 2) if free[y : y + 4, x : x + 4].all()
        )
        arr = np.asarray(r["target_image"]).copy()
        edited = spec["edit"].get("object") or spec["edit"]["old"]
        arr[y : y + 4, x : x + 4] = PALETTE[edited["colour"]]
        res = score_edit(r["source_image"], Image.fromarray(arr), spec)
        assert res["overall"] >= 9.5, (r["prompt"], res)
        checked += 1
        only_object += len(src.objects) == 1 and spec["edit"]["op"] != "add"
    assert checked == 32 and only_object >= 3


def _shift(img: Image.Image, d: int) -> Image.Image:
    arr = np.asarray(img)
    out = np.empty_like(arr)
    out[:] = arr[0, 0]  # the border is background in every scene
    out[d:, d:] = arr[:-d, :-d]
    return Image.fromarray(out)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _jitter(img: Image.Image, amount: int, seed: int) -> Image.Image:
    """Each palette colour moved by its own random offset in [-amount, amount] per channel."""
    arr = np.asarray(img).astype(np.int16)
    out = arr.copy()
    rng = np.random.default_rng(seed)
    for rgb in PALETTE.values():
        m = (arr == rgb).all(-1)
        out[m] = np.clip(arr[m] + rng.integers(-amount, amount + 1, 3), 0, 255)
    return Image.fromarray(out.astype(np.uint8))


@pytest.mark.parametrize(
    "variant",
    [
        lambda img, i: img.filter(ImageFilter.GaussianBlur(0.5)),
        lambda img, i: img.filter(ImageFilter.GaussianBlur(1.0)),
        lambda img, i: _shift(img, 1),
        lambda img, i: _shift(img, 2),
        lambda img, i: _jpeg(img, 75),
        lambda img, i: _jpeg(img, 90),
        lambda img, i: _jitter(img, 15, i),
        lambda img, i: _jitter(img, 30, i),
    ],
    ids=["blur-0.5", "blur-1.0", "shift-1px", "shift-2px", "jpeg-75", "jpeg-90", "jitter-15", "jitter-30"],
)
def test_harmless_variations_of_the_target_still_pass(eval_edits, variant):
    res = [
        score_edit(r["source_image"], variant(r["target_image"], i), r["spec"])
        for i, r in enumerate(eval_edits)
    ]
    summary = summarize_edit(res)
    # JPEG's 4:2:0 chroma subsampling turns a 2-px blue outline on black into dark blue, a background colour:
    # the outline is gone for any reader of colours, so outline samples may fail there.
    floors = {c: 9.0 for c in EDIT_CATEGORIES} | {"style_change": 7.5}
    assert all(summary[c] >= floors[c] for c in EDIT_CATEGORIES), summary
    assert summary["average"] >= 9.3, summary
