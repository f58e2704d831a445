"""Exact, model-free ShapesWorld scorer: GenEval rules for T2I, GEdit-style semantic consistency for edits.

Pipeline: every pixel gets its nearest palette colour; it is *confident* within ``LABEL_DISTANCE`` of it.
Objects are 4-connected regions of one object colour grown through pixels whose nearest colour is that colour
(up to ``GROW_DISTANCE``, i.e. about the 50% contour of a blurred edge) and seeded by at least one confident pixel
(hysteresis, so blur neither shrinks objects nor breaks 2-px outlines); connected components come from
vectorised label propagation (no scipy). Regions smaller than ``min_object_area`` are dropped (the role of
GenEval's detector-confidence threshold). Holes are filled and the filled footprint is matched against shape
templates drawn in the region's own bounding box (best IoU wins, ``None`` below ``MIN_SHAPE_IOU``), which is
robust to mild blur, noise and moderate stretching. A region is an outline when at most ``HOLLOW_MAX_CORE`` of
its core (the filled footprint eroded by the renderer's outline thickness) carries the object colour. The
background is the most common confident background colour. Measured limits at 64 px: solid scenes are recovered
exactly under Gaussian blur sigma 0.7 px plus noise sigma 10/255 and under colour casts of ~35/255; outlines
under blur 0.5 px plus noise 5/255. Heavier blur first breaks outlines, then square/circle separation.

T2I (GenEval): the spec carries GenEval's ``include``/``exclude`` clauses. Detections of a shape are ranked by
area (our stand-in for detector confidence); a clause with ``count`` n takes the top n; ``color`` requires all n
to have that colour; ``position`` requires the GenEval relative-position rule
(:func:`danceopd_diffusers.shapesworld.world.relative_position`, threshold 0.1) against the referenced group;
``exclude`` fails when n or more of a shape are detected. An image is correct or not; a category's accuracy is
the mean over its prompts and ``overall`` is the mean of the category accuracies (as GenEval reports it).

Edits (GEdit style, 0-10): ``success`` (0/1) says whether the instruction's target property holds;
``preservation`` (0-1) says whether everything else was kept, and ``overall`` = SC = 10 * min(success,
preservation). Local edits: label agreement with the source outside the edit mask, over all pixels and over the
cores of detected objects (specks below ``min_object_area`` are not objects), and inside the mask agreement with
the expected target, with disagreement counted against the edited object's own area (a removal that leaves the
silhouette in another colour keeps nothing). Global edits: agreement with the expected target (the source scene
with the new background or style) over all pixels and object cores, and every object kept in place, at its size
and fill (``PRESERVE_POSITION`` pixels at 64 px, ``PRESERVE_SCALE``); a background change must repaint at least
``MIN_REPAINTED`` of the background. All pixel terms allow 2 pixels of registration slack.

GEdit's PQ (perceptual quality) is not used: measured as the share of on-palette pixels it sat at 9.8-9.9 for every
model, so sqrt(SC * PQ) was a concave function of SC alone that paid generously for partial preservation.
``on_palette`` is still reported per sample as a diagnostic. Limits of the edit scorer, measured on the eval set's
ground truth: blur sigma <= 1, shifts <= 2 px, colour jitter +-30 and JPEG quality >= 75 keep every category >= 9,
except that JPEG's chroma subsampling turns a 2-px blue outline on black into dark blue (a background colour), so
some outline-style samples fail under JPEG (style change ~7.8).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .world import (
    BACKGROUND_COLOURS,
    EDIT_MASK_MARGIN,
    GLOBAL_EDIT_CATEGORIES,
    LOCAL_EDIT_CATEGORIES,
    N_OBJECT_COLOURS,
    PALETTE_NAMES,
    PALETTE_RGB,
    REFERENCE_SIZE,
    SHAPES,
    T2I_CATEGORIES,
    Obj,
    Scene,
    binary_dilate,
    binary_erode,
    edit_mask,
    object_centre_px,
    object_mask,
    outline_thickness,
    relative_position,
    render,
    shape_mask,
    styled_colour,
)

#: bumped whenever a change moves scores; results from different versions are not comparable
SCORER_VERSION: int = 2

# Max RGB distance for a pixel to count as a palette colour (palette pairs are >= 107 apart).
LABEL_DISTANCE: float = 60.0
# Object regions grow through pixels whose nearest colour is theirs up to this distance (hysteresis).
GROW_DISTANCE: float = 110.0
MIN_OBJECT_AREA: int = 24  # pixels at 64 px (the smallest object has ~80 px even as an outline)
MIN_SHAPE_IOU: float = 0.6  # below this, a component is an unclassified blob
MAX_ASPECT: float = 1.6  # longer/shorter bbox side above this: not one of our (square-bbox) shapes
# A component is an outline when at most this share of its core carries the object colour.
HOLLOW_MAX_CORE: float = 0.5
MIN_BACKGROUND_SHARE: float = 0.3  # the background colour must cover this share of the image
POSITION_TOLERANCE: float = 0.1  # centroid distance (fraction of the image side) for "same place"
# Global edits keep each object where it was, at its size: centroid within PRESERVE_POSITION pixels (at 64 px) and
# linear size within PRESERVE_SCALE of the expected object (a 2-px shift passes; one size step, >= 18 %, does not).
PRESERVE_POSITION: float = 3.5
PRESERVE_SCALE: float = 0.1
MIN_REPAINTED: float = 0.9  # share of the expected background a background change must repaint

_OBJECT_IDX = np.arange(N_OBJECT_COLOURS)
_BACKGROUND_IDX = np.array([PALETTE_NAMES.index(b) for b in BACKGROUND_COLOURS])


# --------------------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------------------


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB array from a PIL image or an array (float arrays are taken as 0..1 if max <= 1)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return arr


def palette_distances(rgb: np.ndarray) -> np.ndarray:
    """HxWxP Euclidean RGB distance of every pixel to every palette colour."""
    diff = rgb[:, :, None, :].astype(np.int32) - PALETTE_RGB[None, None, :, :].astype(np.int32)
    return np.sqrt((diff * diff).sum(-1, dtype=np.int32))


def palette_labels(rgb: np.ndarray, max_distance: float | None = LABEL_DISTANCE) -> np.ndarray:
    """Index into ``PALETTE_NAMES`` of each pixel's nearest colour; -1 beyond ``max_distance`` (None: never)."""
    dist = palette_distances(rgb)
    lab = dist.argmin(-1).astype(np.int32)
    if max_distance is not None:
        lab[dist.min(-1) > max_distance] = -1
    return lab


def connected_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative labels; returns ids 0..k-1 (-1 where ``labels < 0``).

    Vectorised min-label propagation with pointer jumping: converges in a few dozen numpy passes on our images,
    with no scipy dependency.
    """
    h, w = labels.shape
    n = h * w
    valid = labels >= 0
    comp = np.where(valid, np.arange(n, dtype=np.int64).reshape(h, w), n)
    same_r = valid[:, :-1] & (labels[:, :-1] == labels[:, 1:])
    same_d = valid[:-1, :] & (labels[:-1, :] == labels[1:, :])
    while True:
        new = comp.copy()
        np.minimum(new[:, :-1], np.where(same_r, comp[:, 1:], n), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(same_r, comp[:, :-1], n), out=new[:, 1:])
        np.minimum(new[:-1, :], np.where(same_d, comp[1:, :], n), out=new[:-1, :])
        np.minimum(new[1:, :], np.where(same_d, comp[:-1, :], n), out=new[1:, :])
        flat = new.reshape(-1)
        v = flat < n
        flat[v] = flat[flat[v]]  # pointer jumping: adopt the label of the pixel we point to
        if np.array_equal(new, comp):
            break
        comp = new
    out = np.full((h, w), -1, dtype=np.int64)
    _, inverse = np.unique(comp[valid], return_inverse=True)
    out[valid] = inverse.reshape(-1)
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Mask plus every pixel not connected to the border through non-mask pixels."""
    padded = np.pad(mask, 1, constant_values=False)
    comp = connected_components(np.where(padded, -1, 0))
    outside = comp == comp[0, 0]
    return ~outside[1:-1, 1:-1]


def _template(shape: str, h: int, w: int) -> np.ndarray:
    """Shape drawn in an h x w box with the renderer's geometry (stretched when the box is not square)."""
    u = (np.arange(w) + 0.5) / w - 0.5
    v = (np.arange(h) + 0.5) / h - 0.5
    return shape_mask(shape, u[None, :] * 2, v[:, None] * 2, 1.0 + 1e-9)


def classify_shape(filled: np.ndarray) -> tuple[str | None, float]:
    """Best-IoU shape template for a (hole-filled) footprint cropped to its bounding box."""
    h, w = filled.shape
    if h < 3 or w < 3 or max(h, w) / min(h, w) > MAX_ASPECT:
        return None, 0.0
    best, best_iou = None, 0.0
    for shape in SHAPES:
        t = _template(shape, h, w)
        iou = float((t & filled).sum() / max((t | filled).sum(), 1))
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= MIN_SHAPE_IOU else None), best_iou


@dataclass
class Detection:
    """One object found in an image; ``bbox`` is ``(x0, y0, x1, y1)`` with exclusive x1/y1, like GenEval."""

    shape: str | None
    colour: str
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    filled_area: int
    hollow: bool
    shape_iou: float
    mask: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "bbox": list(self.bbox),
            "centroid": [round(self.centroid[0], 2), round(self.centroid[1], 2)],
            "area": self.area,
            "hollow": self.hollow,
        }


@dataclass
class Analysis:
    """Everything the scorer reads from one image."""

    size: int
    background: str | None
    objects: list[Detection]
    labels: np.ndarray = field(repr=False)  # thresholded palette labels
    nearest: np.ndarray = field(repr=False)  # nearest palette labels (no threshold)
    on_palette: float = 0.0  # share of pixels within LABEL_DISTANCE of a palette colour
    rgb: np.ndarray | None = field(default=None, repr=False)  # the image itself

    def shapes(self) -> list[Detection]:
        """Detections with a recognised shape."""
        return [d for d in self.objects if d.shape is not None]

    def count(self, shape: str, colour: str | None = None) -> int:
        return sum(1 for d in self.objects if d.shape == shape and (colour is None or d.colour == colour))


def min_object_area(image_size: int) -> int:
    return max(8, round(MIN_OBJECT_AREA * (image_size / REFERENCE_SIZE) ** 2))


def analyze(image: Image.Image | np.ndarray) -> Analysis:
    """Segment an image into background colour and classified objects (largest first)."""
    rgb = to_array(image)
    h, w = rgb.shape[:2]
    dist = palette_distances(rgb)
    nearest = dist.argmin(-1).astype(np.int32)
    d_min = dist.min(-1)
    close = d_min <= LABEL_DISTANCE
    labels = np.where(close, nearest, -1)
    # Hysteresis: an object is the connected region whose nearest colour is its colour (the ~50% contour of a
    # blurred edge, so blur neither shrinks nor breaks thin parts), seeded by at least one confident pixel.
    grow = np.where((d_min <= GROW_DISTANCE) & np.isin(nearest, _OBJECT_IDX), nearest, -1)

    bg_counts = np.array([(labels == i).sum() for i in _BACKGROUND_IDX])
    background = None
    if bg_counts.max() >= MIN_BACKGROUND_SHARE * h * w:
        background = PALETTE_NAMES[int(_BACKGROUND_IDX[bg_counts.argmax()])]

    comp = connected_components(grow)
    n_comp = int(comp.max()) + 1
    areas = np.bincount(comp[comp >= 0], minlength=n_comp)
    seeds = np.bincount(comp[(comp >= 0) & close], minlength=n_comp)
    min_area = min_object_area(min(h, w))
    thickness = outline_thickness(min(h, w))
    objects = []
    for cid in np.flatnonzero((areas >= min_area) & (seeds > 0)):
        m = comp == cid
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        crop = m[y0:y1, x0:x1]
        filled = fill_holes(crop)
        shape, iou = classify_shape(filled)
        area, filled_area = int(m.sum()), int(filled.sum())
        core = binary_erode(filled, thickness)
        hollow = bool(core.any() and (crop & core).sum() <= HOLLOW_MAX_CORE * core.sum())
        objects.append(
            Detection(
                shape=shape,
                colour=PALETTE_NAMES[int(grow[ys[0], xs[0]])],
                bbox=(x0, y0, x1, y1),
                centroid=(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
                area=area,
                filled_area=filled_area,
                hollow=hollow,
                shape_iou=iou,
                mask=m,
            )
        )
    objects.sort(key=lambda d: (-d.filled_area, d.bbox[1], d.bbox[0]))
    return Analysis(
        size=min(h, w),
        background=background,
        objects=objects,
        labels=labels,
        nearest=nearest,
        on_palette=float(close.mean()),
        rgb=rgb,
    )


def _load_spec(spec: dict[str, Any] | str) -> dict[str, Any]:
    return json.loads(spec) if isinstance(spec, str) else spec


# --------------------------------------------------------------------------------------------------------------
# T2I (GenEval rules)
# --------------------------------------------------------------------------------------------------------------


def geneval_evaluate(analysis: Analysis, spec: dict[str, Any]) -> tuple[bool, str]:
    """GenEval's ``evaluate`` over our detections: include clauses (count, colour, position), then excludes."""
    by_shape: dict[str, list[Detection]] = {}
    for d in analysis.shapes():  # already ranked by area, our "confidence"
        by_shape.setdefault(d.shape, []).append(d)  # type: ignore[arg-type]
    correct = True
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in spec.get("include", []):
        cls, n = req["class"], int(req["count"])
        found = by_shape.get(cls, [])[:n]
        matched = True
        if len(found) < n:
            correct = matched = False
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        else:
            if "color" in req:
                got = [d.colour for d in found]
                if got.count(req["color"]) < n:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {cls}>={n}, found colours {got}")
            if "position" in req and matched:
                rel, target = req["position"][0], int(req["position"][1])
                targets = groups[target]
                if targets is None:
                    correct = matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for d in found:
                        for t in targets:
                            got_rel = relative_position(d.bbox, t.bbox)
                            if rel not in got_rel:
                                correct = matched = False
                                reasons.append(f"expected {cls} {rel} target, found {sorted(got_rel)}")
                                break
                        if not matched:
                            break
        groups.append(found if matched else None)
    for req in spec.get("exclude", []):
        cls, n = req["class"], int(req["count"])
        if len(by_shape.get(cls, [])) >= n:
            correct = False
            reasons.append(f"expected {cls}<{n}, found {len(by_shape[cls])}")
    return correct, "; ".join(reasons)


def score_t2i(image: Image.Image | np.ndarray, spec: dict[str, Any] | str) -> dict[str, Any]:
    """GenEval verdict for one generated image: ``{"category", "correct", "score", "reason", "detected"}``."""
    spec = _load_spec(spec)
    analysis = analyze(image)
    correct, reason = geneval_evaluate(analysis, spec)
    return {
        "category": spec.get("tag", spec.get("category")),
        "correct": bool(correct),
        "score": float(correct),
        "reason": reason,
        "detected": [d.to_dict() for d in analysis.objects],
    }


def summarize_t2i(results: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Per-category accuracy and ``overall`` = mean of the category accuracies (GenEval's headline number)."""
    per: dict[str, list[float]] = {}
    for r in results:
        per.setdefault(r["category"], []).append(float(r["score"]))
    order = [c for c in T2I_CATEGORIES if c in per] + sorted(set(per) - set(T2I_CATEGORIES))
    out = {c: float(np.mean(per[c])) for c in order}
    out["overall"] = float(np.mean([out[c] for c in order])) if order else 0.0
    return out


# --------------------------------------------------------------------------------------------------------------
# Edits (GEdit-style SC; PQ dropped)
# --------------------------------------------------------------------------------------------------------------


def _centre(obj: Obj, size: int) -> tuple[float, float]:
    cx, cy = object_centre_px(obj, size)
    return float(cx), float(cy)


def _near(d: Detection, xy: tuple[float, float], size: int) -> bool:
    return math.dist(d.centroid, xy) <= POSITION_TOLERANCE * size


def _match(
    expected: Sequence[tuple[str, str | None, tuple[float, float]]], found: Sequence[Detection], size: int
) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of expected (shape, colour or None, centre) to detections, nearest first."""
    pairs = []
    for i, (shape, colour, xy) in enumerate(expected):
        for j, d in enumerate(found):
            if d.shape == shape and (colour is None or d.colour == colour) and _near(d, xy, size):
                pairs.append((math.dist(d.centroid, xy), i, j))
    pairs.sort()
    used_i: set[int] = set()
    used_j: set[int] = set()
    out = []
    for _, i, j in pairs:
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            out.append((i, j))
    return out


def _shift_any_equal(a: np.ndarray, b: np.ndarray, slack: int = 2) -> np.ndarray:
    """True where a[p] equals b[q] for some q within ``slack`` pixels of p (registration slack; a diagonal
    2-pixel shift of the whole image is harmless, as it would be to a human judge)."""
    h, w = b.shape
    k = 2 * slack + 1
    pb = np.pad(b, slack, mode="edge")
    out = np.zeros(a.shape, dtype=bool)
    for oy in range(k):
        for ox in range(k):
            out |= a == pb[oy : oy + h, ox : ox + w]
    return out


def _object_cores(*analyses: Analysis) -> np.ndarray:
    """1-pixel-eroded footprints of the detected objects (specks below ``min_object_area`` are not objects)."""
    core = np.zeros(analyses[0].nearest.shape, dtype=bool)
    for analysis in analyses:
        for d in analysis.objects:
            core |= binary_erode(d.mask)
    return core


def pixel_preservation(ref: Analysis, out: Analysis, keep: np.ndarray | None = None) -> float:
    """Label agreement with ``ref`` over ``keep`` (default: everywhere): min of (all pixels, object cores).

    Both terms use nearest-palette labels with 2-pixel slack. The object term covers the interiors of the objects
    detected in ``ref`` or the output, so moving, resizing or deleting an object is punished even though objects
    are a small share of the image; the all-pixel term punishes repainting the background. Taking the minimum
    means both must be kept. With no object support (the only object was the edited one) the object term is the
    all-pixel term, so a speck too small to be an object costs only its own pixels.
    """
    keep = np.ones(out.nearest.shape, dtype=bool) if keep is None else keep
    if not keep.any():
        return 1.0
    agree = _shift_any_equal(out.nearest, ref.nearest)
    p_all = float(agree[keep].mean())
    obj = keep & _object_cores(ref, out)
    p_obj = float(agree[obj].mean()) if obj.any() else p_all
    return min(p_all, p_obj)


def _label_edges(labels: np.ndarray) -> np.ndarray:
    """Pixels within 1 pixel of a change of label (where a soft or blurred edge legitimately mixes colours)."""
    edges = np.zeros(labels.shape, dtype=bool)
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edges[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edges[1:, :] |= labels[1:, :] != labels[:-1, :]
    edges[:-1, :] |= labels[1:, :] != labels[:-1, :]
    return binary_dilate(edges)


def mask_fidelity(target: Analysis, out: Analysis, mask: np.ndarray, object_area: int) -> float:
    """Inside an edit mask: 1 - (pixels that differ from the expected target) / (the edited object's area).

    Counting against the object's area, not the (dilated) mask's, means a removal that leaves the silhouette in
    another colour, or a replacement drawn over a ghost of the old object, keeps nothing. Off-palette pixels on
    the target's edges (a blurred boundary) are not counted.
    """
    soft = _label_edges(target.nearest) & (out.labels < 0)
    wrong = mask & ~_shift_any_equal(out.nearest, target.nearest) & ~soft
    return max(0.0, 1.0 - float(wrong.sum()) / max(object_area, 1))


def _local_success(spec: dict[str, Any], out: Analysis, size: int) -> tuple[bool, list[Detection]]:
    """Whether the local edit happened; also returns the detections the edit created (for the add mask)."""
    src_scene = Scene.from_dict(spec["source_scene"])
    edit = spec["edit"]
    n_src = len(src_scene.objects)
    n_out = len(out.objects)
    if edit["op"] == "add":
        new = Obj.from_dict(edit["object"])
        src_n = sum(1 for o in src_scene.objects if (o.shape, o.colour) == (new.shape, new.colour))
        ok = out.count(new.shape, new.colour) == src_n + 1 and n_out == n_src + 1
        expected = [(o.shape, o.colour, _centre(o, size)) for o in src_scene.objects]
        matched = {j for _, j in _match(expected, out.objects, size)}
        created = [
            d
            for j, d in enumerate(out.objects)
            if j not in matched and (d.shape, d.colour) == (new.shape, new.colour)
        ]
        return ok, created
    if edit["op"] == "remove":
        old = Obj.from_dict(edit["object"])
        src_n = sum(1 for o in src_scene.objects if (o.shape, o.colour) == (old.shape, old.colour))
        ok = out.count(old.shape, old.colour) == src_n - 1 and n_out == n_src - 1
        return ok, []
    if edit["op"] in ("replace", "recolor"):
        old, new = Obj.from_dict(edit["old"]), Obj.from_dict(edit["new"])
        xy = _centre(old, size)
        has_new = any(
            d.shape == new.shape and d.colour == new.colour and _near(d, xy, size) for d in out.objects
        )
        has_old = any(
            d.shape == old.shape and d.colour == old.colour and _near(d, xy, size) for d in out.objects
        )
        return has_new and not has_old and n_out == n_src, []
    raise ValueError(f"unknown local edit op {edit['op']!r}")


def _colour_mass(analysis: Analysis, d: Detection) -> float:
    """How much of the object's colour lies around a detection, in pixels: each pixel near it counts by where it
    sits between the background and the object colour (0..1). Blur and JPEG move colour around but keep this sum,
    so it measures size where the thresholded footprint would shrink (blur first eats thin tips)."""
    if analysis.background is None:
        return float(d.filled_area)
    margin = max(2, round(2 * analysis.size / REFERENCE_SIZE))
    near = binary_dilate(d.mask, margin)
    bg = PALETTE_RGB[PALETTE_NAMES.index(analysis.background)].astype(np.float64)
    axis = PALETTE_RGB[PALETTE_NAMES.index(d.colour)].astype(np.float64) - bg
    t = ((analysis.rgb[near].astype(np.float64) - bg) @ axis) / float(axis @ axis)
    return float(np.clip(t, 0.0, 1.0).sum())


def _kept_in_place(target: Analysis, expected: Detection, out: Analysis, d: Detection) -> bool:
    """Same shape, colour and fill, centroid within ``PRESERVE_POSITION`` pixels and linear size (square root of
    the colour mass) within ``PRESERVE_SCALE`` of the expected object's."""
    size = out.size
    scale = math.sqrt(_colour_mass(out, d) / max(_colour_mass(target, expected), 1.0))
    return (
        (d.shape, d.colour, d.hollow) == (expected.shape, expected.colour, expected.hollow)
        and math.dist(d.centroid, expected.centroid) <= PRESERVE_POSITION * size / REFERENCE_SIZE
        and abs(scale - 1.0) <= PRESERVE_SCALE
    )


def layout_preservation(target: Analysis, out: Analysis, size: int) -> float:
    """Share of objects kept in place (one-to-one, nearest first) over max(expected, found) objects."""
    pairs = sorted(
        (math.dist(d.centroid, e.centroid), i, j)
        for i, e in enumerate(target.objects)
        for j, d in enumerate(out.objects)
        if _kept_in_place(target, e, out, d)
    )
    used_i: set[int] = set()
    used_j: set[int] = set()
    for _, i, j in pairs:
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
    denom = max(len(target.objects), len(out.objects))
    return len(used_i) / denom if denom else 1.0


def _global_scores(spec: dict[str, Any], out: Analysis, size: int) -> tuple[bool, float]:
    """(success, preservation) of a global edit, against the expected target (source layout, new look)."""
    src_scene = Scene.from_dict(spec["source_scene"])
    tgt_scene = Scene.from_dict(spec["target_scene"])
    style = spec.get("target_style", "solid")
    target = analyze(render(tgt_scene, size, style))
    expected_bg = styled_colour(tgt_scene.background, style)
    bg_idx = PALETTE_NAMES.index(expected_bg)
    background = binary_erode(target.labels == bg_idx)
    repainted = float((out.nearest[background] == bg_idx).mean()) if background.any() else 1.0
    bg_ok = out.background == expected_bg and repainted >= MIN_REPAINTED
    preservation = min(layout_preservation(target, out, size), pixel_preservation(target, out))
    op = spec["edit"]["op"]
    if op == "background":
        return bg_ok, preservation
    if op == "style" and style == "outline":
        return bg_ok and bool(out.objects) and all(d.hollow for d in out.objects), preservation
    if op == "style" and style == "negative":
        # Every object standing where a source object stood (same shape) must carry the negated colour.
        placed = _match([(o.shape, None, _centre(o, size)) for o in src_scene.objects], out.objects, size)
        recoloured = all(
            out.objects[j].colour == styled_colour(src_scene.objects[i].colour, "negative") for i, j in placed
        )
        solid = not any(d.hollow for d in out.objects)
        return bg_ok and bool(placed) and recoloured and solid, preservation
    raise ValueError(f"unknown global edit op {op!r} / style {style!r}")


def score_edit(
    source: Image.Image | np.ndarray, output: Image.Image | np.ndarray, spec: dict[str, Any] | str
) -> dict[str, Any]:
    """GEdit-style score of one edited image against its source and spec.

    Returns ``{"category", "kind", "success", "preservation", "on_palette", "overall"}``: ``overall`` (0-10) is
    GEdit's SC, 10 * min(success, preservation); ``on_palette`` is a diagnostic only (see the module docstring).
    An output whose size differs from the spec's is resized with nearest-neighbour sampling first.
    """
    spec = _load_spec(spec)
    size = int(spec["size"])
    src_img, out_img = (to_array(x) for x in (source, output))
    if out_img.shape[:2] != (size, size):
        out_img = np.asarray(Image.fromarray(out_img).resize((size, size), Image.Resampling.NEAREST))
    if src_img.shape[:2] != (size, size):
        src_img = np.asarray(Image.fromarray(src_img).resize((size, size), Image.Resampling.NEAREST))
    out = analyze(out_img)
    if spec["kind"] == "local":
        src = analyze(src_img)
        success, created = _local_success(spec, out, size)
        mask = edit_mask(spec, size)
        allowed = mask
        margin = max(EDIT_MASK_MARGIN, round(EDIT_MASK_MARGIN * size / REFERENCE_SIZE))
        for d in created:  # an added object may go anywhere; its own footprint is then allowed to change
            allowed = allowed | binary_dilate(d.mask, margin)
        preservation = pixel_preservation(src, out, ~allowed)
        if spec["edit"]["op"] != "add":  # the target inside the mask is known exactly
            target = analyze(render(Scene.from_dict(spec["target_scene"]), size))
            edited = [Obj.from_dict(spec["edit"][k]) for k in ("object", "old", "new") if k in spec["edit"]]
            area = int(np.logical_or.reduce([object_mask(o, size) for o in edited]).sum())
            preservation = min(preservation, mask_fidelity(target, out, mask, area))
    else:
        success, preservation = _global_scores(spec, out, size)
    overall = 10.0 * min(float(success), preservation)
    return {
        "category": spec["category"],
        "kind": spec["kind"],
        "success": float(success),
        "preservation": float(preservation),
        "on_palette": float(out.on_palette),
        "overall": overall,
    }


def score_job(job: tuple[str, str, np.ndarray, np.ndarray | None]) -> dict[str, Any]:
    """``(task, spec, output, source)`` -> :func:`score_t2i` or :func:`score_edit`; a picklable unit of work for
    a process pool (``task`` is ``"t2i"`` or ``"edit"``)."""
    task, spec, output, source = job
    return score_t2i(output, spec) if task == "t2i" else score_edit(source, output, spec)


def summarize_edit(results: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Per-category mean ``overall`` plus ``local``/``global`` (mean of their categories) and ``average`` (mean
    over all categories present, GEdit's headline)."""
    per: dict[str, list[float]] = {}
    for r in results:
        per.setdefault(r["category"], []).append(float(r["overall"]))
    known = LOCAL_EDIT_CATEGORIES + GLOBAL_EDIT_CATEGORIES
    order = [c for c in known if c in per] + sorted(set(per) - set(known))
    out = {c: float(np.mean(per[c])) for c in order}
    local = [out[c] for c in LOCAL_EDIT_CATEGORIES if c in out]
    glob = [out[c] for c in GLOBAL_EDIT_CATEGORIES if c in out]
    if local:
        out["local"] = float(np.mean(local))
    if glob:
        out["global"] = float(np.mean(glob))
    out["average"] = float(np.mean([out[c] for c in order])) if order else 0.0
    return out
