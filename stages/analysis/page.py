"""reports/errors.html: one static page to look at the model's mistakes.

Self-contained: every image is an inline data: URI (PNG), the only style is an inline
<style>, there is no script, and a Content-Security-Policy forbids loading anything else,
so the page opens from a file, an artifact store or an e-mail with no network. Its bytes
depend only on the data, predictions and params (no timestamps, no absolute paths).

Sections: summary and per-class error rates, the confusion matrix, the most frequent
confusion pairs, the most confident errors, whose mistake each error is (grouped by
verdict, each with its evidence in words), then one section per true class listing every
error (most confident first) with its verdict and its k nearest training images of the
true and of the predicted class, captions as HTML text.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from stages.analysis.sheets import strip
from stages.analysis.tables import most_confident
from stages.analysis.verdicts import AMBIGUOUS, LABEL_ERROR, MODEL_ERROR, VERDICTS

# No default sources at all; images only from data: URIs; the inline <style> only.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
SCALE = 2  # tiles are shown at 2× (pixelated), 56 px for a 28 px digit

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; vertical-align: middle; }
th { background: #f3f3f3; text-align: left; }
td.l { text-align: left; }
img { image-rendering: pixelated; vertical-align: middle; }
.bar { display: inline-block; height: .8em; background: #c0392b; }
.cm td { width: 2.6em; text-align: center; }
.cm td.diag { background: #e8f3e8; }
.small { font-size: 12px; color: #555; }
nav a { margin-right: .8em; }
.nearer-predicted { color: #c0392b; font-weight: 600; }
.verdict { display: inline-block; padding: 0 .4em; border-radius: .3em; font-size: 12px; }
.label-error { background: #fde8a8; } .ambiguous { background: #e4e4e4; }
.model-error { background: #f5c6c0; }
"""

# What each verdict means, in the page's words (stages/analysis/verdicts.py has the rule).
MEANING = {
    LABEL_ERROR: "the image shows the predicted class: the model and the image's nearest "
                 "training images agree on it, so the given label is probably wrong and "
                 "the model is not to blame",
    AMBIGUOUS: "the evidence is split: a careful person could read it either way, or as "
               "neither",
    MODEL_ERROR: "most of its nearest training images carry the given label: the label is "
                 "clear, and the model failed",
}
TITLE = {LABEL_ERROR: "Label errors", AMBIGUOUS: "Ambiguous", MODEL_ERROR: "Model errors"}


def badge(verdict: str) -> str:
    """The verdict as a coloured tag (blank for a record without one)."""
    if verdict not in VERDICTS:
        return ""
    return f'<span class="verdict {verdict}">{verdict}</span>'



def png_data_uri(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img(pixels: np.ndarray, alt: str) -> str:
    h, w = pixels.shape
    return (f'<img src="{png_data_uri(pixels)}" width="{w * SCALE}" height="{h * SCALE}" '
            f'alt="{html.escape(alt)}">')


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(cells) + "</tr>\n" for cells in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}>\n<tr>{head}</tr>\n{body}</table>\n"


def td(value, cls: str = "", style: str = "") -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' style="{style}"' if style else "")
    return f"<td{attrs}>{value}</td>"


def _neighbour_cell(x_train, indices, l2, label: str) -> str:
    shown = [i for i in indices if i >= 0]
    if not shown:
        return td(f"no training images of class {html.escape(label)}", "l small")
    alt = f"nearest training images of class {label}: " + ", ".join(f"#{i}" for i in shown)
    text = " ".join(f"#{i}&nbsp;({d:.2f})" for i, d in zip(indices, l2) if i >= 0)
    return td(f'{img(strip(x_train, indices), alt)}<br><span class="small">{text}</span>', "l")


def render(records: list[dict], rates: list[dict], pairs: list[dict], matrix: np.ndarray,
           x_test: np.ndarray, x_train: np.ndarray, names: list[str], k: int,
           top_confident: int, top_pairs: int) -> str:
    """The page as text. `records` as from error_tables.error_records (grouped by true
    class, most confident first) with attach_neighbours applied; `rates`, `pairs` and
    `matrix` as scoring's class_table, confusion_pairs and confusion give them."""
    samples, errors = int(matrix.sum()), len(records)
    pairs = pairs[:top_pairs]
    confident = most_confident(records, top_confident)
    esc = [html.escape(name) for name in names]
    classes = range(len(names))
    test_img = {}

    def query(i: int) -> str:
        if i not in test_img:
            test_img[i] = img(x_test[i], f"test image {i}")
        return test_img[i]

    out = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        "<title>MNIST: misclassified test images</title>\n",
        f"<style>{STYLE}</style>\n</head>\n<body>\n",
        "<h1>Misclassified test images</h1>\n",
        f"<p><b>{errors}</b> of {samples} test images are misclassified "
        f"({pct(errors / samples if samples else 0.0)} error, "
        f"{pct(1 - errors / samples if samples else 0.0)} accuracy). "
        "Confidence is the model's probability for the class it predicted.</p>\n",
        "<p>Whose mistake: " + ", ".join(
            f'<a href="#{v}">{sum(r.get("verdict") == v for r in records)} '
            f"{TITLE[v].lower()}</a>" for v in VERDICTS) + ".</p>\n",
        "<nav>" + " ".join(
            [f'<a href="#{a}">{t}</a>' for a, t in (
                ("rates", "error rates"), ("confusion", "confusion matrix"),
                ("pairs", "confusion pairs"), ("confident", "most confident"),
                ("verdicts", "whose mistake"), ("reading", "how to read"))]
            + [f'<a href="#class-{c}">{esc[c]}</a>' for c in classes]) + "</nav>\n",
    ]

    # Per-class error rates, with a bar scaled to the worst class.
    worst = max((r["error_rate"] for r in rates), default=0.0) or 1.0
    out.append('<h2 id="rates">Error rate by true class</h2>\n')
    out.append(table(
        ["class", "test images", "errors", "error rate", ""],
        [[td(f'<a href="#class-{r["label"]}">{esc[r["label"]]}</a>'), td(r["samples"]),
          td(r["errors"]), td(pct(r["error_rate"])),
          td(f'<span class="bar" style="width:{120 * r["error_rate"] / worst:.1f}px"></span>',
              "l")] for r in rates]))

    # Confusion matrix: rows true class, columns predicted; mistakes shaded by count.
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    peak = int(off.max()) or 1
    rows = []
    for t in classes:
        cells = [f"<th>{esc[t]}</th>"]
        for p in classes:
            n = int(matrix[t, p])
            if t == p:
                cells.append(td(n, "diag"))
            elif n:
                alpha = 0.15 + 0.85 * n / peak
                cells.append(td(f'<a href="#class-{t}">{n}</a>', "",
                                 f"background:rgba(192,57,43,{alpha:.2f})"))
            else:
                cells.append(td(""))
        rows.append(cells)
    out.append('<h2 id="confusion">Confusion matrix</h2>\n'
               '<p class="small">Rows: true class; columns: predicted class. Diagonal: '
               "correct; shaded cells: mistakes, darker = more.</p>\n")
    out.append(table(["true \\ predicted"] + [esc[p] for p in classes], rows, "cm"))

    out.append(f'<h2 id="pairs">Most frequent confusions (top {top_pairs})</h2>\n')
    if pairs:
        out.append(table(
            ["true", "predicted as", "count", "share of errors"],
            [[td(f'<a href="#class-{p["true"]}">{esc[p["true"]]}</a>'),
              td(esc[p["predicted"]]),
              td(p["count"]), td(pct(p["share"]))] for p in pairs]))
    else:
        out.append("<p>No errors.</p>\n")

    out.append(f'<h2 id="confident">Most confident errors (top {top_confident})</h2>\n')
    if confident:
        out.append(table(
            ["rank", "image", "test index", "true", "predicted", "confidence", "p(true)",
             "verdict"],
            [[td(r["rank"]), td(query(r["index"])),
              td(f'<a href="#e{r["index"]}">{r["index"]}</a>'), td(esc[r["true"]]),
              td(esc[r["predicted"]]), td(f"{r['confidence']:.3f}"), td(f"{r['p_true']:.3f}"),
              td(badge(r.get("verdict", "")), "l")]
             for r in confident]))
    else:
        out.append("<p>No errors.</p>\n")

    out.append('<h2 id="verdicts">Whose mistake is it?</h2>\n<p>Each error gets a verdict '
               "from two readers that share nothing but the training labels: the model, "
               "calibrated on the validation split and checked by confident learning, and "
               "the image's nearest training images, each voting with its label. "
               "A verdict is evidence, not proof: look at the image.</p>\n<ul>\n"
               + "".join(f"<li>{badge(v)} {MEANING[v]}.</li>\n" for v in VERDICTS)
               + "</ul>\n")
    for v in VERDICTS:
        mine = sorted((r for r in records if r.get("verdict") == v),
                      key=lambda r: (-r["confidence"], r["index"]))
        out.append(f'<h3 id="{v}">{TITLE[v]}: {len(mine)}</h3>\n')
        if not mine:
            out.append("<p>None.</p>\n")
            continue
        out.append(table(
            ["image", "test index", "true", "predicted", "evidence"],
            [[td(query(r["index"])), td(f'<a href="#e{r["index"]}">{r["index"]}</a>'),
              td(esc[r["true"]]), td(esc[r["predicted"]]),
              td(html.escape(r.get("evidence", "")), "l small")] for r in mine]))

    out.append(
        '<h2 id="reading">How to read the neighbours</h2>\n'
        f"<p>Beside each error are its {k} nearest training images of the true class and "
        f"{k} of the predicted class, nearest first. Distance: Euclidean (L2) distance "
        "between the 784 pixel values scaled to 0..1 (shown in brackets with the training "
        "index), computed exactly in pixel space. The verdicts read them so: the "
        "predicted class's neighbours near and alike, with a confident model, point to the "
        "label; the true class's neighbours near and alike point to the model.</p>\n"
        '<p class="small">"nearer" names the class holding the single nearest training '
        "image (marked red when it is the predicted one).</p>\n")

    for c in classes:
        mine = [r for r in records if r["true"] == c]
        rate = rates[c]
        out.append(f'<section id="class-{c}">\n<h2>True class {esc[c]}: {rate["errors"]} of '
                   f'{rate["samples"]} wrong ({pct(rate["error_rate"])})</h2>\n')
        if not mine:
            out.append("<p>No errors.</p>\n</section>\n")
            continue
        rows = []
        for r in mine:
            nearer = r["nearer"]
            nearer_cell = (td(nearer, "l nearer-predicted") if nearer == "predicted"
                           else td(nearer, "l"))
            rows.append([
                f'<td id="e{r["index"]}">{query(r["index"])}</td>',
                td(f'#{r["index"]}<br>{esc[r["true"]]} &rarr; {esc[r["predicted"]]}<br>'
                    f'conf {r["confidence"]:.3f}<br>{badge(r.get("verdict", ""))}', "l"),
                _neighbour_cell(x_train, r["true_neighbours"], r["true_l2"], names[r["true"]]),
                _neighbour_cell(x_train, r["pred_neighbours"], r["pred_l2"],
                                names[r["predicted"]]),
                nearer_cell,
            ])
        out.append(table(["image", "index, true &rarr; predicted, confidence",
                           f"nearest {esc[c]} (training)", "nearest of the predicted class",
                           "nearer"], rows))
        out.append("</section>\n")
    out.append("</body>\n</html>\n")
    return "".join(out)
