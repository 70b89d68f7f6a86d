"""The accuracy/cost frontier: test errors against training cost, for the project's presets
and committees measured here, Keras' "Simple MNIST convnet" measured in the same run, and
the published points (cited, not measured here).

Cost is given two ways: multiply-adds of one image's forward pass × training images ×
epochs (× members, for a committee), comparable with papers whatever their hardware; and
seconds of training on this machine.

Each of `--models` is trained and evaluated by the stages once per `--seeds` (Keras,
shipped params but the seed, `--set`'s changes to its recipe and `--epochs`); committees
of `--committees K` of those seeds are scored from the runs' test probabilities; Keras'
example (benchmarks/keras_example.py) runs once per `--peer-seeds`. Prints one JSON line
per run as it ends, then the table: test errors (mean, spread, by verdict) against
multiply-adds × images × epochs and seconds here. `--plot DIR` also draws it
(frontier.svg) and the validation errors against training time of each preset
(curves.svg); `--keep DIR` keeps each run's test probabilities. Hours; not part of
`make bench`.

    python -m benchmarks.frontier [--data PATH] [--models fast cnn] [--seeds 42 1 2]
        [--epochs N] [--set KEY=VALUE ...] [--committees K ...] [--peer-seeds SEED ...]
        [--seeds-for MODEL=SEEDS ...] [--plot DIR] [--keep DIR]
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import sys
from pathlib import Path

import yaml

from benchmarks.committees import errors_of
from benchmarks.common import (
    ROOT,
    argument_parser,
    check_data,
    header,
    prepare_project,
    run_child,
    train_and_evaluate,
    train_seconds,
    trained_images,
)
from stages.runtime.params import MODEL_NAMES
from testbed.pipeline import paths

TEST_IMAGES = 10_000

# As their sources state them. Errors are MNIST's 10,000 test images; a mean accuracy is
# turned into errors, not rounded. `macs` is the forward multiply-adds per image (a range
# where the source gives several nets), `images` the training set size their recipe used.
PUBLISHED = [
    {"point": "An et al. 2020, single models (arXiv 2008.10400)",
     "accuracy": (0.9969, 0.9970), "macs": (140e6, 170e6), "epochs": 150, "images": 60_000,
     "members": 1, "note": "mean over 30 seeds, read at the last epoch"},
    {"point": "Byerly et al. 2020, single models (arXiv 2001.09136)",
     "accuracy": (0.9968, 0.9969), "macs": None, "epochs": 300, "images": 60_000,
     "members": 1, "note": "mean over their seeds, last epoch; multiply-adds not stated"},
    {"point": "Deotte (Kaggle), single nets",
     "accuracy": (0.99641, 0.99641), "macs": (15e6, 15e6), "epochs": 30, "images": 42_000,
     "members": 1, "note": "mean over 1,500 nets; Kaggle's 42,000 training images"},
    {"point": "Deotte (Kaggle), ensembles of 15",
     "accuracy": (0.99745, 0.99745), "macs": (15e6, 15e6), "epochs": 30, "images": 42_000,
     "members": 15, "note": "mean over ensembles of 15 such nets"},
]


def forward_macs(model) -> int:
    """Multiply-adds of one image's forward pass through a built Keras model: its Conv2D
    and Dense layers (the elementwise work, pooling and BatchNorm are left out)."""
    from stages.frameworks.keras.env import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, channels = layer.output.shape
            kh, kw = layer.kernel_size
            total += height * width * channels * kh * kw * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            total += layer.input.shape[-1] * layer.units
    return int(total)


def preset_macs(name: str) -> int:
    from stages.frameworks.keras.model import build

    return forward_macs(build(name))


def cost(macs: float, images: int, epochs: int, members: int = 1) -> float:
    return macs * images * epochs * members


def measured_row(point: str, runs: list[dict], macs: int, members: int = 1) -> dict:
    """One measured point over its runs: each run {seed(s), epochs, images, train_seconds,
    test_errors, test_accuracy, and verdict counts where known}."""
    errors = [r["test_errors"] for r in runs]
    first = runs[0]
    row = {"point": point, "measured": True, "members": members, "epochs": first["epochs"],
           "seeds": [r["seed"] for r in runs], "errors": statistics.mean(errors),
           "accuracy": statistics.mean(r["test_accuracy"] for r in runs),
           "min": min(errors), "max": max(errors), "macs": macs,
           "cost": cost(macs, first["images"], first["epochs"], members),
           "seconds": statistics.median(r["train_seconds"] for r in runs) * members}
    if all("model_errors" in r for r in runs):
        row["verdicts"] = tuple(statistics.mean(r[k] for r in runs)
                                for k in ("label_errors", "ambiguous", "model_errors"))
    return row


def published_rows() -> list[dict]:
    rows = []
    for p in PUBLISHED:
        lo, hi = ((1 - a) * TEST_IMAGES for a in reversed(p["accuracy"]))
        costs = (None if p["macs"] is None else
                 tuple(cost(m, p["images"], p["epochs"], p["members"]) for m in p["macs"]))
        rows.append({"point": p["point"], "measured": False, "members": p["members"],
                     "epochs": p["epochs"], "seeds": None, "errors": (lo + hi) / 2,
                     "accuracy": sum(p["accuracy"]) / 2,
                     "min": lo, "max": hi, "macs": p["macs"], "cost": costs,
                     "seconds": None, "note": p["note"]})
    return rows


def _range(value, fmt) -> str:
    if value is None:
        return "–"
    if isinstance(value, tuple):
        lo, hi = value
        return fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"
    return fmt(value)


def _sci(x: float) -> str:
    exponent = math.floor(math.log10(x))
    return f"{x / 10 ** exponent:.2g}e{exponent}"


def table(rows: list[dict]) -> str:
    """The frontier as Markdown, cheapest first (rows without a stated cost last)."""
    def key(r):
        c = r["cost"]
        return (c is None, (c[0] if isinstance(c, tuple) else c) or 0)

    lines = ["| point | measured here | test errors: mean (min–max) | accuracy | verdicts: "
             "label / ambiguous / model | multiply-adds per image | epochs | cost (multiply-"
             "adds × images × epochs) | training here (s) |", "|---" * 9 + "|"]
    for r in sorted(rows, key=key):
        errors = (f"{r['errors']:.1f} ({r['min']:g}–{r['max']:g})" if r["measured"] else
                  _range((round(r["min"], 1), round(r["max"], 1)), lambda v: f"{v:g}"))
        seeds = f", seeds {', '.join(map(str, r['seeds']))}" if r.get("seeds") else ""
        verdicts = ("–" if "verdicts" not in r else
                    " / ".join(f"{v:.1f}" for v in r["verdicts"]))
        epochs = f"{r['epochs']}" + (f" × {r['members']} nets" if r["members"] > 1 else "")
        seconds = "–" if r["seconds"] is None else f"{r['seconds']:.0f}"
        where = "yes" if r["measured"] else f"no: {r['note']}"
        lines.append(f"| {r['point']}{seeds} | {where} | {errors} | {r['accuracy']:.2%} | "
                     f"{verdicts} | {_range(r['macs'], _sci)} | {epochs} | "
                     f"{_range(r['cost'], _sci)} | {seconds} |")
    return "\n".join(lines)


# --- the measurements: the stages run once per preset and seed ----------------------------

def epoch_log(stdout: str) -> list[tuple[float, float | None]]:
    """(seconds, validation accuracy or None) of each epoch, from the train stage's lines
    `epoch 3/24 41.2s ... eval/accuracy=0.9931 ...`."""
    log = []
    for line in stdout.splitlines():
        found = re.match(r"epoch \d+/\d+ ([\d.]+)s", line)
        if found:
            val = re.search(r"eval/accuracy=([\d.]+)", line)
            log.append((float(found[1]), float(val[1]) if val else None))
    return log


def recipe_changes(pairs: list[str]) -> dict:
    """`--set ema=0.999 elastic=0` -> {"ema": 0.999, "elastic": 0} (values read as YAML)."""
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set {pair!r}: expected KEY=VALUE, e.g. ema=0.999")
        changes[key] = yaml.safe_load(value)
    return changes


def seeds_for(pairs: list[str]) -> dict[str, list[int]]:
    """`--seeds-for cnn=42 fast=1,2` -> {"cnn": [42], "fast": [1, 2]}."""
    out = {}
    for pair in pairs:
        model, sep, seeds = pair.partition("=")
        try:
            if not sep or model not in MODEL_NAMES:
                raise ValueError
            out[model] = [int(seed) for seed in seeds.split(",")]
        except ValueError:
            raise SystemExit(f"error: --seeds-for {pair!r}: expected MODEL=SEED[,SEED...] "
                             f"with MODEL one of {', '.join(MODEL_NAMES)}") from None
    return out


def variant(model: str, changes: dict) -> str:
    """A frontier row's name: the preset, and the recipe keys changed from its params."""
    return model + (f" ({', '.join(f'{k}={v}' for k, v in changes.items())})"
                    if changes else "")


def bench_frontier(data: Path, models: list[str], seeds: list[int], epochs: int | None,
                   changes: dict | None = None, committees: tuple[int, ...] = (),
                   peer_seeds: tuple[int, ...] = (), keep: Path | None = None,
                   seeds_for: dict[str, list[int]] | None = None) -> dict:
    """Each preset trained and evaluated by the stages once per seed (Keras, shipped params
    but the seed and `changes` to its recipe; `epochs` shortens them); committees of k of
    its seeds (consecutive, disjoint sets) from the runs' test probabilities; Keras' "Simple
    MNIST convnet" once per peer seed (benchmarks/keras_example.py). Returns the frontier's
    rows and each preset's validation curves; `keep`: a folder where each run's test
    probabilities stay ({preset}-{seed}.npz), to combine later; `seeds_for`: other seeds
    for some presets (e.g. one seed of the slow default)."""
    import numpy as np

    rows, curves, val_images = [], {}, 0
    changes = dict(changes or {})
    for model in models:
        name = variant(model, changes)
        recipe = changes | ({"epochs": epochs} if epochs else {})
        project = prepare_project(data, {"train": {"model": model, model: recipe}})
        runs, probabilities = [], []
        try:
            y = np.load(project / paths()["raw"])["y_test"]
            for seed in (seeds_for or {}).get(model, seeds):
                child, metrics = train_and_evaluate(project, seed)
                log = epoch_log(child["stdout"])
                runs.append({"seed": seed, "epochs": len(log),
                             "images": trained_images(child["stdout"]),
                             "train_seconds": train_seconds(child["stdout"]),
                             "test_errors": metrics["errors"],
                             "test_accuracy": metrics["accuracy"],
                             **{k: metrics[k] for k in ("label_errors", "ambiguous",
                                                         "model_errors") if k in metrics}})
                print(json.dumps(runs[-1]), flush=True)
                curves.setdefault(name, []).append(log)
                held_out = re.search(r"(\d+) held out for validation", child["stdout"])
                val_images = int(held_out[1]) if held_out else val_images
                with np.load(project / paths()["predictions"]) as f:
                    probabilities.append(f["probabilities"])
                if keep:
                    keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(project / paths()["predictions"], keep / f"{model}-{seed}.npz")
        finally:
            shutil.rmtree(project, ignore_errors=True)
        macs = preset_macs(model)
        rows.append(measured_row(name, runs, macs))
        for k in committees:
            sets = [list(range(i, i + k)) for i in range(0, len(runs) - k + 1, k)]
            if not sets:
                continue
            members = []
            for chosen in sets:
                errors = errors_of(y, [probabilities[i] for i in chosen])
                members.append({"seed": "+".join(str(runs[i]["seed"]) for i in chosen),
                                "epochs": runs[0]["epochs"], "images": runs[0]["images"],
                                "train_seconds": statistics.mean(runs[i]["train_seconds"]
                                                                 for i in chosen),
                                "test_errors": errors, "test_accuracy": 1 - errors / len(y)})
            print(json.dumps({"committee": k, "of": name, "sets": members}), flush=True)
            rows.append(measured_row(f"{name}, committee of {k}", members, macs, k))
    if peer_seeds:
        runs = []
        for seed in peer_seeds:
            child = run_child([sys.executable, "-m", "benchmarks.keras_example", str(data),
                               str(seed)], ROOT)
            runs.append(json.loads(child["stdout"].strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
        rows.append(measured_row('Keras example "Simple MNIST convnet"', runs,
                                 runs[0]["macs"]) | {"peer": True})
    return {"rows": rows + published_rows(), "curves": curves,
            "val_images": val_images}


# --- the plots: plain SVG, no plotting library ---------------------------------------------

WIDTH, HEIGHT, MARGIN = 760, 460, 70
MARKS = {"preset": "#1f6feb", "committee": "#8250df", "peer": "#d1242f", "published": "#57606a"}


def _svg(title: str, x_label: str, y_label: str, body: list[str], ticks: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'font-family="sans-serif" font-size="11">\n'
            f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>\n'
            f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>\n'
            f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - 20}" '
            f'y2="{HEIGHT - MARGIN}" stroke="black"/>\n'
            f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{MARGIN}" y2="40" stroke="black"/>\n'
            f'<text x="{WIDTH / 2}" y="{HEIGHT - 25}" text-anchor="middle">{x_label}</text>\n'
            f'<text x="18" y="{HEIGHT / 2}" text-anchor="middle" '
            f'transform="rotate(-90 18 {HEIGHT / 2})">{y_label}</text>\n'
            + "".join(ticks) + "".join(body) + "</svg>\n")


def _scale(lo: float, hi: float, out_lo: float, out_hi: float):
    span = (hi - lo) or 1.0
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def _y_axis(lo: float, hi: float, y) -> list[str]:
    step = max(1, round((hi - lo) / 8))
    return [f'<text x="{MARGIN - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v}</text>'
            f'<line x1="{MARGIN}" y1="{y(v):.1f}" x2="{WIDTH - 20}" y2="{y(v):.1f}" '
            'stroke="#eee"/>\n' for v in range(math.floor(lo), math.ceil(hi) + 1, step)]


def kind(row: dict) -> str:
    if not row["measured"]:
        return "published"
    if row["members"] > 1:
        return "committee"
    return "peer" if row.get("peer") else "preset"


def frontier_svg(rows: list[dict]) -> str:
    """Test errors (mean, min–max bar) against cost, log scale; rows without a cost left out."""
    shown = [r for r in rows if r["cost"] is not None]
    costs = [c for r in shown for c in (r["cost"] if isinstance(r["cost"], tuple)
                                          else (r["cost"],))]
    lo_x, hi_x = math.floor(math.log10(min(costs))), math.ceil(math.log10(max(costs)))
    x = _scale(lo_x, hi_x, MARGIN, WIDTH - 40)
    lo_y = min(r["min"] for r in shown) - 3
    hi_y = max(r["max"] for r in shown) + 3
    y = _scale(lo_y, hi_y, HEIGHT - MARGIN, 50)
    ticks = _y_axis(lo_y, hi_y, y) + [
        f'<text x="{x(e):.1f}" y="{HEIGHT - MARGIN + 16}" text-anchor="middle">1e{e}</text>\n'
        for e in range(lo_x, hi_x + 1)]
    body = []
    for r in shown:
        c = r["cost"]
        cx = x(math.log10(math.sqrt(c[0] * c[1]) if isinstance(c, tuple) else c))
        color = MARKS[kind(r)]
        fill = color if r["measured"] else "white"
        body.append(f'<line x1="{cx:.1f}" y1="{y(r["min"]):.1f}" x2="{cx:.1f}" '
                    f'y2="{y(r["max"]):.1f}" stroke="{color}"/>'
                    f'<circle cx="{cx:.1f}" cy="{y(r["errors"]):.1f}" r="5" fill="{fill}" '
                    f'stroke="{color}" stroke-width="2"/>'
                    f'<text x="{cx + (8 if cx < WIDTH / 2 else -8):.1f}" '
                    f'y="{y(r["errors"]) - 6:.1f}" fill="{color}" '
                    f'text-anchor="{"start" if cx < WIDTH / 2 else "end"}">'
                    f'{_escape(r["point"])}</text>\n')
    legend = [f'<text x="{WIDTH - 120}" y="{60 + 14 * i}" fill="{c}">● {k}</text>\n'
              for i, (k, c) in enumerate(MARKS.items())]
    return _svg("MNIST: test errors against training cost",
                "cost: multiply-adds per image × training images × epochs (× members)",
                "test errors of 10,000 (mean; bar: min–max)", body + legend, ticks)


def curves_svg(curves: dict[str, list[list[tuple[float, float]]]], val_images: int) -> str:
    """Validation errors against training seconds: one line per run, a colour per preset.
    curves: preset -> runs -> [(seconds, validation accuracy) per epoch]."""
    points = {name: [[(sum(s for s, _ in run[:i + 1]), (1 - acc) * val_images)
                      for i, (_, acc) in enumerate(run)] for run in runs]
              for name, runs in curves.items()}
    every = [p for runs in points.values() for run in runs for p in run]
    x = _scale(0, max(s for s, _ in every), MARGIN, WIDTH - 40)
    hi_y = min(max(e for _, e in every), 60.0)
    y = _scale(0, hi_y, HEIGHT - MARGIN, 50)
    ticks = _y_axis(0, hi_y, y) + [
        f'<text x="{x(t):.1f}" y="{HEIGHT - MARGIN + 16}" text-anchor="middle">{t:.0f}</text>\n'
        for t in _round_ticks(max(s for s, _ in every))]
    palette = ["#1f6feb", "#d1242f", "#1a7f37", "#8250df", "#bf8700"]
    body = []
    for i, (name, runs) in enumerate(points.items()):
        color = palette[i % len(palette)]
        for run in runs:
            path = " ".join(f"{x(s):.1f},{y(min(e, hi_y)):.1f}" for s, e in run)
            body.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                        'stroke-opacity="0.7"/>\n')
            body += [f'<circle cx="{x(s):.1f}" cy="{y(min(e, hi_y)):.1f}" r="2" '
                     f'fill="{color}"/>' for s, e in run]
        body.append(f'<text x="{WIDTH - 200}" y="{60 + 14 * i}" fill="{color}">— '
                    f'{_escape(name)}</text>\n')
    return _svg("Validation errors against training time (one line per seed)",
                "training seconds on this machine",
                f"validation errors of {val_images:,}", body, ticks)


def _round_ticks(top: float) -> list[float]:
    step = 10 ** math.floor(math.log10(top / 5)) if top > 5 else 1
    for factor in (1, 2, 5, 10):
        if top / (step * factor) <= 8:
            step *= factor
            break
    return [i * step for i in range(int(top // step) + 1)]


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_plots(rows: list[dict], curves: dict, val_images: int, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "frontier.svg", folder / "curves.svg"]
    written[0].write_text(frontier_svg(rows))
    written[1].write_text(curves_svg(curves, val_images))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("benchmarks.frontier", __doc__)
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=["mlp"],
                        help="the presets to train (default: mlp)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2],
                        help="one training per seed and preset (default: 42 1 2)")
    parser.add_argument("--epochs", type=int, help="shorten every recipe to N epochs")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="change each preset's recipe (e.g. ema=0)")
    parser.add_argument("--committees", type=int, nargs="*", default=[], metavar="K",
                        help="committees of K of each preset's seeds")
    parser.add_argument("--peer-seeds", type=int, nargs="*", default=[42], metavar="SEED",
                        help="the Keras example's seeds (default: 42)")
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="MODEL=SEEDS",
                        help="other seeds for a preset, e.g. cnn=42 or cnn=42,1")
    parser.add_argument("--plot", type=Path, metavar="DIR",
                        help="also draw frontier.svg and curves.svg into DIR")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep each run's test probabilities in DIR")
    args = parser.parse_args(argv)
    changes, other_seeds = recipe_changes(args.set), seeds_for(args.seeds_for)
    check_data(args.data)
    header()
    print(f"\nfrontier: {', '.join(args.models)} in Keras, shipped params"
          f"{' but ' + str(changes) if changes else ''}, seeds {args.seeds} "
          f"(train + evaluate stages); committees of {args.committees or 'none'}; the Keras "
          f"example, seeds {args.peer_seeds or 'none'}")
    result = bench_frontier(args.data, args.models, args.seeds, args.epochs, changes,
                            tuple(args.committees), tuple(args.peer_seeds), args.keep,
                            other_seeds)
    print(table(result["rows"]))
    if args.plot:
        for path in write_plots(result["rows"], result["curves"], result["val_images"],
                                args.plot):
            print(f"plot -> {path}")


if __name__ == "__main__":
    main()
