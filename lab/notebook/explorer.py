"""The tug-of-war as a time-lapse: the word tables of ES, NES and GDES runs, snapshot by snapshot.

Reads the snapshots that pre-training writes (lab/pretrain/snapshots.py) and draws, for one step, a 2-D view of
the E_G and E_D rows of each run side by side, coloured by the latent word class (synthetic corpus) or
by frequency band (any other corpus), each panel titled with the table's average pairwise cosine and
its within - between class cosine gap at that step; below, the MLM and RTD training curves with a
cursor at the step. `explore` puts a Play button and a step slider on it (notebooks/02_tug_of_war),
`write_animation` writes the same frames as a GIF (figures/tug_of_war_synthetic/tug_of_war.gif).

Alignment: each frame is its own best 2-D view (PCA of the unit-length rows), turned by orthogonal
Procrustes onto the frame before it. PCA's axes are arbitrary up to rotation and sign, so without the
Procrustes step consecutive frames flip and spin; with it, what moves on screen is the geometry of the
table. (One PCA basis fitted on the final table would not jump either, but it shows early steps through
the final table's eyes; a frame's own PCA shows the structure each step actually has.)

Like the tour's views, every frame is a pyplot-free Figure handed to the front end as PNG bytes.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import torch
from IPython.display import Image, Markdown, display
from matplotlib import colormaps
from matplotlib.figure import Figure
from scipy.linalg import orthogonal_procrustes
from sklearn.decomposition import PCA

from lab import sharing
from lab.analysis.tug_of_war import class_separation, load_run
from lab.notebook.tour import figure_png
from lab.pretrain.probe import average_pairwise_cosine
from lab.pretrain.snapshots import load_snapshots
from lab.util import replace_file, write_csv

TABLES = (("generator", "E_G"), ("discriminator", "E_D"))
BANDS = 4  # frequency bands on a corpus without classes


# ---------------------------------------------------------------------------------------------- alignment


def pca_2d(rows: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, 2]: the unit-length rows, centred, on their two leading principal axes (exact SVD)."""
    u = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    out = PCA(n_components=min(2, *u.shape), svd_solver="full").fit_transform(u)  # [N, <=2]
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The orthogonal R (rotation or reflection, [k, k]) minimising ||source @ R - target||_F."""
    return orthogonal_procrustes(source, target)[0]


def aligned_frames(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Each [N, 2] frame turned onto the (already turned) frame before it."""
    out = []
    for frame in frames:
        out.append(frame @ procrustes(frame, out[-1]) if out else frame)
    return out


# ---------------------------------------------------------------------------------------------- one run over time


@dataclass
class Timeline:
    """One run's snapshots, reduced to what a frame draws."""

    mode: str
    steps: list[int]
    coords: dict[str, list[np.ndarray]]  # "E_G" / "E_D" -> per step [N, 2]
    cosine: dict[str, list[float]]  # average pairwise cosine per step
    gap: dict[str, list[float]]  # within - between class cosine per step (nan without classes)
    colour: np.ndarray  # [N] index into `legend`
    legend: list[str]  # class names, or frequency bands
    colour_by: str  # "latent word class" | "frequency band"
    curves: dict[str, tuple[list[int], list[float]]]  # "mlm_loss" / "rtd_loss" -> (steps, values)

    def index(self, step: int) -> int:
        """The last snapshot at or before `step` (the first one before any)."""
        return max(0, int(np.searchsorted(self.steps, step, side="right")) - 1)


def load_timeline(mode: str, run_dir: str | Path) -> Timeline | None:
    """A run's snapshots as a Timeline; None when the run has none."""
    snapshots = load_snapshots(run_dir)
    if not snapshots:
        return None
    run = load_run(run_dir)
    ids = next(iter(snapshots.values()))["ids"].tolist()
    classes = run.token_classes() or {}
    if any(i in classes for i in ids):
        legend = sorted(
            {classes[i] for i in ids if i in classes} | ({"other"} if set(ids) - set(classes) else set())
        )
        colour = np.array([legend.index(classes.get(i, "other")) for i in ids])
        by_row = {row: classes[i] for row, i in enumerate(ids) if i in classes}
        colour_by = f"latent word class ({len(legend)})"
    else:  # ids are stored most frequent first: bands of equal size by frequency rank
        edges = np.linspace(0, len(ids), BANDS + 1).astype(int)
        legend = [f"frequency ranks {a + 1}-{b}" for a, b in zip(edges[:-1], edges[1:])]
        colour = np.searchsorted(edges[1:], np.arange(len(ids)), side="right")
        by_row = {}
        colour_by = f"frequency band ({BANDS} bands of the {len(ids)} most frequent tokens kept)"
    coords, cosine, gap = {}, {}, {}
    for key, name in TABLES:
        tables = [snapshot[key] for snapshot in snapshots.values()]
        coords[name] = aligned_frames([pca_2d(t.numpy()) for t in tables])
        cosine[name] = [average_pairwise_cosine(t) for t in tables]
        gap[name] = [_gap(t, by_row) for t in tables]
    train = run.rows("train")
    curves = {
        key: ([r["step"] for r in train if key in r], [r[key] for r in train if key in r])
        for key in ("mlm_loss", "rtd_loss")
    }
    return Timeline(mode, list(snapshots), coords, cosine, gap, colour, legend, colour_by, curves)


def _gap(table: torch.Tensor, by_row: dict[int, str]) -> float:
    if len(set(by_row.values())) < 2:
        return math.nan
    return class_separation(table, by_row)["gap"]


def load_timelines(run_dirs: dict[str, str | Path]) -> dict[str, Timeline]:
    """Timelines by mode (in the order the modes were registered: ES, NES, GDES first), for the runs that
    have snapshots."""
    for mode in run_dirs:
        sharing.get(mode)  # raises on a name that is no sharing mode, listing the known ones
    order = [mode for mode in sharing.names() if mode in run_dirs]
    loaded = {mode: load_timeline(mode, run_dirs[mode]) for mode in order if run_dirs[mode]}
    return {mode: t for mode, t in loaded.items() if t is not None}


# ---------------------------------------------------------------------------------------------- one frame


def _limits(frames: list[np.ndarray]) -> float:
    """One half-width for every frame of a panel, so the axes hold still (the 99th percentile radius)."""
    return 1.1 * float(np.quantile(np.abs(np.concatenate(frames)), 0.99)) or 1.0


def draw_frame(fig, timelines: dict[str, Timeline], step: int) -> None:
    """Draw the frame of `step` on `fig` (cleared first): E_G and E_D per run, the curves below."""
    fig.clear()
    modes = list(timelines)
    grid = fig.add_gridspec(3, 2 * len(modes), height_ratios=(1, 1, 0.75), hspace=0.55, wspace=0.5)
    palette = [*colormaps["tab20"].colors, *colormaps["tab20b"].colors]
    for j, mode in enumerate(modes):
        timeline, style = timelines[mode], sharing.get(mode)
        k = timeline.index(step)
        colours = [palette[c % len(palette)] for c in timeline.colour]
        for r, (_, name) in enumerate(TABLES):
            ax = fig.add_subplot(grid[r, 2 * j : 2 * j + 2])
            xy, lim = timeline.coords[name][k], _limits(timeline.coords[name])
            ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=7, linewidths=0)
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")
            shared = " (= E_G, shared)" if style.shares_generator_table and name == "E_D" else ""
            gap = timeline.gap[name][k]
            gap_text = "" if math.isnan(gap) else f" · gap {gap:+.3f}"
            ax.set_title(
                f"{style.label} {name}{shared}\ncos {timeline.cosine[name][k]:.3f}{gap_text}", fontsize=8
            )
    for c, (key, title) in enumerate(
        (("mlm_loss", "generator MLM loss"), ("rtd_loss", "discriminator RTD loss"))
    ):
        ax = fig.add_subplot(grid[2, c * len(modes) : (c + 1) * len(modes)])
        for mode in modes:
            style = sharing.get(mode)
            ax.plot(*timelines[mode].curves[key], color=style.color, lw=1, label=style.label)
        ax.axvline(step, color="k", lw=1)
        ax.set_xlabel("step", fontsize=8)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"step {step}: word-table rows in 2-D (each frame's PCA, turned onto the previous frame)\n"
        f"cos = average pairwise cosine, gap = within - between class cosine; colour = "
        f"{next(iter(timelines.values())).colour_by}",
        fontsize=8,
    )


def frame_figure(timelines: dict[str, Timeline], step: int):
    fig = Figure(figsize=(3.4 * len(timelines), 7.2))
    draw_frame(fig, timelines, step)
    return fig


def all_steps(timelines: dict[str, Timeline]) -> list[int]:
    return sorted({s for t in timelines.values() for s in t.steps})


def _missing(run_dirs: dict[str, str | Path]):
    listed = ", ".join(f"{m}: {p}" for m, p in run_dirs.items())
    return Markdown(
        f"No word-table snapshots in these runs ({listed}): they have no `embeddings/` folder. Runs trained "
        "with the current `lab pretrain` write one (`--snapshot-mb` bounds it); retrain to watch the tables move."
    )


# ---------------------------------------------------------------------------------------------- the explorer


def explore(run_dirs: dict[str, str | Path], interval_ms: int = 1500, dpi: int = 80):
    """Play button + step slider over the snapshot steps of the runs (sharing mode -> run directory);
    each move redraws the frame as a PNG (cached per step). A note instead when no run has
    snapshots."""
    timelines = load_timelines(run_dirs)
    if not timelines:
        return _missing(run_dirs)
    steps = all_steps(timelines)
    # continuous_update=False: one redraw when the slider is let go, not one per pixel of the drag
    slider = widgets.SelectionSlider(
        options=steps, value=steps[0], description="step", continuous_update=False
    )
    play = widgets.Play(min=0, max=len(steps) - 1, step=1, value=0, interval=interval_ms, description="play")
    widgets.jslink((play, "value"), (slider, "index"))  # in the browser: Play moves the slider
    view = widgets.Output()
    pngs: dict[int, bytes] = {}

    def redraw(_=None):
        step = slider.value
        view.clear_output(wait=True)
        with view:  # an exception here is shown in the output area, not lost in the kernel log
            if step not in pngs:
                pngs[step] = figure_png(frame_figure(timelines, step), dpi=dpi)
            display(Image(data=pngs[step]))

    slider.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([play, slider]), view])


def write_animation(run_dirs: dict[str, str | Path], path: str | Path, fps: float = 2.0, dpi: int = 60):
    """Every snapshot step as one GIF frame (matplotlib's PillowWriter), written atomically, and beside
    it <stem>.csv with the numbers the panel titles show (mode, step, table, tokens, average cosine,
    within - between-class gap); returns the GIF's path, or None when no run has snapshots."""
    from matplotlib.animation import PillowWriter  # needs Pillow; only writing the GIF does

    timelines = load_timelines(run_dirs)
    if not timelines:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = all_steps(timelines)
    fig = frame_figure(timelines, steps[0])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".gif")  # Pillow: by suffix
    os.close(fd)
    try:
        writer = PillowWriter(fps=fps)
        with writer.saving(fig, tmp, dpi):
            for step in [*steps, steps[-1]]:  # the last frame twice: a pause before the loop restarts
                draw_frame(fig, timelines, step)
                writer.grab_frame()
        replace_file(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    rows = [
        {
            "mode": mode,
            "step": step,
            "table": name,
            "tokens": len(tl.colour),
            "avg_cosine": tl.cosine[name][i],
            "class_gap": tl.gap[name][i],
        }
        for mode, tl in timelines.items()
        for name in tl.cosine
        for i, step in enumerate(tl.steps)
    ]
    write_csv(path.with_suffix(".csv"), rows)
    return path
