"""mnist-predict's preprocessing (mnist_cli/preprocess.py): time and memory per image, by size.

- MNIST's own test images saved as PNG files (28×28): images/s through load_digit.
- One drawn digit on pages from 1200×900 to 8000×8000 (the largest accepted, 64 Mpx), as
  PNG and as JPEG: the median time of load_digit over 3 reads, and the peak RSS of a child
  process that reads it once (the decoded image dominates: 1 byte a pixel for grey).
- Side by side for a 12 Mpx colour JPEG (a phone's photo): mnist_cli/preprocess.read_gray,
  which lets libjpeg decode at 1/2..1/8 scale (PIL's draft mode), against the same read
  decoding the full image first.

Part of `make bench`.

    python -m benchmarks.predict [--data PATH]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import argument_parser, check_data, header

# The child's own high-water mark (VmHWM): ru_maxrss would carry the parent's over exec.
PEAK = """
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024)
"""
READ_ONCE = ("import sys\nfrom mnist_cli.preprocess import load_digit\n"
             "load_digit(sys.argv[1])\n" + PEAK)
BASELINE = "import mnist_cli.preprocess, PIL.Image\n" + PEAK
SIZES = ((1200, 900), (4000, 3000), (8000, 6000), (8000, 8000))


def page(size: tuple[int, int]):
    """A digit drawn in a quarter of a page of `size`, with a pen 1/10 of its height."""
    from testbed.drawing import drawn_digit

    w, h = size
    box = (w // 10, h // 4, w // 10 + h * 3 // 8, h * 3 // 4)
    return drawn_digit("7", size=size, box=box, width=max(4, h // 20), noise=4)


def seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peak_mb(code: str, *args) -> float:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    return float(out.stdout.split()[-1])


def run(data: Path) -> dict:
    from PIL import Image

    from mnist_cli.preprocess import WORK_SIDE, load_digit, read_gray

    results = {}
    with tempfile.TemporaryDirectory(prefix="mnist-bench-predict-") as tmp:
        tmp = Path(tmp)
        with np.load(data) as f:
            images = f["x_test"][:500]
        files = []
        for i, image in enumerate(images):
            files.append(tmp / f"{i}.png")
            Image.fromarray(image).save(files[-1])
        took = seconds(lambda: [load_digit(f) for f in files], repeats=1)
        results["mnist_28x28_png_images_per_s"] = round(len(files) / took)
        results["python_baseline_peak_mb"] = round(peak_mb(BASELINE))
        for size in SIZES:
            image = page(size)
            for ext, options in ((".png", {"compress_level": 1}), (".jpg", {"quality": 90})):
                path = tmp / f"page-{size[0]}x{size[1]}{ext}"
                (image.convert("RGB") if ext == ".jpg" else image).save(path, **options)
                key = f"{size[0]}x{size[1]}{ext}"
                results[key] = {"mb_on_disk": round(path.stat().st_size / 1e6, 1),
                                "ms": round(1000 * seconds(lambda p=path: load_digit(p))),
                                "peak_rss_mb": round(peak_mb(READ_ONCE, path))}
            del image
        jpeg = tmp / "page-4000x3000.jpg"

        def without_draft():
            with Image.open(jpeg) as im:
                im = im.convert("L")
                im.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX)
                return np.asarray(im, dtype=np.float64)

        draft, full = seconds(lambda: read_gray(jpeg)), seconds(without_draft)
        results["jpeg_12mpx_read_gray_vs_full_decode"] = {
            "read_gray_ms": round(1000 * draft), "full_decode_ms": round(1000 * full),
            "ratio": round(draft / full, 2)}
    return results


def report(data: Path) -> None:
    """Measure, and print the results as JSON."""
    print("\nmnist-predict's preprocessing, per image file (benchmarks/predict.py)")
    print(json.dumps(run(data), indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("benchmarks.predict", __doc__)
    args = parser.parse_args(argv)
    check_data(args.data)
    header()
    report(args.data)


if __name__ == "__main__":
    main()
