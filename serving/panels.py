"""Find the panels of a seller's collage: full-length straight seams along rows and columns (numpy only).

Collage apps put photos side by side in a grid or an uneven layout, separated by a gutter of uniform colour
or by nothing at all (a sharp discontinuity). Both leave a trace an ordinary photo rarely has: a straight
line across the WHOLE picture (or across one panel, for uneven layouts) at which the content changes in
most places. ``find_panels`` looks for such seams on a small copy of the picture, cuts the picture along
them (recursively, XY-cut style), and returns the panels with content, or nothing when the picture is not
a collage, so ordinary photos are scored exactly as before.

A seam is either
- a *gutter*: a band of rows (columns) each of one uniform colour, the same along the band, with content
  on both sides, bounded by straight edges (the first rows outside the band differ from the gutter on a
  large share of their length, on average over both sides), which tells a gutter from the plain backdrop
  between two objects (whose first differing row is the tip of a contour); or
- a *discontinuity*: a row boundary across which most columns change much more than they change a few rows
  above and below (texture), i.e. two unrelated pictures meet; three or more such rows closer together
  than a panel can be tall are a pattern (checks, tiles), not seams.
A uniform outer border of one colour (or letterboxing) is trimmed first, if what is left keeps most of the
picture. Cuts that would leave a panel under the minimum size (a banner, a UI bar, a thin strip) are not
made, and blank panels (an empty slot) are dropped. A collage of more photos than fit as panels (three or more
gutters of one width and colour closer than a panel, or more than ``max_panels`` panels) is grouped evenly into
larger panels (``_even_cuts``; the minimum panel size raised), never cut through a photo. A cut never throws away content, since a found collage
is scored by its panels alone: a panel is dropped only when blank (a hairpin on a white backdrop is not), the
rows a cut leaves out hold only the seam (a photo's own edge beside a gutter goes back to its panel; the two
edges of a thin object are no gutter), and a strip too thin for a panel joins its neighbour unless blank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # left, top, right, bottom


@dataclass(frozen=True)
class SeamRules:
    """The detector's constants (work-image units: 0-255 per channel, summed over channels where noted)."""

    work_side: int = 384  # the picture is box-downscaled so its longer side is at most this
    tolerance: float = 10.0  # a pixel belongs to a uniform row if every channel is within this of the row mean
    uniform_share: float = 0.98  # share of a row's pixels within tolerance for the row to be uniform
    edge_share: float = 0.3  # mean share of the first rows beside a gutter (both sides) that differ from it (straight edges)
    jump: float = 36.0  # a column's change across a discontinuity (sum of channels) must exceed this ...
    texture_ratio: float = 2.0  # ... and this many times its change a few rows away on either side
    cut_share: float = 0.7  # share of columns that must change like that for a discontinuity seam
    blank_share: float = 0.005  # blank: under this share of pixels off their row's colour (panels, rows cuts leave out)
    max_depth: int = 3  # nested splits (uneven layouts: a column split into rows, ...)
    keep: float = 0.5  # trimming a uniform border must keep at least this share of each side


def _work_array(img: Image.Image, side: int) -> tuple[np.ndarray, float, float]:
    """RGB float32 copy with longer side <= ``side`` (an integer box reduction: fast, averages noise, keeps
    straight edges straight); and the factors from work to picture coordinates along x and along y (they
    differ: the reduction rounds each side up, so a tall picture's y factor is not its x factor)."""
    factor = max(1, -(-max(img.size) // side))
    work = img.reduce(factor) if factor > 1 else img
    return np.asarray(work.convert("RGB"), dtype=np.float32), img.width / work.width, img.height / work.height


def _uniform_rows(region: np.ndarray, rules: SeamRules) -> tuple[np.ndarray, np.ndarray]:
    """Which rows are one colour across the region (``uniform_share`` of pixels within ``tolerance`` of the
    row's mean), and the row means."""
    means = region.mean(axis=1)  # (h, 3)
    close = _within(region, means[:, None, :], rules.tolerance).mean(axis=1)
    return close >= rules.uniform_share, means


def _within(pixels: np.ndarray, colour: np.ndarray, tolerance: float) -> np.ndarray:
    """Per pixel: every channel within ``tolerance`` of ``colour`` (channel by channel: numpy reduces a
    3-long last axis slowly)."""
    out = np.abs(pixels[..., 0] - colour[..., 0]) <= tolerance
    out &= np.abs(pixels[..., 1] - colour[..., 1]) <= tolerance
    out &= np.abs(pixels[..., 2] - colour[..., 2]) <= tolerance
    return out


def _along(region: np.ndarray) -> np.ndarray:
    """Every other pixel along the rows of a long region: shares along a line need no more (half the work)."""
    return region[:, ::2] if region.shape[1] >= 128 else region


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    padded = np.concatenate([[False], flags, [False]])
    change = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(change[::2].tolist(), change[1::2].tolist()))


def _trim(region: np.ndarray, rules: SeamRules) -> tuple[int, int]:
    """[start, end) of the rows left when a uniform border of one colour (a collage's outer border,
    letterboxing; not a gradient backdrop) goes; rows are tested from each end inwards, so a picture without
    a border costs two rows."""
    h = region.shape[0]

    def border(y: int, colour: np.ndarray | None) -> tuple[bool, np.ndarray]:
        uniform, means = _uniform_rows(region[y : y + 1], rules)
        same = colour is None or np.abs(means[0] - colour).max() <= rules.tolerance
        return bool(uniform[0]) and same, means[0]

    start, colour = 0, None
    while start < h:
        ok, mean = border(start, colour)
        if not ok:
            break
        colour = mean if colour is None else colour
        start += 1
    end, colour = h, None
    while end > start:
        ok, mean = border(end - 1, colour)
        if not ok:
            break
        colour = mean if colour is None else colour
        end -= 1
    # a uniform row may hold up to 1 - uniform_share of content (a thin object standing in the border): a
    # border with content stays, since a found collage is scored by its panels alone
    start = start if _blank(region[:start], rules) else 0
    end = end if _blank(region[end:], rules) else h
    return start, end


def _gutters(region: np.ndarray, rules: SeamRules) -> list[tuple[int, int]]:
    """Row bands [start, end) of one uniform colour across the region's width, bounded by straight edges
    (the first rows beside the band differ from it on ``edge_share`` of their length, on average)."""
    h = region.shape[0]
    region = _along(region)
    uniform, means = _uniform_rows(region, rules)
    steady = np.ones(h, dtype=bool)  # a colour step between uniform rows ends a band (two touching gutters)
    steady[1:] = np.abs(means[1:] - means[:-1]).max(axis=1) <= rules.tolerance / 2
    bands = []
    for start, end in _runs(uniform):
        cuts = [start] + [int(y) for y in np.flatnonzero(~steady[start + 1 : end]) + start + 1] + [end]
        for a, b in zip(cuts[:-1], cuts[1:]):
            if a == 0 or b == h:
                continue  # a border, not a seam
            colour = means[a:b].mean(axis=0)
            near = [y for y in (a - 2, a - 1, b, b + 1) if 0 <= y < h]
            differs = 1.0 - _within(region[near], colour, 2 * rules.tolerance).mean(axis=1)
            above = differs[[i for i, y in enumerate(near) if y < a]].max()
            below = differs[[i for i, y in enumerate(near) if y >= b]].max()
            if above + below >= 2 * rules.edge_share:
                bands.append((a, b))
    return bands


def _discontinuities(region: np.ndarray, rules: SeamRules, min_len: int) -> list[tuple[int, int]]:
    """Rows y (as bands [y, y+1)) where most columns jump from row y-1 to y+1 far more than nearby. Three or
    more jumps each closer than a panel can be tall to the next are a pattern (checks, tiles, stripes), not
    seams; two are the edges of one thin gutter."""
    h = region.shape[0]
    if h < 9:
        return []
    region = _along(region)
    diff = np.abs(region[2:] - region[:-2])
    change = diff[..., 0] + diff[..., 1] + diff[..., 2]  # change[i]: rows i -> i+2, centred on row i+1
    rows = np.arange(4, h - 4)  # centre rows with texture measured 3 rows away on both sides
    centre, before, after = change[rows - 1], change[rows - 4], change[rows + 2]
    cut = (centre > rules.jump) & (centre > rules.texture_ratio * np.maximum(before, after))
    score = cut.mean(axis=1)
    peaks: list[int] = []
    for i in np.flatnonzero(score >= rules.cut_share):
        if score[i] >= score[max(0, i - 2) : i + 3].max() and (not peaks or rows[i] - peaks[-1] > 2):
            peaks.append(int(rows[i]))
    out, run = [], peaks[:1]
    for y in peaks[1:] + [None]:  # runs of jumps closer than a panel; three or more are a pattern
        if y is not None and y - run[-1] < min_len:
            run.append(y)
            continue
        if len(run) <= 2:
            out += [(p, p + 1) for p in run]
        run = [y]
    return out


def _blank(pixels: np.ndarray, rules: SeamRules) -> bool:
    """Nothing to score here: under ``blank_share`` of the pixels differ from their row's dominant colour (a
    gutter, a border, an empty slot, a plain backdrop's gradient; a thin object on a plain backdrop is not
    blank, whichever way it lies)."""
    pixels = _along(pixels)[::2] if pixels.shape[0] >= 64 else _along(pixels)
    if pixels.size == 0:
        return True
    colours = np.median(pixels, axis=1, keepdims=True)
    return float(1.0 - _within(pixels, colours, 2 * rules.tolerance).mean()) < rules.blank_share


def _clean_rows(pixels: np.ndarray, rules: SeamRules) -> np.ndarray:
    """Per row: blank (under ``blank_share`` of its pixels off the row's dominant colour). A uniform row may hold
    up to 1 - ``uniform_share`` of content (a thin object standing in a gutter or a border); only clean rows
    may be cut away, since a found collage is scored by its panels alone. A row's two end pixels are left out:
    there a neighbouring seam blends in (the corner of the next tile of a checkerboard is no content)."""
    pixels = _along(pixels[:, 1:-1])
    if pixels.shape[1] == 0:
        return np.ones(len(pixels), dtype=bool)
    colours = np.median(pixels, axis=1, keepdims=True)
    return 1.0 - _within(pixels, colours, 2 * rules.tolerance).mean(axis=1) < rules.blank_share


def _seam_rows(band: np.ndarray, a: int, rules: SeamRules) -> tuple[int, int] | None:
    """The rows [start, end) of a cut merged from seams (``band``, starting at row ``a``) that hold nothing
    but the seam, or None when there is no seam in them. A gutter's uniform rows and the row beside them
    where it blends into a photo (a jump is found a row off the edge) are the seam. Content in the band
    goes back to the panels: with it the cut is the run of one uniform colour farthest from it (the rest
    is a photo's own backdrop beside its edge); two jumps around content are the edges of a thin object
    (a hairpin on a plain backdrop), not a thin gutter."""
    b = a + len(band)
    inner = band[1:-1]
    if not len(inner):
        return a, b
    uniform, means = _uniform_rows(_along(inner), rules)
    uniform &= _clean_rows(inner, rules)  # a uniform row with content in it is content, not seam
    rest = ~uniform
    runs = _runs(uniform)
    if runs:
        rest[max(0, runs[0][0] - 1)] = rest[min(len(rest) - 1, runs[-1][1])] = False
    if not rest.any() or _blank(inner[rest], rules):
        return a, b
    if not runs:
        return None
    steps = np.flatnonzero(np.abs(np.diff(means, axis=0)).max(axis=1) > rules.tolerance / 2) + 1
    colours = [(s, e) for s0, e0 in runs for s, e in zip([s0, *[t for t in steps if s0 < t < e0]],
                                                          [*[t for t in steps if s0 < t < e0], e0])]
    content = np.flatnonzero(rest)
    start, end = max(colours, key=lambda r: (np.abs(content - (r[0] + r[1] - 1) / 2).min(), r[1] - r[0]))
    return a + start, a + end + 2  # inner row i is band row i + 1; one blended row on each side


def _gutter_runs(region: np.ndarray, seams: list[tuple[int, int]], gutters: set[tuple[int, int]],
                 rules: SeamRules) -> list[tuple[int, int]] | None:
    """The cuts of a band of ``seams`` closer than a panel can be tall when it is three or more gutters of one
    width and colour, evenly spaced, with photos between them (a strip of more photos than fit as panels, a 6x6
    collage), each gutter's rows; else None (one seam: both edges of one gutter, the two edges of a thin object, a
    gutter beside a photo's own plain backdrop, ...), left to ``_seam_rows``."""
    runs: list[list] = []
    for a, b in seams:  # a gutter and the jumps a row off its edges are one seam
        if runs and a - runs[-1][1] <= 3:
            runs[-1][1] = max(runs[-1][1], b)
            runs[-1][2] |= (a, b) in gutters
        else:
            runs.append([a, b, (a, b) in gutters])
    if len(runs) < 3 or not all(is_gutter for _, _, is_gutter in runs):  # two: ambiguous (a photo's white backdrop)
        return None
    rows = [_seam_rows(region[a:b], a, rules) for a, b, _ in runs]
    if any(r is None for r in rows):
        return None
    # one collage's gutters: one width and one colour, a photo between each two (not a photo's own plain band
    # beside a gutter: that is left to _seam_rows, which keeps the gutter farthest from content)
    widths = [e - s for s, e in rows]
    colours = np.array([np.median(region[s:e].reshape(-1, region.shape[-1]), axis=0) for s, e in rows])
    gaps = [r1[0] - r0[1] for r0, r1 in zip(rows, rows[1:])]
    if max(widths) > 2 * min(widths) + 2 or np.abs(colours - colours.mean(axis=0)).max() > rules.tolerance \
            or max(gaps) > 2 * min(gaps) or any(_blank(region[r0[1]:r1[0]], rules) for r0, r1 in zip(rows, rows[1:])):
        return None
    return rows


def _even_cuts(gutters: list[tuple[int, int]], lo: int, hi: int, min_len: int) -> list[tuple[int, int]]:
    """Of ``gutters`` (in order, between rows ``lo`` and ``hi``), the most that leave every segment at least
    ``min_len`` rows, the longest segment as short as it can be: photos grouped as evenly as the size allows (a
    6-photo strip 2+2+2, not 2+4)."""
    points = [(lo, lo), *gutters, (hi, hi)]
    best: dict[int, tuple[int, int, int]] = {0: (0, 0, -1)}  # point -> (cuts, -longest segment, previous point)
    for j in range(1, len(points)):
        options = [((best[i][0] + (j < len(points) - 1), min(best[i][1], points[i][1] - points[j][0])), i)
                   for i in range(j) if i in best and points[j][0] - points[i][1] >= min_len]
        if options:
            (cuts, longest), i = max(options)
            best[j] = (cuts, longest, i)
    chosen, j = [], len(points) - 1
    if j not in best:
        return []
    while best[j][2] > 0:
        j = best[j][2]
        chosen.append(points[j])
    return chosen[::-1]


def _cuts(region: np.ndarray, rules: SeamRules, min_len: int) -> list[tuple[int, int]]:
    """The region's row segments [start, end) between seams, each at least ``min_len`` rows; [] if no split.
    Nothing but blank rows is left out, since a collage is scored by its panels alone: seams whose rows hold
    content are no cut, and a strip too thin for a panel at either end joins its neighbour unless blank. Gutters
    closer than a panel can be tall (more photos than fit as panels) group the photos evenly (``_even_cuts``)."""
    h = region.shape[0]
    gutters = _gutters(region, rules)
    seams = sorted(gutters + _discontinuities(region, rules, min_len))
    merged: list[list] = []
    for a, b in seams:  # seams closer than a panel can be tall are one cut (both edges of a gutter, ...)
        if merged and a - merged[-1][1] < min_len:
            merged[-1][1] = max(merged[-1][1], b)
            merged[-1][2].append((a, b))
        else:
            merged.append([a, b, [(a, b)]])
    bands = []  # [start, end, the gutters to choose from when several]
    for a, b, members in merged:
        several = _gutter_runs(region, members, set(gutters), rules) if len(members) > 1 else None
        rows = None if several else _seam_rows(region[a:b], a, rules)
        if several or rows is not None:
            bands.append([*(rows or (a, b)), several])
    # (a strip's outermost row may be where the region's own seam blends into it)
    if bands and not bands[0][2] and bands[0][0] < min_len and not _blank(region[1 : bands[0][0]], rules):
        bands.pop(0)
    if bands and not bands[-1][2] and h - bands[-1][1] < min_len and not _blank(region[bands[-1][1] : h - 1], rules):
        bands.pop()
    cuts: list[tuple[int, int]] = []
    for k, (a, b, several) in enumerate(bands):
        if several:
            hi = bands[k + 1][0] if k + 1 < len(bands) else h
            cuts += _even_cuts(several, cuts[-1][1] if cuts else 0, hi, min_len)
        else:
            cuts.append((a, b))
    edges = [0] + [v for a, b in cuts for v in (a, b)] + [h]
    segments = [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]
    segments = [(a, b) for a, b in segments if b - a >= min_len]
    return segments if len(segments) >= 2 else []


def _split(arr: np.ndarray, arr_t: np.ndarray, box: Box, rules: SeamRules, min_w: int, min_h: int,
           depth: int) -> list[Box]:
    """XY-cut: trim the picture's uniform border, cut it along full-length row seams (else column seams), recurse.
    ``arr_t``: ``arr`` transposed (contiguous), for the column passes."""
    left, top, right, bottom = box
    if depth == 0:  # a collage's outer border or letterboxing (inside a panel, a margin is the photo's own)
        a, b = _trim(arr[top:bottom, left:right], rules)
        a2, b2 = _trim(arr_t[left:right, top + a : top + b], rules) if b > a else (0, 0)
        # not a plain backdrop: what is left must keep most of the picture (an object on a plain backdrop
        # trimmed to its bounding box would turn its own straight edges into "seams")
        if min(b - a, b2 - a2) > 0 and b - a >= max(min_h, rules.keep * (bottom - top)) \
                and b2 - a2 >= max(min_w, rules.keep * (right - left)):
            left, top, right, bottom = left + a2, top + a, left + b2, top + b
    box = (left, top, right, bottom)
    if right - left < min_w or bottom - top < min_h or depth >= rules.max_depth:
        return [box]
    rows = _cuts(arr[top:bottom, left:right], rules, min_h)
    if rows:
        return [p for a, b in rows for p in _split(arr, arr_t, (left, top + a, right, top + b), rules, min_w, min_h, depth + 1)]
    cols = _cuts(arr_t[left:right, top:bottom], rules, min_w)
    if cols:
        return [p for a, b in cols for p in _split(arr, arr_t, (left + a, top, left + b, bottom), rules, min_w, min_h, depth + 1)]
    return [box]


def find_panels(img: Image.Image, min_side: int = 64, min_fraction: float = 0.2, max_panels: int = 9,
                rules: SeamRules = SeamRules()) -> list[Box]:
    """The panels (left, top, right, bottom, in ``img`` pixels) of a collage, or [] when ``img`` is not one.

    A panel is at least ``min_side`` pixels and ``min_fraction`` of the picture's width and height; blank
    panels (an empty slot) are left out and nothing else is: a thin object on a plain backdrop is a panel to
    score. Fewer than two panels means no collage. More than ``max_panels`` (bounded work per request): the
    photos are grouped into larger panels (``min_fraction`` raised, up to 0.5: a 4x4 collage is 2x2 panels of
    2x2 photos), and if they still do not fit, the picture is scored whole.
    """
    arr, sx, sy = _work_array(img, rules.work_side)
    arr_t = np.ascontiguousarray(arr.transpose(1, 0, 2))
    fraction = min_fraction
    while True:
        panels = _panels(arr, arr_t, sx, sy, min_side, fraction, rules)
        if len(panels) <= max_panels or fraction >= 0.5:
            break
        fraction = min(0.5, fraction * 1.5)
    if not 2 <= len(panels) <= max_panels:
        return []
    W, H = img.size
    return [(min(W, round(l * sx)), min(H, round(t * sy)), min(W, round(r * sx)), min(H, round(b * sy)))
            for l, t, r, b in panels]


def _panels(arr: np.ndarray, arr_t: np.ndarray, sx: float, sy: float, min_side: int, min_fraction: float,
            rules: SeamRules) -> list[Box]:
    """The non-blank panels of the work image at this minimum panel size (work-image boxes); [] for none."""
    h, w = arr.shape[:2]
    min_w = max(int(np.ceil(min_side / sx)), int(np.ceil(min_fraction * w)), 8)
    min_h = max(int(np.ceil(min_side / sy)), int(np.ceil(min_fraction * h)), 8)
    if w < 2 * min_w and h < 2 * min_h:
        return []
    boxes = _split(arr, arr_t, (0, 0, w, h), rules, min_w, min_h, 0)
    if any(b[2] - b[0] < min_w or b[3] - b[1] < min_h for b in boxes):
        return []  # a piece too small for a panel (_cuts keeps panel-sized ones): score the picture whole
    return [b for b in boxes if not _blank(arr[b[1]:b[3], b[0]:b[2]], rules)]
