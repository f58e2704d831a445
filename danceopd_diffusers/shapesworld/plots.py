"""Line and bar charts for the study report: matplotlib when it is installed, else a plain PIL drawing.

matplotlib is not a dependency of the project; PIL is, so a report can always be drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
Series = dict[str, Sequence[tuple[float, float]]]
Bar = tuple[str, float, "tuple[float, float] | None"]


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def line_chart(
    path: str | Path, title: str, xlabel: str, ylabel: str, series: Series, backend: str = "auto"
) -> Path:
    """One line per series (x ascending), written as a PNG."""
    plt = _matplotlib() if backend in ("auto", "matplotlib") else None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for i, (label, points) in enumerate(series.items()):
            xs, ys = zip(*sorted(points)) if points else ((), ())
            ax.plot(xs, ys, marker="o", color=COLOURS[i % len(COLOURS)], label=label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)
    points = [p for pts in series.values() for p in pts]
    xs, ys = [p[0] for p in points] or [0.0], [p[1] for p in points] or [0.0]
    canvas = _Canvas(title, xlabel, ylabel, (min(xs), max(xs)), (min(0.0, min(ys)), max(ys)))
    for i, (label, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [canvas.to_pixel(x, y) for x, y in sorted(pts)]
        if len(xy) > 1:
            canvas.draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            canvas.draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        canvas.legend(i, label, colour)
    return canvas.save(path)


def bar_chart(path: str | Path, title: str, ylabel: str, bars: Sequence[Bar], backend: str = "auto") -> Path:
    """One bar per (label, value, (lo, hi) or None), with its interval as an error bar."""
    plt = _matplotlib() if backend in ("auto", "matplotlib") else None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        labels = [b[0] for b in bars]
        values = [b[1] for b in bars]
        errors = [[v - (ci or (v, v))[0] for _, v, ci in bars], [(ci or (v, v))[1] - v for _, v, ci in bars]]
        ax.bar(range(len(bars)), values, yerr=errors, capsize=4, color=COLOURS[0])
        ax.set_xticks(range(len(bars)), labels, rotation=30, ha="right", fontsize=8)
        ax.set(title=title, ylabel=ylabel)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)
    return _horizontal_bars(path, title, ylabel, bars)


def _horizontal_bars(path: str | Path, title: str, value_label: str, bars: Sequence[Bar]) -> Path:
    """PIL fallback: one labelled row per bar (long labels stay legible), its value and interval printed."""
    row, label_w, plot_w, top = 22, 250, 300, 40
    image = Image.new("RGB", (640, top + row * len(bars) + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black")
    draw.text((label_w, 22), value_label, fill="black")
    high = max([max(v, (ci or (v, v))[1]) for _, v, ci in bars] or [1.0]) or 1.0
    x_of = lambda v: label_w + v / high * plot_w  # noqa: E731
    for i, (label, value, ci) in enumerate(bars):
        y = top + i * row
        draw.text((8, y + 4), label[:40], fill="black")
        draw.rectangle((label_w, y + 3, x_of(value), y + row - 3), fill=COLOURS[0])
        text = f"{value:.2f}"
        if ci is not None:
            lo, hi = x_of(ci[0]), x_of(ci[1])
            mid = y + row / 2
            draw.line([(lo, mid), (hi, mid)], fill="black", width=1)
            for x in (lo, hi):
                draw.line([(x, mid - 4), (x, mid + 4)], fill="black", width=1)
            text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
        draw.text((x_of(max(value, ci[1] if ci else value)) + 6, y + 4), text, fill="black")
    draw.line([(label_w, top - 2), (label_w, top + row * len(bars))], fill="black")
    image.save(path)
    return Path(path)


class _Canvas:
    """Axes on a white 640 x 400 image, mapping data coordinates to pixels."""

    def __init__(self, title, xlabel, ylabel, xrange, yrange, x_ticks: bool = True):
        self.image = Image.new("RGB", (640, 400), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.left, self.right, self.top, self.bottom = 60, 480, 30, 350
        (x0, x1), (y0, y1) = xrange, yrange
        self.x0, self.x1 = x0, x1 if x1 > x0 else x0 + 1
        self.y0, self.y1 = y0, y1 if y1 > y0 else y0 + 1
        d = self.draw
        d.text((self.left, 2), title, fill="black")
        d.rectangle((self.left, self.top, self.right, self.bottom), outline="black")
        for k in range(6):
            y = self.y0 + (self.y1 - self.y0) * k / 5
            _, py = self.to_pixel(self.x0, y)
            d.line([(self.left - 4, py), (self.left, py)], fill="black")
            d.text((4, py - 6), f"{y:.3g}", fill="black")
            if x_ticks:
                x = self.x0 + (self.x1 - self.x0) * k / 5
                px, _ = self.to_pixel(x, self.y0)
                d.line([(px, self.bottom), (px, self.bottom + 4)], fill="black")
                d.text((px - 10, self.bottom + 6), f"{x:.4g}", fill="black")
        d.text(((self.left + self.right) // 2 - 20, self.bottom + 26), xlabel, fill="black")
        d.text((4, self.top - 14), ylabel, fill="black")

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        px = self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)
        py = self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)
        return px, py

    def legend(self, i: int, label: str, colour: str) -> None:
        y = self.top + 16 * i
        self.draw.rectangle((self.right + 10, y + 2, self.right + 20, y + 12), fill=colour)
        self.draw.text((self.right + 24, y), label[:24], fill="black")

    def save(self, path: str | Path) -> Path:
        self.image.save(path)
        return Path(path)
