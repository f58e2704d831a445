"""ShapesWorld scenes, renderer and datasets: an offline, exactly scorable miniature of GenEval and GEditBench.

Why a toy world: the DanceOPD paper fuses text-to-image, local-edit and global-edit fields and reports GenEval
(T2I) and GEditBench (editing) numbers. Those benchmarks need large detectors and VLM judges; ShapesWorld keeps
their task structure (GenEval's six prompt categories, GEdit's local/global edit categories) but uses flat,
palette-exact scenes that :mod:`danceopd_diffusers.shapesworld.scorer` can check without any learned model.

Geometry conventions (shared with the scorer):

* a scene is resolution independent: object centres ``cx, cy`` are fractions of the image side on a 1/64 grid,
  object sizes are named (``small``/``medium``/``large``) and map to an even pixel diameter;
* rendering is exact: every pixel is either the background colour or one object colour (no anti-aliasing);
* objects never overlap and keep ``GAP`` pixels (at 64 px) between bounding boxes and ``MARGIN`` pixels from the
  border, so they are separable connected components.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------

# A diamond was tried and dropped: its 2-pixel tips and staircase edges blur into a circle at 64 px. The cross
# is axis aligned like the square, so blur only rounds its corners.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Object colours sit on inset corners of the RGB cube (lo=20, hi=235): pairwise distance >= 215, and lo+hi=255 so
# the photographic negative of an object colour is exactly another object colour.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 20, 20),
    "green": (20, 235, 20),
    "blue": (20, 20, 235),
    "yellow": (235, 235, 20),
    "magenta": (235, 20, 235),
    "cyan": (20, 235, 235),
}
# Background colours are never object colours; every palette pair is >= 107 apart in RGB. (Dark blue/green lie
# half way between black and blue/green, so a blurred blue-on-black edge passes through dark blue; the scorer's
# hysteresis segmentation tolerates that.)
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "white": (235, 235, 235),
    "dark blue": (20, 20, 128),
    "dark green": (20, 128, 20),
}
PALETTE: dict[str, tuple[int, int, int]] = {**OBJECT_COLOURS, **BACKGROUND_COLOURS}
PALETTE_NAMES: tuple[str, ...] = tuple(PALETTE)
PALETTE_RGB: np.ndarray = np.array([PALETTE[name] for name in PALETTE_NAMES], dtype=np.int16)
N_OBJECT_COLOURS: int = len(OBJECT_COLOURS)

# Photographic negative (255 - rgb) by name; only these backgrounds admit an exact in-palette negative.
NEGATIVE_COLOUR: dict[str, str] = {
    "red": "cyan",
    "cyan": "red",
    "green": "magenta",
    "magenta": "green",
    "blue": "yellow",
    "yellow": "blue",
    "black": "white",
    "white": "black",
    "gray": "gray",
}
NEGATIVE_BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray")

# Object diameters in pixels at the reference size of 64 px; scaled (and kept even) for larger images.
REFERENCE_SIZE: int = 64
SIZES: dict[str, int] = {"small": 14, "medium": 18, "large": 22}
MARGIN: int = 3  # pixels (at 64 px) between an object's box and the image border
GAP: int = 4  # pixels (at 64 px) between two objects' boxes
# Pixels (at 64 px) by which an edited object's footprint is dilated in the edit mask.
EDIT_MASK_MARGIN: int = 2
MIN_IMAGE_SIZE: int = 64
# Cross arm width as a fraction of the side (6/8/10 px arms at 64 px): wide enough that an outlined cross still
# has a hole, narrow enough (fill ~0.7) to stay apart from the circle (fill ~0.79).
CROSS_ARM: float = 0.45

STYLES: tuple[str, ...] = ("solid", "outline", "negative")
EDIT_STYLES: tuple[str, ...] = ("outline", "negative")
STYLE_INSTRUCTIONS: dict[str, str] = {
    "outline": "render it as outlines",
    "negative": "invert the colors",
}

T2I_CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
LOCAL_EDIT_CATEGORIES: tuple[str, ...] = ("subject_add", "subject_replace", "color_alter", "subject_remove")
GLOBAL_EDIT_CATEGORIES: tuple[str, ...] = ("background_change", "style_change")
EDIT_CATEGORIES: tuple[str, ...] = LOCAL_EDIT_CATEGORIES + GLOBAL_EDIT_CATEGORIES
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}

# GenEval's relative-position threshold (fraction of the summed box sizes subtracted from the centre offset).
POSITION_THRESHOLD: float = 0.1

TASKS: tuple[str, ...] = ("t2i", "local_edit", "global_edit")
SPLITS: tuple[str, ...] = ("train", "eval")
EVAL_T2I_PER_CATEGORY: int = 16
EVAL_EDIT_PER_CATEGORY: int = 8
TRAIN_T2I_PER_CATEGORY: int = 1000
TRAIN_EDIT_PER_CATEGORY: int = 500
# Seed streams: numpy SeedSequence entropy [BASE_SEED, split code, category code, index, attempt, seed]. The split
# code differs between train and eval, so the two streams never share a generator state.
BASE_SEED: int = 20260627
_SPLIT_CODE: dict[str, int] = {"train": 1, "eval": 2}
_CATEGORY_CODE: dict[str, int] = {c: i for i, c in enumerate(T2I_CATEGORIES + EDIT_CATEGORIES)}


# --------------------------------------------------------------------------------------------------------------
# Scene model
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """One flat object; ``cx``/``cy`` are fractions of the image side so a scene renders at any size."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Obj:
        return cls(str(d["shape"]), str(d["colour"]), str(d["size"]), float(d["cx"]), float(d["cy"]))

    def describe(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    """A background colour plus non-overlapping objects (the structured ground truth behind every image)."""

    background: str
    objects: list[Obj] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(str(d["background"]), [Obj.from_dict(o) for o in d["objects"]])

    def key(self) -> str:
        """Canonical string used to deduplicate scenes across splits."""
        return json.dumps(self.to_dict(), sort_keys=True)


def pixel_diameter(size_name: str, image_size: int) -> int:
    """Even pixel diameter of a named size at ``image_size`` (even so the shape is symmetric on the grid)."""
    d = SIZES[size_name] * image_size / REFERENCE_SIZE
    return max(2, 2 * round(d / 2))


def _check_size(image_size: int) -> None:
    if int(image_size) != image_size or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"ShapesWorld images must be square with side >= {MIN_IMAGE_SIZE}, got {image_size}")


def _scaled(pixels_at_64: int, image_size: int) -> int:
    return max(pixels_at_64, round(pixels_at_64 * image_size / REFERENCE_SIZE))


def object_centre_px(obj: Obj, image_size: int) -> tuple[int, int]:
    """Integer pixel-edge coordinates of the centre; shapes are symmetric around it."""
    return round(obj.cx * image_size), round(obj.cy * image_size)


def object_bbox(obj: Obj, image_size: int) -> tuple[int, int, int, int]:
    """Bounding square ``(x0, y0, x1, y1)`` (x1/y1 exclusive) that the shape is inscribed in."""
    cx, cy = object_centre_px(obj, image_size)
    r = pixel_diameter(obj.size, image_size) // 2
    return cx - r, cy - r, cx + r, cy + r


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Membership of points at offsets (dx, dy) from the centre for a shape of radius ``r`` (exact, no AA)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) < r) & (np.abs(dy) < r)
    if shape == "triangle":  # apex up, base at the bottom of the bounding square
        return (np.abs(dy) < r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":  # plus sign, arms CROSS_ARM of the side wide
        ax, ay = np.abs(dx), np.abs(dy)
        arm = CROSS_ARM * r  # half-width of an arm
        return (ax < r) & (ay < r) & ((ax < arm) | (ay < arm))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def object_mask(obj: Obj, image_size: int) -> np.ndarray:
    """Boolean HxW footprint of a solid object."""
    cx, cy = object_centre_px(obj, image_size)
    r = pixel_diameter(obj.size, image_size) / 2
    coords = np.arange(image_size, dtype=np.float64) + 0.5
    dx = coords[None, :] - cx
    dy = coords[:, None] - cy
    return shape_mask(obj.shape, dx, dy, r)


def _neighbourhood(mask: np.ndarray, iterations: int, erode: bool) -> np.ndarray:
    """8-neighbourhood erosion (all neighbours set) or dilation (any set); outside the image counts as empty."""
    out = mask.astype(bool)
    h, w = out.shape
    for _ in range(iterations):
        p = np.pad(out, 1, constant_values=False)
        acc = np.ones_like(out) if erode else np.zeros_like(out)
        for oy in range(3):
            for ox in range(3):
                window = p[oy : oy + h, ox : ox + w]
                acc = acc & window if erode else acc | window
        out = acc
    return out


def binary_erode(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """8-neighbourhood erosion (outside the image counts as empty)."""
    return _neighbourhood(mask, iterations, erode=True)


def binary_dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """8-neighbourhood dilation, used for edit-mask margins."""
    return _neighbourhood(mask, iterations, erode=False)


def outline_thickness(image_size: int) -> int:
    return _scaled(2, image_size)


def styled_colour(name: str, style: str) -> str:
    """Palette name a colour is drawn with under ``style`` (only ``negative`` changes colours)."""
    if style == "negative":
        if name not in NEGATIVE_COLOUR:
            raise ValueError(f"colour {name!r} has no in-palette negative; use one of {NEGATIVE_BACKGROUNDS}")
        return NEGATIVE_COLOUR[name]
    return name


def render(scene: Scene, size: int = REFERENCE_SIZE, style: str = "solid") -> Image.Image:
    """Render a scene as an exact-palette RGB image.

    ``style``: ``solid`` (filled shapes), ``outline`` (only a ring of ``outline_thickness`` pixels, background
    inside) or ``negative`` (every colour replaced by its RGB complement, which is again a palette colour).
    """
    _check_size(size)
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = PALETTE[styled_colour(scene.background, style)]
    for obj in scene.objects:
        m = object_mask(obj, size)
        if style == "outline":
            m = m & ~binary_erode(m, outline_thickness(size))
        canvas[m] = PALETTE[styled_colour(obj.colour, style)]
    return Image.fromarray(canvas, mode="RGB")


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """GenEval's rule for where box A lies relative to box B (boxes are ``(x0, y0, x1, y1)``).

    Same computation as GenEval's ``relative_position``: the centre offset is shrunk on each axis by
    ``threshold * (width_a + width_b)`` (resp. heights), clipped at 0, and normalised by the raw offset length; a
    relation holds when its axis component exceeds 0.5 ("left of": A's centre is left of B's by that margin;
    image y grows downwards, so "above" means a smaller y).
    """
    a = np.asarray(box_a, dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b, dtype=np.float64).reshape(2, 2)
    centre_a, centre_b = a.mean(axis=0), b.mean(axis=0)
    dim_a, dim_b = np.abs(a[1] - a[0]), np.abs(b[1] - b[0])
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel: set[str] = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


# --------------------------------------------------------------------------------------------------------------
# Random scene construction
# --------------------------------------------------------------------------------------------------------------


class _PlacementError(RuntimeError):
    pass


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _boxes_clear(a: Obj, b: Obj) -> bool:
    """Boxes of a and b (in 1/64 units) are separated by at least GAP on some axis."""
    ra, rb = SIZES[a.size] / 2, SIZES[b.size] / 2
    sep = ra + rb + GAP
    return abs(a.cx - b.cx) * REFERENCE_SIZE >= sep - 1e-9 or abs(a.cy - b.cy) * REFERENCE_SIZE >= sep - 1e-9


def _place(
    rng: np.random.Generator, shape: str, colour: str, size: str, existing: Sequence[Obj], tries: int = 200
) -> Obj:
    """Sample a free, fully visible position on the 1/64 grid (rejection sampling)."""
    r = SIZES[size] // 2
    lo, hi = MARGIN + r, REFERENCE_SIZE - MARGIN - r
    for _ in range(tries):
        x, y = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        cand = Obj(shape, colour, size, x / REFERENCE_SIZE, y / REFERENCE_SIZE)
        if all(_boxes_clear(cand, o) for o in existing):
            return cand
    raise _PlacementError("no free position")


def _random_scene(
    rng: np.random.Generator,
    parts: Sequence[tuple[str, str]],
    background: str | None = None,
    backgrounds: Sequence[str] = tuple(BACKGROUND_COLOURS),
) -> Scene:
    """Place objects with the given (shape, colour) at random sizes/positions; retries the whole layout."""
    bg = background if background is not None else _pick(rng, backgrounds)
    for _ in range(100):
        objs: list[Obj] = []
        try:
            for shape, colour in parts:
                objs.append(_place(rng, shape, colour, _pick(rng, tuple(SIZES)), objs))
        except _PlacementError:
            continue
        return Scene(bg, objs)
    raise RuntimeError("could not place objects")  # unreachable for <= 5 objects at the shipped sizes


def _distinct_parts(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n objects with pairwise distinct (shape, colour), so edit instructions name a unique object."""
    pairs = [(s, c) for s in SHAPES for c in OBJECT_COLOURS]
    idx = rng.choice(len(pairs), size=n, replace=False)
    return [pairs[int(i)] for i in idx]


def _box_px(obj: Obj) -> list[float]:
    return [float(v) for v in object_bbox(obj, REFERENCE_SIZE)]


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def make_t2i_example(category: str, rng: np.random.Generator) -> dict[str, Any]:
    """One GenEval-style prompt, its GenEval metadata (``include``/``exclude``) and a scene satisfying it.

    Categories follow GenEval exactly: single_object / two_object / counting / position name shapes only (the
    colour of each object is free), colors names one coloured object, color_attr two objects of different
    shapes and different named colours. Ground-truth scenes contain exactly the named objects.
    """
    shapes = list(SHAPES)
    colours = list(OBJECT_COLOURS)
    if category == "single_object":
        s = _pick(rng, shapes)
        prompt = f"a photo of a {s}"
        include = [{"class": s, "count": 1}]
        exclude: list[dict[str, Any]] = []
        scene = _random_scene(rng, [(s, _pick(rng, colours))])
    elif category == "two_object":
        a, b = (shapes[int(i)] for i in rng.choice(len(shapes), size=2, replace=False))
        prompt = f"a photo of a {a} and a {b}"
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        exclude = []
        scene = _random_scene(rng, [(a, _pick(rng, colours)), (b, _pick(rng, colours))])
    elif category == "counting":
        s = _pick(rng, shapes)
        n = int(rng.integers(2, 5))
        prompt = f"a photo of {NUMBER_WORDS[n]} {_plural(s)}"
        include = [{"class": s, "count": n}]
        exclude = [{"class": s, "count": n + 1}]
        scene = _random_scene(rng, [(s, _pick(rng, colours)) for _ in range(n)])
    elif category == "colors":
        s, c = _pick(rng, shapes), _pick(rng, colours)
        prompt = f"a photo of a {c} {s}"
        include = [{"class": s, "count": 1, "color": c}]
        exclude = []
        scene = _random_scene(rng, [(s, c)])
    elif category == "position":
        a, b = (shapes[int(i)] for i in rng.choice(len(shapes), size=2, replace=False))
        rel = _pick(rng, RELATIONS)
        prompt = f"a photo of a {a} {rel} a {b}"
        # GenEval order: the reference object B first, then A with position (relation, index of B's group).
        include = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]
        exclude = []
        for _ in range(1000):
            scene = _random_scene(rng, [(a, _pick(rng, colours)), (b, _pick(rng, colours))])
            box_a, box_b = _box_px(scene.objects[0]), _box_px(scene.objects[1])
            # Unambiguous with slack: holds even at twice GenEval's threshold, and is the only relation.
            if rel in relative_position(box_a, box_b, 2 * POSITION_THRESHOLD) and relative_position(
                box_a, box_b
            ) == {rel}:
                break
        else:  # pragma: no cover - the acceptance rate is far above 1/1000
            raise RuntimeError("could not sample a position scene")
    elif category == "color_attr":
        a, b = (shapes[int(i)] for i in rng.choice(len(shapes), size=2, replace=False))
        ca, cb = (colours[int(i)] for i in rng.choice(len(colours), size=2, replace=False))
        prompt = f"a photo of a {ca} {a} and a {cb} {b}"
        include = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
        exclude = []
        scene = _random_scene(rng, [(a, ca), (b, cb)])
    else:
        raise ValueError(f"unknown T2I category {category!r}; expected one of {T2I_CATEGORIES}")
    return {"prompt": prompt, "category": category, "include": include, "exclude": exclude, "scene": scene}


def make_edit_example(category: str, rng: np.random.Generator) -> dict[str, Any]:
    """One GEdit-style edit: instruction, source scene, target scene/style and the structured edit.

    Local edits (add / replace / colour alter / remove) change one object; global edits (background change,
    style change) touch every pixel but must keep the layout. Objects in a source scene have pairwise distinct
    (shape, colour), so "the red square" is always unique.
    """
    colours = list(OBJECT_COLOURS)
    target_style = "solid"
    if category == "subject_add":
        # Lay out source objects and the added one together so there is always room for it.
        parts = [*_distinct_parts(rng, int(rng.integers(1, 4))), (_pick(rng, SHAPES), _pick(rng, colours))]
        tgt = _random_scene(rng, parts)
        src, new = Scene(tgt.background, tgt.objects[:-1]), tgt.objects[-1]
        instruction = f"add a {new.describe()}"
        edit: dict[str, Any] = {"op": "add", "object": new.to_dict()}
    elif category in ("subject_replace", "color_alter", "subject_remove"):
        src = _random_scene(rng, _distinct_parts(rng, int(rng.integers(1, 5))))
        k = int(rng.integers(len(src.objects)))
        old = src.objects[k]
        taken = {(o.shape, o.colour) for o in src.objects}
        if category == "subject_remove":
            tgt = Scene(src.background, [o for i, o in enumerate(src.objects) if i != k])
            instruction = f"remove the {old.describe()}"
            edit = {"op": "remove", "object": old.to_dict()}
        else:
            if category == "subject_replace":
                options = [(s, c) for s in SHAPES for c in colours if s != old.shape and (s, c) not in taken]
            else:
                options = [(old.shape, c) for c in colours if c != old.colour and (old.shape, c) not in taken]
            shape, colour = _pick(rng, options)
            new = Obj(shape, colour, old.size, old.cx, old.cy)
            tgt = Scene(src.background, [new if i == k else o for i, o in enumerate(src.objects)])
            if category == "subject_replace":
                instruction = f"replace the {old.describe()} with a {new.describe()}"
                edit = {"op": "replace", "old": old.to_dict(), "new": new.to_dict()}
            else:
                instruction = f"make the {old.describe()} {colour}"
                edit = {"op": "recolor", "old": old.to_dict(), "new": new.to_dict()}
    elif category == "background_change":
        src = _random_scene(rng, _distinct_parts(rng, int(rng.integers(1, 5))))
        new_bg = _pick(rng, [b for b in BACKGROUND_COLOURS if b != src.background])
        tgt = Scene(new_bg, list(src.objects))
        instruction = f"change the background to {new_bg}"
        edit = {"op": "background", "old": src.background, "new": new_bg}
    elif category == "style_change":
        target_style = _pick(rng, EDIT_STYLES)
        backgrounds = NEGATIVE_BACKGROUNDS if target_style == "negative" else tuple(BACKGROUND_COLOURS)
        src = _random_scene(rng, _distinct_parts(rng, int(rng.integers(1, 5))), backgrounds=backgrounds)
        tgt = Scene(src.background, list(src.objects))
        instruction = STYLE_INSTRUCTIONS[target_style]
        edit = {"op": "style", "style": target_style}
    else:
        raise ValueError(f"unknown edit category {category!r}; expected one of {EDIT_CATEGORIES}")
    kind = "local" if category in LOCAL_EDIT_CATEGORIES else "global"
    return {
        "prompt": instruction,
        "category": category,
        "kind": kind,
        "source_scene": src,
        "target_scene": tgt,
        "target_style": target_style,
        "edit": edit,
    }


def edit_mask(spec: dict[str, Any] | str, size: int | None = None) -> np.ndarray:
    """Boolean HxW mask of the pixels an edit may change (True = may change).

    Local edits: the union of the footprints of the removed/added/replaced object(s), dilated by
    ``EDIT_MASK_MARGIN`` pixels (at 64 px) so a soft object boundary is not counted as a preservation error.
    Global edits: every pixel.
    """
    spec = json.loads(spec) if isinstance(spec, str) else spec
    size = int(size or spec["size"])
    _check_size(size)
    if spec["kind"] == "global":
        return np.ones((size, size), dtype=bool)
    edit = spec["edit"]
    objs = [edit[k] for k in ("object", "old", "new") if k in edit]
    m = np.zeros((size, size), dtype=bool)
    for o in objs:
        m |= object_mask(Obj.from_dict(o), size)
    return binary_dilate(m, _scaled(EDIT_MASK_MARGIN, size))


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


def _rng(split: str, category: str, index: int, attempt: int = 0, seed: int = 0) -> np.random.Generator:
    entropy = [BASE_SEED, _SPLIT_CODE[split], _CATEGORY_CODE[category], index, attempt, seed]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _t2i_key(ex: dict[str, Any]) -> str:
    return ex["prompt"] + "|" + ex["scene"].key()


def _edit_key(ex: dict[str, Any]) -> str:
    return "|".join((ex["prompt"], ex["source_scene"].key(), ex["target_scene"].key(), ex["target_style"]))


@cache
def _eval_keys(category: str) -> frozenset[str]:
    """Keys of the standard eval set; train examples that collide with them are re-drawn."""
    if category in T2I_CATEGORIES:
        return frozenset(
            _t2i_key(make_t2i_example(category, _rng("eval", category, i)))
            for i in range(EVAL_T2I_PER_CATEGORY)
        )
    return frozenset(
        _edit_key(make_edit_example(category, _rng("eval", category, i)))
        for i in range(EVAL_EDIT_PER_CATEGORY)
    )


def _draw(split: str, category: str, index: int, seed: int) -> dict[str, Any]:
    is_t2i = category in T2I_CATEGORIES
    make = make_t2i_example if is_t2i else make_edit_example
    key = _t2i_key if is_t2i else _edit_key
    if split == "eval":
        return make(category, _rng("eval", category, index))
    banned = _eval_keys(category)
    for attempt in range(1000):
        ex = make(category, _rng("train", category, index, attempt, seed))
        if key(ex) not in banned:
            return ex
    raise RuntimeError("train generator keeps colliding with eval")  # pragma: no cover


def _features() -> Any:
    import datasets

    return datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "task": datasets.Value("string"),
            "category": datasets.Value("string"),
            "source_image": datasets.Image(),
            "target_image": datasets.Image(),
            "spec": datasets.Value("string"),
        }
    )


def _to_dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    cols = {
        k: [r[k] for r in rows]
        for k in ("prompt", "task", "category", "source_image", "target_image", "spec")
    }
    return datasets.Dataset.from_dict(cols, features=_features())


def _default_n(split: str, t2i: bool) -> int:
    if split == "eval":
        return EVAL_T2I_PER_CATEGORY if t2i else EVAL_EDIT_PER_CATEGORY
    return TRAIN_T2I_PER_CATEGORY if t2i else TRAIN_EDIT_PER_CATEGORY


def t2i_rows(
    split: str,
    n_per_category: int | None = None,
    size: int = REFERENCE_SIZE,
    categories: Iterable[str] = T2I_CATEGORIES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Plain-dict rows of :func:`build_t2i_dataset` (PIL images, JSON spec) for callers that skip ``datasets``."""
    _check_split(split)
    _check_size(size)
    n = _default_n(split, True) if n_per_category is None else int(n_per_category)
    rows = []
    for category in categories:
        for i in range(n):
            ex = _draw(split, category, i, seed)
            spec = {
                "tag": category,
                "prompt": ex["prompt"],
                "include": ex["include"],
                "exclude": ex["exclude"],
                "scene": ex["scene"].to_dict(),
                "size": size,
            }
            rows.append(
                {
                    "prompt": ex["prompt"],
                    "task": "t2i",
                    "category": category,
                    "source_image": None,
                    "target_image": render(ex["scene"], size),
                    "spec": json.dumps(spec),
                }
            )
    return rows


def edit_rows(
    split: str,
    kind: str = "all",
    n_per_category: int | None = None,
    size: int = REFERENCE_SIZE,
    categories: Iterable[str] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Plain-dict rows of :func:`build_edit_dataset`."""
    _check_split(split)
    _check_size(size)
    if categories is None:
        by_kind = {"local": LOCAL_EDIT_CATEGORIES, "global": GLOBAL_EDIT_CATEGORIES, "all": EDIT_CATEGORIES}
        if kind not in by_kind:
            raise ValueError(f"unknown edit kind {kind!r}; expected local, global or all")
        categories = by_kind[kind]
    n = _default_n(split, False) if n_per_category is None else int(n_per_category)
    rows = []
    for category in categories:
        for i in range(n):
            ex = _draw(split, category, i, seed)
            spec = {
                "category": category,
                "kind": ex["kind"],
                "instruction": ex["prompt"],
                "source_scene": ex["source_scene"].to_dict(),
                "target_scene": ex["target_scene"].to_dict(),
                "source_style": "solid",
                "target_style": ex["target_style"],
                "edit": ex["edit"],
                "size": size,
            }
            rows.append(
                {
                    "prompt": ex["prompt"],
                    "task": f"{ex['kind']}_edit",
                    "category": category,
                    "source_image": render(ex["source_scene"], size),
                    "target_image": render(ex["target_scene"], size, ex["target_style"]),
                    "spec": json.dumps(spec),
                }
            )
    return rows


def build_t2i_dataset(
    split: str,
    n_per_category: int | None = None,
    size: int = REFERENCE_SIZE,
    categories: Iterable[str] = T2I_CATEGORIES,
    seed: int = 0,
) -> Any:
    """GenEval-style prompts with a ground-truth image each, as a ``datasets.Dataset``.

    ``split="eval"`` is the fixed standard set (16 prompts per category, 96 total, ``seed`` ignored);
    ``split="train"`` draws ``n_per_category`` (default 1000) per category from a disjoint seed stream and
    re-draws any example identical to an eval example. ``seed`` selects an alternative train draw.
    Rows are category-major and a smaller ``n_per_category`` gives a prefix of the larger set.
    """
    return _to_dataset(t2i_rows(split, n_per_category, size, categories, seed))


def build_edit_dataset(
    split: str,
    kind: str = "all",
    n_per_category: int | None = None,
    size: int = REFERENCE_SIZE,
    categories: Iterable[str] | None = None,
    seed: int = 0,
) -> Any:
    """GEdit-style (source, instruction, target) triplets; ``kind`` is ``local``, ``global`` or ``all``.

    Eval: 8 per category (32 local, 16 global, 48 total). Train: ``n_per_category`` (default 500).
    The edit mask is derived from the row's ``spec`` by :func:`edit_mask`.
    """
    return _to_dataset(edit_rows(split, kind, n_per_category, size, categories, seed))


def build_dataset(
    split: str,
    tasks: Sequence[str] = TASKS,
    n_per_category: int | None = None,
    size: int = REFERENCE_SIZE,
    seed: int = 0,
) -> Any:
    """Concatenation of the T2I, local-edit and global-edit datasets selected by ``tasks`` (in that order).

    ``n_per_category`` applies to every category of every task; None keeps each split's defaults (eval: 16 per
    T2I and 8 per edit category, 144 rows; train: 1000 and 500, 9000 rows). One Dataset with one schema lets a
    router pick rows by ``task`` without juggling several datasets.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected a subset of {TASKS}")
    rows: list[dict[str, Any]] = []
    if "t2i" in tasks:
        rows += t2i_rows(split, n_per_category, size, seed=seed)
    if "local_edit" in tasks:
        rows += edit_rows(split, "local", n_per_category, size, seed=seed)
    if "global_edit" in tasks:
        rows += edit_rows(split, "global", n_per_category, size, seed=seed)
    return _to_dataset(rows)


def _as_pil(value: Any) -> Image.Image | None:
    """Accept what a ``datasets`` Image column may yield: PIL image, dict with bytes/path, or None."""
    if value is None or isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            import io

            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
    raise TypeError(f"cannot interpret {type(value).__name__} as an image")


def save_dataset_to_folder(ds: Any, path: str | os.PathLike[str]) -> str:
    """Write PNGs plus ``metadata.jsonl`` (image paths relative to that file); returns the metadata path.

    Why: the training script loads a local JSON dataset whose image columns are paths relative to the file, so
    a ShapesWorld split can be trained on exactly like a user's own folder of pairs.
    """
    root = os.fspath(path)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    meta_path = os.path.join(root, "metadata.jsonl")
    with open(meta_path, "w", encoding="utf-8") as f:
        for i, row in enumerate(ds):
            rec: dict[str, Any] = {k: row[k] for k in ("prompt", "task", "category")}
            for col, suffix in (("source_image", "source"), ("target_image", "target")):
                img = _as_pil(row[col])
                if img is None:
                    rec[col] = None
                    continue
                rel = f"images/{i:06d}_{suffix}.png"
                img.convert("RGB").save(os.path.join(root, rel))
                rec[col] = rel
            rec["spec"] = row["spec"]
            f.write(json.dumps(rec) + "\n")
    return meta_path
