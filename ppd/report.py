"""``python -m ppd.report RUN_DIR``: an HTML + Markdown report of a training run, for users without W&B.

Reads what a run leaves in its folder (``default_root_dir``, e.g. ``runs/quickstart``):

* metric curves from the CSV logger's ``metrics.csv`` (every ``csv/version_*``, so a resumed run shows its
  whole history; a later version wins on a repeated step), one matplotlib PNG per metric;
* the latest episode panels (``panels/episode_*.png``, written by :class:`ppd.tasks.ppd.PPDTask`; else the
  images of the offline W&B run under ``wandb/``);
* the saved ``config.yaml`` and the checkpoints present;
* evaluation tables: every ``results.md`` under the run folder (``ppd.evaluate`` writes them).

Writes ``RUN_DIR/report/index.html`` (self-contained: images embedded as base64, opens anywhere) and
``RUN_DIR/report/report.md`` with the PNGs beside it.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ppd.io import atomic_write_bytes, atomic_write_text

#: metrics.csv columns that are counters, not curves
INDEX_COLUMNS = ("epoch", "step")


@dataclass
class Curve:
    """One metric: ``(step, value)`` points in step order."""

    name: str
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


def _version_key(path: Path) -> tuple[int, str]:
    m = re.search(r"version_(\d+)", str(path))
    return (int(m.group(1)) if m else -1, str(path))


def read_metrics(run_dir: Path) -> dict[str, Curve]:
    """All metric curves of the CSV logger files under ``run_dir`` (versions merged, later wins per step)."""
    points: dict[str, dict[int, float]] = {}
    for path in sorted(run_dir.rglob("metrics.csv"), key=_version_key):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    step = int(float(row.get("step") or "nan"))
                except ValueError:
                    continue
                for key, text in row.items():
                    if key in INDEX_COLUMNS or key is None or text in ("", None):
                        continue
                    try:
                        value = float(text)
                    except ValueError:
                        continue
                    if math.isfinite(value):
                        points.setdefault(key, {})[step] = value
    curves = {}
    for key in sorted(points):
        steps = sorted(points[key])
        curves[key] = Curve(key, steps, [points[key][s] for s in steps])
    return curves


def plot_curve(curve: Curve, path: Path) -> None:
    """One PNG per metric: the points (and a running mean when there are many)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ppd.viz import png_bytes

    fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=100)
    x, y = np.asarray(curve.steps), np.asarray(curve.values)
    many = len(y) > 40
    ax.plot(x, y, marker="" if many else "o", ms=3, lw=0.8 if many else 1.4, alpha=0.45 if many else 1.0)
    if many:
        k = max(3, len(y) // 15)
        mean = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1 :], mean, lw=1.8, label=f"mean of {k}")
        ax.legend(fontsize=7, loc="best")
    ax.set_title(curve.name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    from PIL import Image

    img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    atomic_write_bytes(path, png_bytes(img))


def find_panels(run_dir: Path, n: int) -> list[Path]:
    """The ``n`` latest episode panels: ``panels/episode_*.png``, else the offline W&B run's images."""
    own = sorted((run_dir / "panels").glob("episode_*.png"))
    if own:
        return own[-n:]
    media = sorted(run_dir.glob("wandb/*run-*/files/media/images/**/*.png"), key=lambda p: p.stat().st_mtime)
    return media[-n:]


def _md_table_to_html(lines: list[str]) -> str:
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    rows = [r for r in rows if not all(set(c) <= set("-: ") for c in r)]  # drop the |---| rule
    if not rows:
        return ""
    head, body = rows[0], rows[1:]
    out = ["<table><thead><tr>", *(f"<th>{html.escape(c)}</th>" for c in head), "</tr></thead><tbody>"]
    for r in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def markdown_to_html(text: str) -> str:
    """The Markdown subset ``results.md`` uses: headings, pipe tables, paragraphs."""
    out, table, para = [], [], []

    def flush_table() -> None:
        if table:
            out.append(_md_table_to_html(table))
            table.clear()

    def flush_para() -> None:
        if para:
            out.append(f"<p>{html.escape(' '.join(para))}</p>")
            para.clear()

    for ln in text.splitlines():
        s = ln.strip()
        if s.startswith("|"):
            flush_para()
            table.append(s)
            continue
        flush_table()
        m = re.match(r"(#{1,6})\s+(.*)", s)
        if not s or m:
            flush_para()
        if m:
            level = min(len(m.group(1)) + 2, 6)  # below the report's own headings
            out.append(f"<h{level}>{html.escape(m.group(2))}</h{level}>")
        elif s:
            para.append(s)
    flush_table()
    flush_para()
    return "\n".join(out)


def _b64(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


CSS = """
body{font-family:sans-serif;margin:24px;max-width:1400px;color:#222}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
.grid{display:flex;flex-wrap:wrap;gap:10px} .grid figure{margin:0}
figure img{border:1px solid #ddd} figcaption{font-size:11px;color:#555}
pre{background:#f6f6f6;padding:10px;font-size:12px;overflow:auto;max-height:480px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{border:1px solid #bbb;padding:3px 8px}
th{background:#eee} .muted{color:#777}
"""


#: after load, ``<body data-images-loaded="k/n">``: k of the n images decoded (checked in headless Chromium)
LOADED_JS = (
    "window.addEventListener('load',function(){var im=Array.prototype.slice.call(document.images);"
    "var ok=im.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;"
    "document.body.setAttribute('data-images-loaded',ok+'/'+im.length);});"
)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, panels: int = 4) -> Path:
    """Write ``index.html`` + ``report.md`` (+ PNGs) for a run folder; returns the HTML path.

    Raises:
        FileNotFoundError: ``run_dir`` is not a folder.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    out = Path(out_dir) if out_dir is not None else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    curves = read_metrics(run)
    plots: list[tuple[str, Path]] = []
    for name, curve in curves.items():
        png = out / f"metric_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        plot_curve(curve, png)
        plots.append((name, png))
    panel_files = []
    for i, src in enumerate(find_panels(run, panels)):
        dst = out / f"panel_{i}_{src.name}"
        atomic_write_bytes(dst, src.read_bytes())
        panel_files.append((src, dst))
    config = run / "config.yaml"
    config_text = config.read_text() if config.is_file() else None
    results = sorted(p for p in run.rglob("results.md") if out not in p.parents)
    ckpts = sorted(p.relative_to(run) for p in run.rglob("*.ckpt"))

    md = [f"# Training report: {run.name}", "", f"Run folder: `{run}`", ""]
    h = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Training report: {html.escape(run.name)}</title>"
    ]
    h += [f"<style>{CSS}</style>", f"<script>{LOADED_JS}</script></head><body>"]
    h.append(f"<h1>Training report: {html.escape(run.name)}</h1>")
    h.append(f"<p class='muted'>Run folder: <code>{html.escape(str(run))}</code></p>")

    md += ["## Metric curves", ""]
    h.append("<h2>Metric curves</h2>")
    if plots:
        h.append("<div class='grid'>")
        for name, png in plots:
            c = curves[name]
            last = f"last {c.values[-1]:.4g} at step {c.steps[-1]}, {len(c.values)} points"
            md.append(f"![{name}]({png.name})  \n{name}: {last}\n")
            h.append(
                f"<figure><img alt='{html.escape(name)}' src='{_b64(png)}'>"
                f"<figcaption>{html.escape(name)}: {last}</figcaption></figure>"
            )
        h.append("</div>")
    else:
        md.append("No metrics.csv under the run folder (add a CSVLogger, e.g. configs/logger/wandb.yaml).\n")
        h.append("<p>No <code>metrics.csv</code> under the run folder (add a CSVLogger).</p>")

    md += ["## Latest episode panels", ""]
    h.append("<h2>Latest episode panels</h2>")
    if panel_files:
        md.append(
            "Cyan dashed: ground truth; yellow: predicted mask; stars/crosses: positive/negative prompts.\n"
        )
        h.append(
            "<p class='muted'>Cyan dashed: ground truth; yellow: prediction; green stars / red crosses: "
        )
        h.append("positive / negative prompts; titles: Dice at full resolution.</p><div class='grid'>")
        for src, dst in panel_files:
            md.append(f"![{src.name}]({dst.name})\n")
            h.append(
                f"<figure><img style='max-width:640px' alt='{html.escape(src.name)}' src='{_b64(dst)}'>"
                f"<figcaption>{html.escape(src.name)}</figcaption></figure>"
            )
        h.append("</div>")
    else:
        md.append("No episode panels (image_log_every: 0?).\n")
        h.append("<p>No episode panels.</p>")

    md += ["## Evaluation tables", ""]
    h.append("<h2>Evaluation tables</h2>")
    if results:
        for p in results:
            rel = p.relative_to(run)
            text = p.read_text()
            md += [f"From `{rel}`:", "", text, ""]
            h.append(
                f"<p class='muted'>From <code>{html.escape(str(rel))}</code></p>{markdown_to_html(text)}"
            )
    else:
        md.append("None under the run folder (python -m ppd.evaluate writes results.md).\n")
        h.append("<p>None under the run folder.</p>")

    md += ["## Checkpoints", ""] + [f"- `{c}`" for c in ckpts] + [""]
    h.append(
        "<h2>Checkpoints</h2><ul>" + "".join(f"<li><code>{html.escape(str(c))}</code></li>" for c in ckpts)
    )
    h.append("</ul>")
    md += ["## Config", "", "```yaml", config_text or "(no config.yaml)", "```", ""]
    h.append(f"<h2>Config</h2><pre>{html.escape(config_text or '(no config.yaml)')}</pre></body></html>")

    atomic_write_text(out / "report.md", "\n".join(md))
    index = out / "index.html"
    atomic_write_text(index, "\n".join(h))
    return index


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ppd.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run folder (trainer.default_root_dir, e.g. runs/quickstart)")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")
    parser.add_argument("--panels", type=int, default=4, help="latest episode panels to show")
    args = parser.parse_args(argv)
    try:
        index = build_report(args.run_dir, args.out, args.panels)
    except FileNotFoundError as e:
        parser.error(str(e))
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
