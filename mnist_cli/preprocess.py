"""From an image file to the 28×28 digit a model trained on MNIST sees.

MNIST's own preprocessing, as LeCun, Bottou, Bengio and Haffner describe it ("Gradient-based
learning applied to document recognition", Proc. IEEE 1998, section III-A, and the MNIST
page): NIST's bilevel images were "size normalized to fit in a 20×20 pixel box while
preserving their aspect ratio", which gave grey levels by anti-aliasing, then "centered in a
28×28 image by computing the center of mass of the pixels". Photos and scans need more
(steps marked * are not in the paper: its inputs were clean bilevel scans):

1.* read, bounded: the size in the header is checked before anything is decoded
    (MAX_PIXELS); JPEGs decode at a reduced scale; the EXIF orientation is applied;
    transparency is laid over white; colour becomes grey (ITU-R 601 luma).
2.* work at WORK_SIDE px on the long side at most (area-averaged): bounds time and memory.
3.* light ink on black, as MNIST: the background is the median of the image's outer ring,
    and the image is inverted when its darkest pixel is farther from it than its lightest
    (dark ink on light paper).
4.* paper to 0, ink to 1: Otsu's threshold splits ink from paper; pixels up to the paper's
    median + 4σ (σ from its median absolute deviation) are paper, exactly 0 as MNIST's
    background; the ink's 90th percentile maps to 1.
5.* crop to the ink: connected pieces (8-neighbours) holding under 5% of the heaviest
    piece's ink are dust, dropped; the crop is the box around what is left.
6.  fit 20×20 keeping the aspect ratio: the long side becomes 20 px, area-averaged when
    shrinking (the paper's anti-aliasing), bicubic when enlarging; then stretched so the
    lightest pixel is 1 (90% of MNIST's images reach 255).
7.  centre of mass at (14, 14) of the 28×28 field, by a whole-pixel shift: where MNIST's
    digits have theirs (test set: mean (13.99, 14.01), std 0.29 px).

An MNIST image goes through nearly unchanged (tests/unit/test_preprocess.py). What it
cannot undo: several digits or a shadow in the frame (all of it counts as ink), strong
uneven lighting.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.runtime.failures import DataError

SIDE = 28          # MNIST's field
BOX = 20           # the box the digit is fitted into
CENTRE = 14.0      # where its centre of mass goes, in pixel indices (row, column)
MAX_PIXELS = 64_000_000   # 8000×8000: more than a phone's photo, far less than a bomb
WORK_SIDE = 256    # pixels on the long side the steps after reading work at
MIN_CONTRAST = 24  # grey levels (of 255) between paper and ink below which nothing is drawn
DUST = 0.05        # pieces with less ink than this share of the heaviest one are dropped


class ImageError(DataError):
    """An image that cannot be read, or holds no digit to classify."""


def _open(path):
    """PIL's lazy open (the header only), its own size guard off: read_gray refuses every
    image over MAX_PIXELS, with its size, before decoding a byte of it."""
    from PIL import Image

    guard = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = guard


def read_gray(path) -> np.ndarray:
    """The image at `path` as grey levels 0..255 (float64), WORK_SIDE px long at most."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        image = _open(path)
        with image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"{path}: {width}×{height} pixels is more than the "
                                 f"{MAX_PIXELS // 1_000_000} megapixels this reads")
            image.draft("L", (WORK_SIDE, WORK_SIDE))  # JPEG: decode at 1/2..1/8 scale
            image = ImageOps.exif_transpose(image)
            if "A" in image.getbands() or "transparency" in image.info:
                image = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
            image = image.convert("L")
            image.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX)
            return np.asarray(image, dtype=np.float64)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (PNG, JPEG, BMP, GIF, ...)") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated or damaged data
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ImageError(f"{path}: cannot read the image ({reason})") from None


def light_on_dark(gray: np.ndarray) -> np.ndarray:
    """The image with light ink on a dark background (step 3), inverted when needed."""
    ring = max(1, round(0.02 * min(gray.shape)))
    border = np.concatenate([gray[:ring].ravel(), gray[-ring:].ravel(),
                             gray[:, :ring].ravel(), gray[:, -ring:].ravel()])
    background = np.median(border)
    if background - gray.min() > gray.max() - background:
        return 255.0 - gray
    return gray


def otsu(gray: np.ndarray) -> float:
    """Otsu's threshold: the grey level that best splits the histogram into two classes."""
    hist = np.bincount(np.clip(np.rint(gray), 0, 255).astype(np.int64).ravel(),
                       minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight = np.cumsum(hist)
    mass = np.cumsum(hist * levels)
    below, above = weight, weight[-1] - weight
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mass[-1] * below - mass * weight[-1]) ** 2 / (below * above)
    between[~np.isfinite(between)] = -1.0
    return float(levels[int(np.argmax(between))])


def ink(gray: np.ndarray) -> np.ndarray:
    """Paper 0, ink up to 1 (step 4), from light-on-dark grey levels."""
    threshold = otsu(gray)
    paper, strokes = gray[gray <= threshold], gray[gray > threshold]
    if strokes.size == 0:
        raise ImageError("no digit: the image is blank")
    level = np.median(paper)
    floor = level + 4 * 1.4826 * np.median(np.abs(paper - level))
    top = np.percentile(strokes, 90)
    if top - floor < MIN_CONTRAST:
        raise ImageError(f"no digit: ink and paper differ by {max(top - floor, 0):.0f} grey "
                         f"levels, under {MIN_CONTRAST}")
    return np.clip((gray - floor) / (top - floor), 0.0, 1.0)


def pieces(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected pieces of a boolean image (8-neighbours): labels 1..n (0 = background), n.

    Union-find over each row's runs of set pixels: time and memory grow with the runs, at
    most half the pixels, so any image of WORK_SIDE² pixels is labelled in bounded time.
    """
    runs = []  # (row, start, end) with end exclusive
    for r, row in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], row.astype(np.int8), [0]))))
        runs += [(r, int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]
    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous, current, row_of = [], [], -1
    for i, (r, s, e) in enumerate(runs):
        if r != row_of:
            previous, current = (current if r == row_of + 1 else []), []
            row_of = r
        for j in previous:  # runs of the row above; they touch when they overlap by a diagonal
            _, ps, pe = runs[j]
            if ps <= e and pe >= s:
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        current.append(i)
    labels = np.zeros(mask.shape, dtype=np.int32)
    names: dict[int, int] = {}
    for i, (r, s, e) in enumerate(runs):
        labels[r, s:e] = names.setdefault(root(i), len(names) + 1)
    return labels, len(names)


def without_dust(strokes: np.ndarray) -> np.ndarray:
    """The ink with pieces under DUST of the heaviest piece's ink removed (step 5)."""
    labels, n = pieces(strokes > 0)
    mass = np.bincount(labels.ravel(), weights=strokes.ravel(), minlength=n + 1)
    mass[0] = 0.0
    keep = mass >= DUST * mass.max()
    keep[0] = False
    return np.where(keep[labels], strokes, 0.0)


def crop(strokes: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(strokes.any(axis=1)), np.flatnonzero(strokes.any(axis=0))
    return strokes[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def fit(digit: np.ndarray, box: int = BOX) -> np.ndarray:
    """The digit scaled so its long side is `box` px, aspect kept, lightest pixel 1 (step 6)."""
    from PIL import Image

    h, w = digit.shape
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    filt = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
    resized = Image.fromarray(digit.astype(np.float32), mode="F").resize(size, filt)
    out = np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)
    return out / out.max() if out.max() > 0 else out


def centre(digit: np.ndarray, side: int = SIDE, at: float = CENTRE) -> np.ndarray:
    """The digit placed in a side×side field with its centre of mass at (at, at) (step 7)."""
    h, w = digit.shape
    total = digit.sum()
    cy = (digit.sum(axis=1) @ np.arange(h)) / total
    cx = (digit.sum(axis=0) @ np.arange(w)) / total
    top = int(np.clip(np.rint(at - cy), 0, side - h))
    left = int(np.clip(np.rint(at - cx), 0, side - w))
    field = np.zeros((side, side), dtype=np.float64)
    field[top:top + h, left:left + w] = digit
    return field


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Grey levels 0..255 of any size -> the 28×28 float32 digit in [0, 1] a model reads."""
    gray = np.asarray(gray, dtype=np.float64)
    span = float(gray.max() - gray.min()) if gray.size else 0.0
    if span < MIN_CONTRAST:
        raise ImageError(f"no digit: the image is blank (its grey levels span {span:.0f}, "
                         f"under {MIN_CONTRAST})")
    strokes = without_dust(ink(light_on_dark(gray)))
    return centre(fit(crop(strokes))).astype(np.float32)


def load_digit(path) -> np.ndarray:
    """The image file at `path` as the 28×28 digit a model reads; ImageError when it
    cannot be read or holds no digit."""
    try:
        return to_mnist(read_gray(path))
    except ImageError as err:
        message = str(err)
        raise ImageError(message if message.startswith(f"{path}:")
                         else f"{path}: {message}") from None
