"""The report's "where it looks" panel: for each dataset's best model, a few test images per class (right and wrong),
each the DCG's class-activation map over the image, the K crops it took for the local prior as boxes, the predicted
and true class, and the spread of the prediction over the S sampled chains (diffmic/explain.py made them, as the
model's own forward pass had them; tune/record/experiment.py keeps them under explain/<dataset>/).

The boxes are SVG rectangles over the heat-map image in the image's own pixel coordinates (viewBox), so they sit where
the crops were at any display size. Every value comes from storage: numbers are cast and clamped, names escaped.
"""
from __future__ import annotations

import base64
import math

from tune.record.results import Results
from tune.pages.parts import esc, note

DISPLAY = 224  # px on the page for the longer side of an image
BAR_W, BAR_H = 150, 12  # the spread chart: one bar per class, a tick per sampled chain


def _int(value, lo: int, hi: int) -> int:
    return min(max(int(value), lo), hi)


def _probs(values, n: int) -> list[float]:
    out = [float(v) for v in list(values)[:n]]
    return [v if math.isfinite(v) else 0.0 for v in out] + [0.0] * (n - len(out))


def spread_chart(item: dict, names: list[str]) -> str:
    """Mean probability of each class as a bar, each chain's probability as a tick on it."""
    n = len(names)
    mean = _probs(item.get("probs", []), n)
    samples = [_probs(s, n) for s in (item.get("sample_probs") or [])[:64]]
    label_w = 8 * max(len(str(c)[:14]) for c in names) + 8
    rows = []
    for c in range(n):
        y = c * (BAR_H + 3)
        ticks = "".join(f'<line x1="{label_w + s[c] * BAR_W:.1f}" x2="{label_w + s[c] * BAR_W:.1f}" y1="{y}" '
                        f'y2="{y + BAR_H}" class=tick />' for s in samples)
        rows.append(f'<text x="0" y="{y + BAR_H - 2}" class=cls>{esc(str(names[c])[:14])}</text>'
                    f'<rect x="{label_w}" y="{y}" width="{mean[c] * BAR_W:.1f}" height="{BAR_H}" class=bar />{ticks}')
    height = n * (BAR_H + 3)
    return (f'<svg class=spread viewBox="0 0 {label_w + BAR_W + 4} {height}" width="{label_w + BAR_W + 4}" '
            f'height="{height}">{"".join(rows)}</svg>')


def figure(item: dict, png: bytes, names: list[str]) -> str:
    h, w = (_int(v, 1, 100_000) for v in (item.get("size") or [1, 1])[:2])
    n = len(names)
    predicted = _int(item.get("predicted", 0), 0, n - 1)
    label = item.get("label")
    label = _int(label, 0, n - 1) if label is not None else None
    boxes = []
    for i, box in enumerate((item.get("boxes") or [])[:64]):
        x0, y0, x1, y1 = (_int(v, 0, lim) for v, lim in zip(list(box)[:4], (w, h, w, h)))
        boxes.append(f'<rect class=roi x="{x0}" y="{y0}" width="{max(0, x1 - x0)}" height="{max(0, y1 - y0)}">'
                     f"<title>crop {i + 1}</title></rect>")
    scale = DISPLAY / max(w, h)
    image = (f'<svg class=look-img viewBox="0 0 {w} {h}" width="{w * scale:.0f}" height="{h * scale:.0f}">'
             f'<image href="data:image/png;base64,{base64.b64encode(png).decode()}" x="0" y="0" width="{w}" '
             f'height="{h}" preserveAspectRatio="none" />{"".join(boxes)}</svg>')
    samples = [_probs(s, n)[predicted] for s in (item.get("sample_probs") or [])]
    mean = _probs(item.get("probs", []), n)[predicted]
    sd = (sum((p - sum(samples) / len(samples)) ** 2 for p in samples) / (len(samples) - 1)) ** 0.5 \
        if len(samples) > 1 else 0.0
    right = label is not None and label == predicted
    verdict = "" if label is None else (" <b class=ok>right</b>" if right else " <b class=bad>wrong</b>")
    caption = (f"<figcaption>predicted <b>{esc(names[predicted])}</b> p = {mean:.3f} ± {sd:.3f} over "
               f"{max(1, len(samples))} sample{'s' if len(samples) > 1 else ''}<br>true <b>{esc(names[label]) if label is not None else '?'}</b>"
               f"{verdict}{spread_chart(item, names)}</figcaption>")
    kind = "unlabelled" if label is None else ("right" if right else "wrong")
    return f'<figure class="look {kind}">{image}{caption}</figure>'


def where_it_looks_section(res: Results) -> str:
    parts = []
    for dataset in res.datasets:
        shown = res.record.read_explanations(dataset)
        names = [str(c) for c in (res.best.get(dataset) or {}).get("class_names") or []]
        if not shown or not names:
            continue
        figures = []
        for item, png in shown:
            try:
                figures.append(figure(item, png, names))
            except (ValueError, TypeError, IndexError, AttributeError):  # an entry that is not what explain wrote
                continue
        figures = "".join(figures)
        k = max(len(item.get("boxes") or []) for item, _ in shown)
        crops = f"{k} crop{'s' if k != 1 else ''}"
        parts.append(f"<h3>{esc(dataset)}</h3>" + note(
            f"The best model on {len(shown)} test images, a few per class, right and wrong: the DCG's "
            f"class-activation map of the predicted class as a heat map, the {crops} it took for the local prior as "
            "boxes, and the prediction over the sampled chains (bars: mean probability per class; ticks: each "
            "chain).") + f"<div class=looks>{figures}</div>")
    if not parts:
        return ""
    return f'<section id="where-it-looks"><h2>Where the model looks</h2>{"".join(parts)}</section>'


CSS = """.looks{display:flex;flex-wrap:wrap;gap:14px}.look{margin:0;padding:8px;border:1px solid #ddd;border-radius:4px;
width:236px;font-size:13px}.look.wrong{border-color:#e63946}.look-img{display:block;margin-bottom:4px}
.roi{fill:none;stroke:#fff;stroke-width:2;vector-effect:non-scaling-stroke}.spread{display:block;margin-top:4px}
.spread .bar{fill:#457b9d;opacity:.5}.spread .tick{stroke:#1d3557;stroke-width:1}.spread .cls{font-size:10px}
.ok{color:#2a9d8f}.bad{color:#e63946}"""
