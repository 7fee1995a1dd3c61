"""Content consistency (CC) measured from pixels, for sessions whose scenes are known.

In ShapesWorld the expected scenes before and after a turn say exactly which objects the
turn edits (added, removed or changed between the two scenes), so CC need not be asked of a
model: everything *outside the edited region* must look as it did in the image before the
turn.

The measure:

1. The edited region E is the union of the masks of every edited object, in the scene
   before and in the scene after the turn, dilated by `DILATE` pixels (per 64 px of canvas)
   so that soft edges of a generated object do not count as changes. On a background turn
   the background itself is the edit: the kept region is then the unedited objects only
   (their masks eroded by one pixel, away from the recoloured surroundings).
2. A pixel of the kept region R (everything not in E) *changed* when its largest per-channel
   absolute difference between the output and the image before the turn exceeds `PIXEL_TOL`
   (0.2 on [0, 1]: well above sensor-like noise and mild colour drift, well below the
   distance between any two palette colours). A 2x2 morphological opening then keeps only
   changed pixels that form solid patches (isolated noise pixels and 1 px edge halos go).
3. The statistic is the largest connected patch of changed pixels in R, in pixels of a
   64 px canvas (`blob`): a stray shape, a moved or recoloured bystander, a changed
   background are all one large patch, while softer or slightly re-blurred edges of the
   untouched objects leave only slivers (at most 12 px on ShapesWorld's degraded renders).
   score = clip(1 - blob / `ZERO_AT`, 0, 1) with ZERO_AT = 100 px (a small object's area);
   pass iff score >= `PASS_SCORE` = 0.8, i.e. no changed patch larger than 20 px (a 6x6
   stray blob is 36 px).

The share of R that changed and the mean absolute difference over R are reported in the
reason as well. Images whose size differs from the scene canvas are resized (bilinear) to
the canvas first. The region comes
from the *expected* previous scene; if the editor's previous output already deviated from
it, the comparison is still against that previous output, which is what "nothing else
changed in this turn" means.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from ..session import CheckResult
from ..world.render import object_mask
from ..world.scene import Scene

SIMILARITY_VERSION = "sim-v1"
PIXEL_TOL = 0.2
ZERO_AT = 100.0     # px on a 64 px canvas
PASS_SCORE = 0.8
DILATE = 2


def edited_ids(prev: Scene, nxt: Scene) -> tuple[set[int], set[int]]:
    """(ids edited as seen in `prev`, ids edited as seen in `nxt`): removed, added or changed."""
    before = {o.id: o for o in prev.objects}
    after = {o.id: o for o in nxt.objects}
    changed = {i for i in before.keys() & after.keys() if before[i] != after[i]}
    return (set(before) - set(after)) | changed, (set(after) - set(before)) | changed


def kept_region(prev: Scene, nxt: Scene) -> np.ndarray:
    """[H, W] bool: the pixels a turn from `prev` to `nxt` must leave alone."""
    geom = nxt.geometry
    size = (geom.canvas, geom.canvas)
    gone, new = edited_ids(prev, nxt)
    if prev.background != nxt.background:
        keep = np.zeros(size, bool)
        for o in nxt.objects:
            if o.id not in new:
                keep |= ndimage.binary_erosion(object_mask(o, geom), iterations=1)
        return keep
    edited = np.zeros(size, bool)
    for o in prev.objects:
        if o.id in gone:
            edited |= object_mask(o, geom)
    for o in nxt.objects:
        if o.id in new:
            edited |= object_mask(o, geom)
    iterations = max(1, round(DILATE * geom.scale))
    if edited.any():
        edited = ndimage.binary_dilation(edited, iterations=iterations)
    return ~edited


def _to_canvas(img: np.ndarray, canvas: int) -> np.ndarray:
    if img.shape[:2] == (canvas, canvas):
        return img
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).convert("RGB")
    return np.asarray(im.resize((canvas, canvas), Image.BILINEAR), dtype=np.uint8)


def changed_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels whose largest channel difference exceeds PIXEL_TOL, opened 2x2."""
    d = np.abs(after.astype(np.int16) - before.astype(np.int16)).max(axis=2) / 255.0
    return ndimage.binary_opening(d > PIXEL_TOL, structure=np.ones((2, 2), bool))


def content_consistency(before: np.ndarray, after: np.ndarray, prev: Scene, nxt: Scene) -> CheckResult:
    """CC of one turn: `before` = the image before the turn, `after` = its output."""
    canvas = nxt.canvas
    before, after = _to_canvas(before, canvas), _to_canvas(after, canvas)
    keep = kept_region(prev, nxt)
    n = int(keep.sum())
    if n == 0:
        return CheckResult(status="pass", score=1.0, reason="by image similarity: nothing outside the edit to compare")
    changed = changed_pixels(before, after) & keep
    labels, n_patches = ndimage.label(changed)
    area = float(np.bincount(labels.ravel())[1:].max()) if n_patches else 0.0
    blob = area / nxt.geometry.scale ** 2
    frac = float(changed.sum()) / n
    mae = float(np.abs(after.astype(np.float32) - before.astype(np.float32))[keep].mean() / 255.0)
    score = float(np.clip(1.0 - blob / ZERO_AT, 0.0, 1.0))
    ok = score >= PASS_SCORE
    reason = (f"by image similarity: largest changed patch outside the edited region {blob:.0f} px "
              f"(limit {ZERO_AT * (1 - PASS_SCORE):.0f}), {100 * frac:.1f}% of {n} px changed, MAE {mae:.3f}")
    return CheckResult(status="pass" if ok else "fail", score=score, reason=reason)
