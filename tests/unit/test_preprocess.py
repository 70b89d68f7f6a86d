"""mnist_cli/preprocess.py: image files of any size and format become MNIST-like 28×28 digits.

Real image files, written in the test by PIL, go through the real reader. No model here:
what the model makes of them is tests/integration/test_predict.py.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from PIL import Image

from mnist_cli import preprocess
from mnist_cli.preprocess import ImageError, load_digit
from testbed.drawing import drawn_digit
from tests.digits import fixture_data
from tests.hostile import MEMORY_BOUND_MIB, TIME_BOUND_S, png_bomb, probe


def centre_of_mass(digit: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(digit.shape)
    return (rows * digit).sum() / digit.sum(), (cols * digit).sum() / digit.sum()


def ink_box(digit: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def saved(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


# --- MNIST itself goes through nearly unchanged ------------------------------------------


def test_a_test_image_of_mnist_is_nearly_unchanged(tmp_path):
    """MNIST's own images already are what the steps produce: light ink on 0, the long side
    20 px, the centre of mass at (14, 14) within half a pixel for most of them."""
    images = fixture_data()["x_test"]
    worst, unchanged = [], 0
    for i, image in enumerate(images[:200]):
        digit = load_digit(saved(Image.fromarray(image), tmp_path / f"{i}.png"))
        diff = np.abs(digit - image / 255)
        worst.append(diff.max())
        unchanged += diff.max() < 0.02
    # Most are the same to 2% of a grey level's range; the rest moved by one pixel, where
    # their centre of mass was over half a pixel off (14, 14).
    assert unchanged >= 180, sorted(worst)[-25:]
    assert np.mean([w < 0.02 for w in worst]) == unchanged / 200


def test_its_measured_centre_of_mass_is_where_the_steps_put_it():
    """The CENTRE constant is MNIST's: the fixture's test images average (14, 14)."""
    images = fixture_data()["x_test"].astype(np.float64)
    centres = np.array([centre_of_mass(x) for x in images])
    assert np.allclose(centres.mean(axis=0), preprocess.CENTRE, atol=0.1)
    sides = np.array([max(ink_box(x)) for x in images])
    assert np.mean(sides == preprocess.BOX) > 0.95


# --- a digit drawn anywhere on a page ------------------------------------------------------


def test_a_digit_drawn_dark_on_light_off_centre_becomes_an_mnist_digit(tmp_path):
    page = saved(drawn_digit("7", size=(1200, 900), box=(60, 420, 360, 860)),
                 tmp_path / "7.png")
    digit = load_digit(page)
    assert digit.shape == (28, 28) and digit.dtype == np.float32
    assert digit.min() == 0 and digit.max() == 1
    # The frame is background: MNIST's digits keep 4 px of black around their 20×20 box.
    assert np.count_nonzero(digit == 0) > 28 * 28 * 0.6
    assert max(ink_box(digit)) == preprocess.BOX
    assert np.allclose(centre_of_mass(digit), preprocess.CENTRE, atol=0.5)
    # The same strokes drawn light on black in a canvas of their own size, then only fitted
    # and centred (steps 6 and 7): the page's inversion, levels and crop lost nothing.
    alone = drawn_digit("7", size=(326, 466), box=(13, 13, 313, 453), ink=255, paper=0)
    reference = np.asarray(alone, dtype=np.float64) / 255
    reference = preprocess.centre(preprocess.fit(preprocess.crop(reference)))
    assert np.corrcoef(digit.ravel(), reference.ravel())[0, 1] > 0.97
    assert np.abs(digit - reference).mean() < 0.02


def alike(a: np.ndarray, b: np.ndarray) -> float:
    """The correlation of two digits, the best over whole-pixel shifts of at most one: the
    centring rounds the centre of mass to a whole pixel, so a digit moved by a fraction of
    a pixel on the page can land one pixel over."""
    return max(np.corrcoef(np.roll(a, (dy, dx), (0, 1)).ravel(), b.ravel())[0, 1]
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


# MNIST's strokes are about 1/8 of the digit's height; a pen of 40 px on a 400 px digit.
PEN = 40


def test_ink_colour_size_position_format_and_noise_do_not_matter(tmp_path):
    base = load_digit(saved(drawn_digit("4", width=PEN), tmp_path / "base.png"))
    variants = {
        "light ink on dark paper": drawn_digit("4", width=PEN, ink=230, paper=20),
        "grey ink on grey paper": drawn_digit("4", width=PEN, ink=90, paper=170),
        "another place": drawn_digit("4", width=PEN, box=(480, 250, 780, 650)),
        "twice the size": drawn_digit("4", size=(1800, 1400), box=(240, 160, 840, 960),
                                      width=2 * PEN),
        "noisy paper": drawn_digit("4", width=PEN, noise=10),
    }
    for name, image in variants.items():
        digit = load_digit(saved(image, tmp_path / "v.png"))
        assert alike(digit, base) > 0.95, name
    for ext, options in ((".jpg", {"quality": 85}), (".bmp", {}), (".gif", {}),
                         (".webp", {})):
        image = drawn_digit("4", width=PEN, noise=4)
        image = image.convert("RGB") if ext == ".jpg" else image
        digit = load_digit(saved(image, tmp_path / f"v{ext}", **options))
        assert alike(digit, base) > 0.95, ext


def test_a_colour_photo_in_portrait_by_exif_and_a_transparent_png(tmp_path):
    base = load_digit(saved(drawn_digit("2", width=PEN), tmp_path / "base.png"))
    # A camera stores the sensor's landscape pixels and an Orientation tag: 6 = rotate 90°
    # clockwise to display. Stored rotated the other way, shown upright.
    sensor = drawn_digit("2", width=PEN).rotate(90, expand=True).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = load_digit(saved(sensor, tmp_path / "photo.jpg", quality=90, exif=exif))
    assert alike(photo, base) > 0.95
    # Without the tag the same pixels are a digit lying on its side.
    sideways = load_digit(saved(sensor, tmp_path / "sideways.jpg", quality=90))
    assert alike(sideways, base) < 0.6
    # Black ink on a transparent background: the transparency is laid over white paper.
    ink = np.asarray(drawn_digit("2", width=PEN, ink=0, paper=255), dtype=np.uint8)
    rgba = np.zeros(ink.shape + (4,), np.uint8)
    rgba[..., 3] = 255 - ink  # opaque where the ink is
    clear = load_digit(saved(Image.fromarray(rgba, "RGBA"), tmp_path / "clear.png"))
    assert alike(clear, base) > 0.95


def test_the_aspect_ratio_is_kept_and_dust_is_dropped(tmp_path):
    one = load_digit(saved(drawn_digit("1"), tmp_path / "1.png"))
    height, width = ink_box(one)
    assert height == 20 and width <= 8
    dusty = drawn_digit("1")
    pixels = np.asarray(dusty).copy()
    for y, x in ((30, 800), (650, 40), (620, 860), (40, 40)):  # specks far from the digit
        pixels[y:y + 6, x:x + 6] = 30
    assert np.array_equal(load_digit(saved(Image.fromarray(pixels), tmp_path / "d.png")), one)


def test_pieces_are_the_8_connected_components():
    rng = np.random.default_rng(1)
    for density in (0.2, 0.45, 0.6):
        mask = rng.random((40, 60)) < density
        labels, n = preprocess.pieces(mask)
        expected = flood_fill_count(mask)
        assert n == expected
        assert np.array_equal(labels > 0, mask)
        for label in range(1, n + 1):  # every label is one connected piece
            assert flood_fill_count(labels == label) == 1


def flood_fill_count(mask: np.ndarray) -> int:
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        seen[start] = True
        todo = deque([start])
        while todo:
            r, c = todo.popleft()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if (0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc]
                            and not seen[rr, cc]):
                        seen[rr, cc] = True
                        todo.append((rr, cc))
    return count


# --- what is not a digit: one line each ----------------------------------------------------


def test_files_that_hold_no_digit_get_one_line_naming_them(tmp_path):
    cases = {
        "missing.png": (None, "no such file"),
        "notes.png": (b"a shopping list, not an image\n", "not an image"),
        "empty.png": (b"", "not an image"),
        "white.png": (Image.new("L", (300, 200), 255), "blank"),
        "grey.gif": (Image.new("RGB", (300, 200), (128, 128, 128)), "blank"),
        "faint.png": (drawn_digit("3", ink=225, paper=235), "grey levels span 10"),
        "cut.png": (b"", "cannot read the image"),
    }
    for name, (content, _) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            content.save(path)
    whole = (saved(drawn_digit("3"), tmp_path / "whole.png")).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
    for name, (_, expected) in cases.items():
        with pytest.raises(ImageError) as err:
            load_digit(tmp_path / name)
        message = str(err.value)
        assert message.startswith(f"{tmp_path / name}: ") and expected in message, message
        assert "\n" not in message
    with pytest.raises(ImageError, match="is a directory"):
        load_digit(tmp_path)


@pytest.mark.slow
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    """20000×20000 (400 Mpx, 400 MB as grey bytes) in a 50 KB file: refused with its size,
    in a child that never holds more than a fraction of the image."""
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 200_000
    outcome = probe("from mnist_cli.preprocess import load_digit\nresult = load_digit(args[0])",
                    bomb)
    assert outcome["error"] == "ImageError"
    assert outcome["message"] == (f"{bomb}: 20000×20000 pixels is more than the 64 "
                                  "megapixels this reads")
    assert outcome["peak_mib"] < MEMORY_BOUND_MIB and outcome["seconds"] < TIME_BOUND_S


@pytest.mark.slow
def test_the_largest_image_it_reads_costs_bounded_memory_and_time(tmp_path):
    """8000×8000 (64 Mpx) is read, shrunk to the working size and classified in bounds."""
    big = drawn_digit("0", size=(8000, 8000), box=(1000, 1000, 5000, 7000), width=300)
    path = saved(big, tmp_path / "big.png", compress_level=1)
    del big
    outcome = probe("from mnist_cli.preprocess import load_digit\n"
                    "result = float(load_digit(args[0]).sum())", path)
    assert "error" not in outcome, outcome
    # The decoded grey image is 64 MB; the working copy is WORK_SIDE² pixels.
    assert outcome["peak_mib"] < 64 + MEMORY_BOUND_MIB and outcome["seconds"] < TIME_BOUND_S
