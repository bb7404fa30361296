"""L0 — one static HTML page: inline CSS, inline SVG charts, nothing fetched from elsewhere.

The report pages of ``mergelab run``, ``mergelab demo`` and ``mergelab tune`` are built from these
pieces. A page opens from disk in any browser (no server, no CDN, no script); for the same
inputs the bytes are the same (no timestamps, no random ids).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

#: Bar and point colours (the tab10 palette); the first series of a chart takes the first colour.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
GREY = "#b0b0b0"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;
 padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .6em;vertical-align:top}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{font-weight:bold}
pre{background:#f7f7f7;border:1px solid #e4e4e4;padding:.7em;overflow-x:auto;font-size:.88em}
code{font-size:.92em}
.ok{color:#1a7f37;font-weight:bold}.bad{color:#cf222e;font-weight:bold}td.bad{background:#ffebe9}.warn{color:#9a6700;font-weight:bold}
.note{background:#fff8c5;border:1px solid #e6d96f;padding:.5em .8em}
details{margin:.6em 0}summary{cursor:pointer;font-weight:bold}
svg.chart{max-width:100%;height:auto;font-family:inherit}
svg.chart text{font-size:12px;fill:#333}
"""


def esc(value: Any) -> str:
    """``value`` as HTML text (``<``, ``&`` and quotes escaped)."""
    return html.escape(str(value), quote=True)


def page(title: str, sections: Iterable[str], *, subtitle: str = "") -> str:
    """A whole HTML document: ``title`` as heading, then the (already HTML) ``sections``."""
    head = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n")
    if subtitle:
        head += f'<p class="sub">{esc(subtitle)}</p>\n'
    return head + "\n".join(sections) + "\n</body>\n</html>\n"


def section(heading: str, *parts: str, id: str = "") -> str:
    """An ``<h2>`` and its parts (HTML), in a ``<section>``."""
    attr = f' id="{esc(id)}"' if id else ""
    return f"<section{attr}>\n<h2>{esc(heading)}</h2>\n" + "\n".join(parts) + "\n</section>"


def para(text: str, cls: str = "") -> str:
    """A paragraph of plain text."""
    return f'<p class="{esc(cls)}">{esc(text)}</p>' if cls else f"<p>{esc(text)}</p>"


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def details(summary: str, *parts: str) -> str:
    """A folded block: ``summary`` shown, ``parts`` (HTML) shown on a click."""
    return f"<details>\n<summary>{esc(summary)}</summary>\n" + "\n".join(parts) + "\n</details>"


@dataclass(frozen=True)
class Cell:
    """A table cell marked apart: its ``value`` shown as usual, then ``mark`` (text, e.g. ``▼``), with
    the CSS class ``cls`` (e.g. ``bad``) and a ``title`` shown on hover."""

    value: Any
    cls: str = ""
    mark: str = ""
    title: str = ""


def _td(c: Any, raw: bool) -> str:
    extra, mark, title = "", "", ""
    if isinstance(c, Cell):
        extra, mark, title, c = c.cls, c.mark, c.title, c.value
    number = c is None or (isinstance(c, (int, float)) and not isinstance(c, bool))
    classes = " ".join(filter(None, ["num" if number else "", extra]))
    text = "–" if c is None else esc(fmt_number(c)) if number else (c if raw else esc(c))
    attrs = (f' class="{esc(classes)}"' if classes else "") + (f' title="{esc(title)}"' if title else "")
    return f"<td{attrs}>{text}{esc(mark)}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, id: str = "",
          row_classes: Sequence[str] | None = None, raw: bool = False) -> str:
    """A table; numbers (int/float) are right-aligned, ``None`` shows as ``–``; a :class:`Cell`
    adds a mark, a class and a title to its value.

    Cells are escaped unless ``raw`` (then they are HTML already)."""
    attr = f' id="{esc(id)}"' if id else ""
    out = [f"<table{attr}>", "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>",
           "<tbody>"]
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes and i < len(row_classes) and row_classes[i] else ""
        cells = [_td(c, raw) for c in row]
        out.append((f'<tr class="{esc(cls)}">' if cls else "<tr>") + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def fmt_number(x: float) -> str:
    """An int as it is; a float with 4 significant decimals (or ``nan``)."""
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "nan"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.1f}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _nice_max(v: float) -> float:
    """The smallest 1, 1.2, 1.5, 2, 2.5 or 5 × 10^k at or above ``v`` (the top of an axis)."""
    if v <= 0 or not math.isfinite(v):
        return 1.0
    k = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 5, 10):
        if m * k >= v * (1 - 1e-9):
            return m * k
    return 10 * k


def _legend(names: Sequence[str], colours: Sequence[str], x: float, y: float, width: float) -> tuple[str, float]:
    """Legend swatches laid out in rows from (x, y) within ``width``; returns (svg, height used)."""
    parts, cx, cy = [], x, y
    for name, colour in zip(names, colours):
        w = 22 + 7.2 * len(name) + 14
        if cx + w > x + width and cx > x:
            cx, cy = x, cy + 18
        parts.append(f'<rect x="{cx:.1f}" y="{cy:.1f}" width="12" height="12" fill="{colour}"/>'
                     f'<text x="{cx + 16:.1f}" y="{cy + 10:.1f}">{esc(name)}</text>')
        cx += w
    return "".join(parts), cy - y + 18


def bar_chart(categories: Sequence[str], series: Mapping[str, Sequence[float | None]], *, title: str,
              y_label: str = "", reference: float | None = None, reference_label: str = "",
              colours: Mapping[str, str] | None = None, value_format: str = "{:.2f}", id: str = "") -> str:
    """Grouped bars as inline SVG: one group per category, one bar per series (``None``: no bar).

    Every bar is ``<rect class="bar" data-series=… data-category=… data-value=…>`` with a
    ``<title>`` (its tooltip), so a reader (or a test) can find each figure in the page.
    ``reference`` draws a dashed horizontal line (e.g. the experts' level, 1.0).
    """
    names = list(series)
    colours = dict(colours or {})
    for i, n in enumerate(names):
        colours.setdefault(n, PALETTE[i % len(PALETTE)])
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    top = _nice_max(max(values + ([reference] if reference is not None else []) + [0.0]) * 1.05)
    # wide enough for its bars and for its label (about 7 px a character at the page's font size)
    group_w = max(60.0, 14.0 * len(names) + 20, 7.0 * max((len(c) for c in categories), default=0) + 12)
    left, right, top_pad = 64.0, 16.0, 34.0
    plot_w = max(420.0, group_w * len(categories))
    plot_h = 220.0
    width = left + plot_w + right
    legend, legend_h = _legend(names + ([reference_label] if reference is not None and reference_label else []),
                               [colours[n] for n in names] + ["#000"], left, 0, plot_w)
    height = top_pad + plot_h + 44 + legend_h + 8
    y0 = top_pad + plot_h   # the x axis

    def y_of(v: float) -> float:
        return y0 - plot_h * max(0.0, v) / top

    attr = f' id="{esc(id)}"' if id else ""
    out = [f'<svg class="chart"{attr} xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{esc(title)}">',
           f'<text x="{left:.1f}" y="18" style="font-weight:bold;font-size:14px">{esc(title)}</text>']
    for k in range(6):   # grid and y ticks
        v = top * k / 5
        y = y_of(v)
        out.append(f'<line x1="{left:.1f}" x2="{left + plot_w:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6:.1f}" y="{y + 4:.1f}" text-anchor="end">{esc(_tick(v))}</text>')
    if y_label:
        out.append(f'<text transform="translate(14,{top_pad + plot_h / 2:.1f}) rotate(-90)" '
                   f'text-anchor="middle">{esc(y_label)}</text>')
    slot = plot_w / max(1, len(categories))
    bar_w = min(28.0, (slot - 14) / max(1, len(names)))
    labelled = bar_w >= 20   # each bar's figure above it, where there is room
    for j, cat in enumerate(categories):
        gx = left + j * slot + (slot - bar_w * len(names)) / 2
        for i, n in enumerate(names):
            v = series[n][j]
            if v is None or not math.isfinite(v):
                continue
            y = y_of(v)
            out.append(f'<rect class="bar" data-series="{esc(n)}" data-category="{esc(cat)}" '
                       f'data-value="{esc(value_format.format(v))}" x="{gx + i * bar_w:.1f}" y="{y:.1f}" '
                       f'width="{bar_w - 1:.1f}" height="{y0 - y:.1f}" fill="{colours[n]}">'
                       f"<title>{esc(n)} · {esc(cat)}: {esc(value_format.format(v))}</title></rect>")
            if labelled:
                out.append(f'<text class="value" x="{gx + (i + 0.5) * bar_w:.1f}" y="{y - 3:.1f}" '
                           f'text-anchor="middle" style="font-size:9px">{esc(value_format.format(v))}</text>')
        out.append(f'<text x="{left + (j + 0.5) * slot:.1f}" y="{y0 + 16:.1f}" text-anchor="middle">{esc(cat)}</text>')
    out.append(f'<line x1="{left:.1f}" x2="{left + plot_w:.1f}" y1="{y0:.1f}" y2="{y0:.1f}" stroke="#333"/>')
    if reference is not None:
        y = y_of(reference)
        out.append(f'<line class="reference" x1="{left:.1f}" x2="{left + plot_w:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="#000" stroke-dasharray="5,4"/>')
    out.append(f'<g transform="translate(0,{y0 + 30:.1f})">{legend}</g>')
    out.append("</svg>")
    return "\n".join(out)


def _tick(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.1e}"


def scatter_chart(series: Mapping[str, Sequence[tuple[float, float]]], *, title: str, x_label: str = "",
                  y_label: str = "", steps: Mapping[str, Sequence[tuple[float, float]]] | None = None,
                  marker_x: float | None = None, marker_label: str = "", id: str = "") -> str:
    """Points as inline SVG (``<circle class="point" data-series=… data-x=… data-y=…>``), plus
    optional step lines (``steps``: e.g. the best value so far) and a vertical marker line."""
    names = list(series)
    colours = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    step_names = list(steps or {})
    for i, n in enumerate(step_names):
        colours.setdefault(n, "#555" if i == 0 else PALETTE[(len(names) + i) % len(PALETTE)])
    pts = [p for ps in series.values() for p in ps] + [p for ps in (steps or {}).values() for p in ps]
    xs = [p[0] for p in pts if math.isfinite(p[1])] or [0.0, 1.0]
    ys = [p[1] for p in pts if math.isfinite(p[1])] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.08 or max(abs(y_hi) * 0.1, 0.05)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    left, right, top_pad, plot_w, plot_h = 70.0, 20.0, 34.0, 620.0, 260.0
    width = left + plot_w + right
    labels = names + step_names + ([marker_label] if marker_x is not None and marker_label else [])
    legend, legend_h = _legend(labels, [colours[n] for n in names + step_names] + ["#2ca02c"], left, 0, plot_w)
    height = top_pad + plot_h + 50 + legend_h + 8
    y0 = top_pad + plot_h

    def px(x: float) -> float:
        return left + plot_w * (x - x_lo) / (x_hi - x_lo)

    def py(y: float) -> float:
        return y0 - plot_h * (y - y_lo) / (y_hi - y_lo)

    attr = f' id="{esc(id)}"' if id else ""
    out = [f'<svg class="chart"{attr} xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{esc(title)}">',
           f'<text x="{left:.1f}" y="18" style="font-weight:bold;font-size:14px">{esc(title)}</text>']
    for k in range(6):
        v = y_lo + (y_hi - y_lo) * k / 5
        y = py(v)
        out.append(f'<line x1="{left:.1f}" x2="{left + plot_w:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6:.1f}" y="{y + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for k in range(6):
        v = x_lo + (x_hi - x_lo) * k / 5
        out.append(f'<text x="{px(v):.1f}" y="{y0 + 16:.1f}" text-anchor="middle">{v:.3g}</text>')
    out.append(f'<line x1="{left:.1f}" x2="{left + plot_w:.1f}" y1="{y0:.1f}" y2="{y0:.1f}" stroke="#333"/>')
    if x_label:
        out.append(f'<text x="{left + plot_w / 2:.1f}" y="{y0 + 34:.1f}" text-anchor="middle">{esc(x_label)}</text>')
    if y_label:
        out.append(f'<text transform="translate(14,{top_pad + plot_h / 2:.1f}) rotate(-90)" '
                   f'text-anchor="middle">{esc(y_label)}</text>')
    for n, ps in (steps or {}).items():
        good = [p for p in ps if math.isfinite(p[1])]
        if good:
            d = f"M{px(good[0][0]):.1f},{py(good[0][1]):.1f}"
            for x, y in good[1:]:   # a step after each point ("post")
                d += f" H{px(x):.1f} V{py(y):.1f}"
            out.append(f'<path class="step" data-series="{esc(n)}" d="{d}" fill="none" stroke="{colours[n]}"/>')
    if marker_x is not None:
        out.append(f'<line class="marker" x1="{px(marker_x):.1f}" x2="{px(marker_x):.1f}" y1="{top_pad:.1f}" '
                   f'y2="{y0:.1f}" stroke="#2ca02c" stroke-dasharray="3,3"/>')
    for i, (n, ps) in enumerate(series.items()):
        for x, y in ps:
            if not math.isfinite(y):
                continue
            out.append(f'<circle class="point" data-series="{esc(n)}" data-x="{x:g}" data-y="{y:.4f}" '
                       f'cx="{px(x):.1f}" cy="{py(y):.1f}" r="{4 if i == 0 else 3.5}" fill="{colours[n]}" '
                       f'fill-opacity="{0.85 if i == 0 else 0.6}"><title>{esc(n)} · {x:g}: {y:.4f}</title></circle>')
    out.append(f'<g transform="translate(0,{y0 + 44:.1f})">{legend}</g>')
    out.append("</svg>")
    return "\n".join(out)


__all__ = ["page", "section", "para", "pre", "details", "table", "bar_chart", "scatter_chart", "esc",
           "fmt_number", "fmt_seconds", "PALETTE", "GREY"]
