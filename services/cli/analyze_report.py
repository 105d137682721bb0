"""Output of `rlrt analyze`: PNG figures, a JSON of every number, one self-contained HTML page.

`Report` collects sections (text, tables, figures, raw HTML) and writes `<out>/report.json`,
`<out>/*.png` and `<out>/report.html` with every image inlined as base64, so the page can be
mailed or attached to an issue on its own. JSON holds no NaN/inf: they become null.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from functools import cache
from pathlib import Path
from typing import Any

# The paper's heat-map colours: pink = routine (low D̄_t), green = critical (high D̄_t).
PINK, GREEN, GREY = "#e7298a", "#1b9e77", "#9e9e9e"


@cache
def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on first use: every `rlrt` process (the
    services too) imports the CLI, and matplotlib costs each ~45 MB."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


@cache
def heat_cmap() -> Any:
    """The D̄_t heat-map colour map (pink - white - green)."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("rlrt_heat", ["#fbe3ef", "#ffffff", "#c7ead9", "#1b9e77"])


def to_jsonable(obj: Any) -> Any:
    """Tensors and numpy values -> lists/floats; NaN and inf -> None (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


class Report:
    """Sections of one analysis, written as JSON + PNGs + one HTML page."""

    def __init__(self, out_dir: Path, title: str) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.parts: list[str] = []
        self.figures: list[Path] = []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def raw(self, fragment: str) -> None:
        """Trusted HTML built by the caller (every model string in it must be escaped)."""
        self.parts.append(fragment)

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        def cell(v: Any) -> str:
            if isinstance(v, float):
                return "–" if not math.isfinite(v) else f"{v:.4g}"
            return html.escape(str(v))

        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def figure(self, fig: Any, name: str, caption: str, *, dpi: int = 110) -> Path:
        """Save `fig` as <out>/<name>.png and inline it into the page."""
        path = self.out / f"{name}.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        pyplot().close(fig)
        data = buf.getvalue()
        path.write_bytes(data)
        self.figures.append(path)
        b64 = base64.b64encode(data).decode("ascii")
        self.parts.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return path

    def write(self, numbers: dict[str, Any]) -> tuple[Path, Path]:
        """Write report.json (`numbers` plus the figure list) and report.html; returns both paths."""
        doc = to_jsonable(dict(numbers, figures=[p.name for p in self.figures]))
        json_path = self.out / "report.json"
        json_path.write_text(json.dumps(doc, indent=1, allow_nan=False))
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
                 "font-size:13px;text-align:right}th{background:#f4f4f4}img{max-width:100%}"
                 ".tok{font-family:monospace;white-space:pre-wrap;padding:1px 0}.traj{line-height:1.9;"
                 "border:1px solid #ddd;padding:.5em;margin:.5em 0}figcaption{font-size:13px;color:#444}")
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body><h1>{html.escape(self.title)}</h1>"
                + "\n".join(self.parts) + "</body></html>")
        html_path = self.out / "report.html"
        html_path.write_text(page, encoding="utf-8")
        return json_path, html_path


def heat_color(value: float, vmax: float) -> str:
    """Hex colour of a D̄_t value on `heat_cmap()`, scaled to [0, vmax]."""
    frac = 0.0 if vmax <= 0 or not math.isfinite(value) else min(max(value / vmax, 0.0), 1.0)
    r, g, b, _ = heat_cmap()(frac)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def token_heat_html(tokens: list[str], values: list[float], vmax: float, label: str,
                    marked: set[int] | None = None) -> str:
    """One trajectory as HTML spans shaded by value; hover shows position, token and value."""
    spans = []
    for t, (tok, v) in enumerate(zip(tokens, values)):
        border = "outline:2px solid #333;" if marked and t in marked else ""
        spans.append(f"<span class='tok' style='background:{heat_color(v, vmax)};{border}' "
                     f"title='t={t} {html.escape(repr(tok))} D̄={v:.4g}'>{html.escape(tok)}</span>")
    return f"<div class='traj'><b>{html.escape(label)}</b><br>{''.join(spans)}</div>"
