"""The loss curves as an SVG image, `<out_dir>/live/loss.svg`, drawn from the DVCLive logs.

`dvc plots show` draws the logged series with a charting library it loads from the internet, so its page stays
blank offline; this image needs nothing: open it in a browser, or see it in `dvc plots show`'s page, which embeds
it (dvc.yaml declares it as a plot). Written at the end of every session that trained; the same logs give the same
bytes.
"""

from pathlib import Path

from stages.lib.base.files import write_atomically
from stages.lib.checkpointing.live_logs import logged_rows

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 32, 40  # margins around the plotting area
MAX_POINTS = 1000  # per curve: a long run's thousands of steps are thinned to this many points
CURVES = (("train/loss", "#4c78a8"), ("val/loss", "#e45756"))


def write_loss_plot(live_dir: Path) -> Path | None:
    """Draw `train/loss` and `val/loss` into `live_dir/loss.svg`; None (and no file) when nothing is logged."""
    series = {name: logged_rows(live_dir, name) for name, _ in CURVES}
    if not any(series.values()):
        return None
    path = Path(live_dir) / "loss.svg"
    write_atomically(path, loss_svg(series))
    return path


def loss_svg(series: dict[str, list[tuple[int, float]]]) -> str:
    """An SVG line chart of each series of (step, value) rows, with axes, ticks and a legend."""
    points = [row for rows in series.values() for row in rows]
    x_max = max(step for step, _ in points) or 1
    y_min, y_max = min(v for _, v in points), max(v for _, v in points)
    if y_max - y_min < 1e-9:
        y_min, y_max = y_min - 0.5, y_max + 0.5

    def x(step: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * step / x_max

    def y(value: float) -> float:
        return HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * (value - y_min) / (y_max - y_min)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<text x="{LEFT}" y="18" font-size="13">loss by step</text>']
    for i in range(5):
        value, step = y_min + (y_max - y_min) * i / 4, round(x_max * i / 4)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.3g}</text>')
        parts.append(f'<text x="{x(step):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{step}</text>')
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" text-anchor="middle">step</text>')
    for i, (name, color) in enumerate(CURVES):
        rows = _thinned(series.get(name, []))
        if not rows:
            continue
        path = " ".join(f"{x(step):.1f},{y(value):.1f}" for step, value in rows)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        legend_x = WIDTH - RIGHT - 150 + 80 * i
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 16}" y1="14" y2="14" stroke="{color}" '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{legend_x + 20}" y="18">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _thinned(rows: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """At most about MAX_POINTS rows, evenly spaced, the last one always kept."""
    stride = max(1, -(-len(rows) // MAX_POINTS))
    kept = rows[::stride]
    return kept + [rows[-1]] if rows and kept[-1] != rows[-1] else kept
