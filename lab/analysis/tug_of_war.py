"""The tug-of-war analysis: embedding geometry, gradient conflict, and figures drawn from run directories.

The measures of one table come first (the probe's pure measures live in lab/pretrain/probe.py); the
figure functions read only the files a run writes (metrics.jsonl, summary.json, embeddings.safetensors,
token_counts.npy, token_classes.json), never a live model. The over-seeds report at the end
(`run_quantities`, `seeded_report`) is built from the single-seed views.
Dimension legend: V rows of a table (vocabulary), D hidden size, n selected rows.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lab import sharing
from lab.analysis import claims, stats
from lab.analysis.stats import finite, save_figure
from lab.pretrain.probe import average_pairwise_cosine
from lab.util import atomic_write_json, read_jsonl, write_csv


def class_separation(E: torch.Tensor, token_classes: dict[int, str]) -> dict[str, float]:
    """Within-class vs between-class average cosine of the rows listed in token_classes.

    within: mean over classes (with >= 2 rows) of the class's average pairwise cosine, weighted by the
    number of pairs, i.e. the mean cosine over all same-class pairs. between: mean cosine over all
    pairs from different classes. gap = within - between: positive when the table groups tokens by
    their ground-truth class.
    """
    if not token_classes:
        raise ValueError("token_classes is empty; pass {token_id: class_name} for at least two classes")
    E = E.detach().float()
    by_class: dict[str, list[int]] = {}
    for token_id, name in token_classes.items():
        if 0 <= int(token_id) < E.shape[0]:
            by_class.setdefault(name, []).append(int(token_id))
    if len(by_class) < 2:
        raise ValueError(
            f"class_separation needs at least two classes inside the table, got {sorted(by_class)}"
        )
    u = F.normalize(E, dim=1).double()
    sums, counts = {}, {}
    for name, ids in by_class.items():
        sums[name] = u[ids].sum(dim=0)  # [D]
        counts[name] = len(ids)
    within_sum, within_pairs = 0.0, 0
    for name in by_class:
        n = counts[name]
        within_sum += float(sums[name].dot(sums[name])) - n
        within_pairs += n * (n - 1)
    total = sum(sums.values())
    n_all = sum(counts.values())
    # All ordered pairs i != j, minus the same-class ones, leaves the between-class pairs.
    all_sum = float(total.dot(total)) - n_all
    between_pairs = n_all * (n_all - 1) - within_pairs
    within = within_sum / within_pairs if within_pairs else float("nan")
    between = (all_sum - within_sum) / between_pairs if between_pairs else float("nan")
    return {"within": within, "between": between, "gap": within - between}


def nearest_neighbours(E: torch.Tensor, ids: Sequence[int], k: int, tokenizer=None, exclude=()) -> list[dict]:
    """The k rows most cosine-similar to each query row (the query itself and `exclude` ids left out).

    Returns one dict per query: {"id", "token", "neighbours": [(id, token, cosine), ...]}. token is the
    SentencePiece piece when a tokenizer is given, else str(id).
    """
    E = E.detach().float()
    u = F.normalize(E, dim=1)  # [V, D]
    skip = torch.zeros(E.shape[0], dtype=torch.bool)
    for i in exclude:
        if 0 <= int(i) < E.shape[0]:
            skip[int(i)] = True
    skip |= E.norm(dim=1) == 0

    def name(i: int) -> str:
        return tokenizer.id_to_piece(i) if tokenizer is not None else str(i)

    out = []
    for i in ids:
        sims = u @ u[int(i)]  # [V]
        sims[skip] = -math.inf
        sims[int(i)] = -math.inf
        top = torch.topk(sims, min(k, int((~torch.isinf(sims)).sum())))
        neighbours = [(int(j), name(int(j)), round(float(s), 4)) for s, j in zip(top.values, top.indices)]
        out.append({"id": int(i), "token": name(int(i)), "neighbours": neighbours})
    return out


def attention_terms(
    attention, h: torch.Tensor, rel: torch.Tensor, index: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The three score terms of one DisentangledSelfAttention, per head, before the softmax.

    h [B, T, D] the layer input, rel [R, D] the normalised relative rows, index [2, T, T] (as
    Encoder.relative_positions builds them). Returns c2c, c2p, p2c, each [B, H, T, T] and divided by
    the shared sqrt(3 * Dh), so c2c + c2p + p2c is the score matrix the softmax sees (before the pad
    mask). The position terms come from the attention module's own `position_terms`.
    """
    with torch.no_grad():
        q = attention.split_heads(attention.query(h))  # [B, H, T, Dh]
        k = attention.split_heads(attention.key(h))  # [B, H, T, Dh]
        c2p, p2c = attention.position_terms(q, k, rel, index)  # [B, H, T, T] each
        return {"c2c": (q @ k.transpose(-1, -2)) * attention.scale, "c2p": c2p, "p2c": p2c.contiguous()}


# ----------------------------------------------------------------------------------------------
# Reading run directories


@dataclass
class RunRecord:
    """The files of one pre-training run directory, loaded (tables lazily)."""

    path: Path
    config: dict
    summary: dict
    metrics: list[dict]

    def rows(self, split: str) -> list[dict]:
        return [r for r in self.metrics if r.get("split") == split]

    def embeddings(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        file = self.path / "embeddings.safetensors"
        if not file.exists():
            raise FileNotFoundError(
                f"{file} is missing; the run did not finish (train(cfg) writes it at the end)"
            )
        return load_file(str(file))

    def tokenizer(self):
        from lab.tokenizer import Tokenizer

        file = self.path / "tokenizer" / "spm.model"
        return Tokenizer.load(file) if file.exists() else None

    def token_counts(self) -> np.ndarray | None:
        file = self.path / "token_counts.npy"
        return np.load(file) if file.exists() else None

    def token_classes(self) -> dict[int, str] | None:
        file = self.path / "token_classes.json"
        return {int(k): v for k, v in json.loads(file.read_text()).items()} if file.exists() else None


def load_run(path: str | Path) -> RunRecord:
    path = Path(path)
    if not (path / "metrics.jsonl").exists():
        raise FileNotFoundError(
            f"{path} is not a run directory (no metrics.jsonl); train one with `python -m lab pretrain --out_dir {path}`"
        )

    def read(name):
        return json.loads((path / name).read_text()) if (path / name).exists() else {}

    return RunRecord(path, read("config.json"), read("summary.json"), read_jsonl(path / "metrics.jsonl"))


def seen_token_ids(run: RunRecord, vocab_rows: int) -> list[int]:
    """Non-special ids that occurred in the training split (token_counts > 0): the rows both losses touch."""
    counts = run.token_counts()
    tokenizer = run.tokenizer()
    special = set(tokenizer.special_ids) if tokenizer is not None else set(range(4))
    if counts is None:
        ids = range(vocab_rows)
    else:
        ids = np.flatnonzero(counts[:vocab_rows] > 0).tolist()
    return [i for i in ids if i not in special]


# ----------------------------------------------------------------------------------------------
# Files: every figure is written as PNG + SVG next to the CSV it was drawn from


def write_markdown(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def new_figure(width: float = 6.0, height: float = 3.6, ncols: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global state, works headless

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, ncols)
    return fig, axes


def figure(stem: Path, draw, width: float = 6.0, height: float = 3.6, ncols: int = 1) -> list[Path]:
    """Draw with `draw(axes)` on a new figure and save it as PNG + SVG at `stem`; [] where matplotlib is
    not installed (a bare GPU box): the CSV written beside it holds every number."""
    try:
        fig, axes = new_figure(width, height, ncols)
    except ImportError:
        return []
    draw(axes)
    return save_figure(fig, stem)


def _rolling_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` rows (fewer at the start): less lag than an EMA of the same smoothness."""
    sums = np.cumsum([0.0, *values])
    return [
        float((sums[i + 1] - sums[max(0, i + 1 - window)]) / min(window, i + 1)) for i in range(len(values))
    ]


# ----------------------------------------------------------------------------------------------
# The five views of the tug-of-war


def mlm_loss_curves(runs: dict[str, RunRecord], out_dir: Path, window: int | None = None) -> dict:
    """(a) Generator MLM loss vs step per mode: train rows (trailing mean over `window` rows, default
    1/20 of the run) and eval rows (held out)."""
    rows = []
    for mode, run in runs.items():
        train = run.rows("train")
        smoothed = _rolling_mean([r["mlm_loss"] for r in train], window or max(1, len(train) // 20))
        rows += [
            {"mode": mode, "split": "train", "step": r["step"], "mlm_loss": r["mlm_loss"], "smoothed": s}
            for r, s in zip(train, smoothed)
        ]
        rows += [
            {"mode": mode, "split": "eval", "step": r["step"], "mlm_loss": r["mlm_loss"]}
            for r in run.rows("eval")
        ]
    csv_path = write_csv(out_dir / "mlm_loss.csv", rows)

    def draw(ax):
        for mode in runs:
            color = sharing.get(mode).color
            train = [r for r in rows if r["mode"] == mode and r["split"] == "train"]
            steps = [r["step"] for r in train]
            ax.plot(steps, [r["mlm_loss"] for r in train], color=color, alpha=0.2, lw=0.8)
            ax.plot(steps, [r["smoothed"] for r in train], color=color, label=f"{mode} train")
            held = [r for r in rows if r["mode"] == mode and r["split"] == "eval"]
            ax.plot(
                [r["step"] for r in held],
                [r["mlm_loss"] for r in held],
                "o--",
                color=color,
                ms=4,
                label=f"{mode} held-out",
            )
        ax.set(xlabel="step", ylabel="generator MLM loss", title="MLM loss under each sharing mode")
        ax.legend(fontsize=7)

    final = {}
    for mode in runs:
        train = [r for r in rows if r["mode"] == mode and r["split"] == "train"]
        final[mode] = train[-1]["smoothed"] if train else float("nan")
    return {"csv": csv_path, "figures": figure(out_dir / "mlm_loss", draw), "final_smoothed_mlm_loss": final}


def embedding_similarity(runs: dict[str, RunRecord], out_dir: Path) -> dict:
    """(b) The paper's table: average pairwise cosine of word-embedding rows (seen, non-special tokens)
    of E_G and E_D per mode, plus E_delta for GDES."""
    rows = []
    for mode, run in runs.items():
        tables = run.embeddings()
        ids = seen_token_ids(run, tables["generator"].shape[0])
        rows.append({"mode": mode, "tokens": len(ids), **table_cosines(tables, ids)})
    csv_path = write_csv(out_dir / "embedding_cosine.csv", rows)
    md_path = write_markdown(out_dir / "embedding_cosine.md", rows)
    names = ["E_G", "E_D", "E_delta"]
    width = 0.8 / len(names)

    def draw(ax):
        for j, name in enumerate(names):
            xs = [i + j * width for i, r in enumerate(rows) if name in r]
            ax.bar(xs, [r[name] for r in rows if name in r], width, label=name, color=f"C{j}")
        ax.set_xticks([i + width for i in range(len(rows))], [r["mode"] for r in rows])
        ax.axhline(0, color="k", lw=0.5)
        ax.set(ylabel="average pairwise cosine", title="Word-embedding similarity (seen tokens)")
        ax.legend(fontsize=7)

    return {
        "csv": csv_path,
        "figures": figure(out_dir / "embedding_cosine", draw),
        "markdown": md_path,
        "table": rows,
    }


def table_cosines(tables: dict[str, torch.Tensor], ids: Sequence[int]) -> dict[str, float]:
    """Average pairwise cosine of the rows `ids` of each table a run exported: E_G, E_D and (GDES) E_delta."""
    names = (("generator", "E_G"), ("discriminator", "E_D"), ("delta", "E_delta"))
    return {name: average_pairwise_cosine(tables[key], ids) for key, name in names if key in tables}


PROBE_TITLES = {
    "grad_cos": "cosine of the MLM and RTD gradients",
    "similarity_pull_mlm": "MLM step: change of E_G's avg cosine",
    "similarity_pull_rtd": "RTD step: change of E_D's avg cosine",
    "rtd_grad_on_generator": "RTD gradient norm reaching E_G",
}


def gradient_conflict(runs: dict[str, RunRecord], out_dir: Path) -> dict:
    """(c) The probe rows of metrics.jsonl: cosine between the MLM and the (weighted) RTD gradient on
    the embedding table(s), vs step per mode. Negative = the two losses pull the rows apart."""
    rows = []
    for mode, run in runs.items():
        for r in run.rows("probe"):
            rows.append({"mode": mode, **{k: v for k, v in r.items() if k != "split"}})
    csv_path = write_csv(out_dir / "grad_conflict.csv", rows)
    keys = [k for k in PROBE_TITLES if any(k in r for r in rows)] or ["grad_cos"]
    means = {}
    for mode in runs:
        for key in keys:
            values = [r[key] for r in rows if r["mode"] == mode and finite(r.get(key))]
            if values:
                means.setdefault(mode, {})[key] = float(np.mean(values))

    def draw(axes):
        for ax, key in zip(np.atleast_1d(axes), keys):
            for mode in runs:
                pts = [(r["step"], r[key]) for r in rows if r["mode"] == mode and finite(r.get(key))]
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, color=sharing.get(mode).color, label=mode)
            ax.axhline(0, color="k", lw=0.5)
            ax.set(xlabel="step", ylabel=key, title=PROBE_TITLES[key])
            ax.legend(fontsize=7)

    figures = figure(out_dir / "grad_conflict", draw, width=5.0 * len(keys), ncols=len(keys))
    return {"csv": csv_path, "figures": figures, "mean": means}


def seen_classes(run: RunRecord) -> dict[int, str] | None:
    """The ground-truth classes (synthetic corpus) of the tokens that occurred in training; None without."""
    classes = run.token_classes()
    if not classes:
        return None
    counts = run.token_counts()
    if counts is not None:
        classes = {i: c for i, c in classes.items() if i < len(counts) and counts[i] > 0}
    return classes


def class_structure(runs: dict[str, RunRecord], out_dir: Path) -> dict | None:
    """(d) On the synthetic corpus: within-class minus between-class cosine of E_G and E_D per mode,
    against the ground-truth classes of token_classes.json. None when no run has them."""
    rows = []
    for mode, run in runs.items():
        classes = seen_classes(run)
        if not classes:
            continue
        tables = run.embeddings()
        for key, name in (("generator", "E_G"), ("discriminator", "E_D")):
            sep = class_separation(tables[key], classes)
            rows.append({"mode": mode, "table": name, **sep, "tokens": len(classes)})
    if not rows:
        return None
    csv_path = write_csv(out_dir / "class_separation.csv", rows)
    md_path = write_markdown(out_dir / "class_separation.md", rows)
    modes = list(dict.fromkeys(r["mode"] for r in rows))

    def draw(ax):
        for j, name in enumerate(("E_G", "E_D")):
            gaps = [
                next((r["gap"] for r in rows if r["mode"] == m and r["table"] == name), 0.0) for m in modes
            ]
            ax.bar([i + j * 0.4 for i in range(len(modes))], gaps, 0.4, label=name, color=f"C{j}")
        ax.set_xticks([i + 0.2 for i in range(len(modes))], modes)
        ax.axhline(0, color="k", lw=0.5)
        ax.set(ylabel="within - between class cosine", title="Embedding structure vs ground-truth classes")
        ax.legend(fontsize=7)

    return {
        "csv": csv_path,
        "figures": figure(out_dir / "class_separation", draw),
        "markdown": md_path,
        "table": rows,
    }


def neighbour_tables(runs: dict[str, RunRecord], out_dir: Path, queries: int = 8, k: int = 5) -> dict:
    """(d) Nearest neighbours of frequent whole-word tokens in E_G and E_D per mode (CSV + markdown).
    The query tokens come from the first run's counts, so every mode answers the same questions."""
    first = next(iter(runs.values()))
    tokenizer = first.tokenizer()
    counts = first.token_counts()
    if tokenizer is None or counts is None:
        return {}
    special = set(tokenizer.special_ids)
    order = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0 and int(i) not in special]
    words = [
        i for i in order if tokenizer.id_to_piece(i).startswith("▁") and len(tokenizer.id_to_piece(i)) >= 4
    ]
    pool = words or order
    chosen = pool[:: max(1, len(pool) // queries)][
        :queries
    ]  # spread over frequency ranks, not only function words
    classes = first.token_classes() or {}

    def label(i, piece):
        return f"{piece} [{classes[i]}]" if i in classes else piece

    rows = []
    for mode, run in runs.items():
        tables = run.embeddings()
        for key, name in (("generator", "E_G"), ("discriminator", "E_D")):
            for hit in nearest_neighbours(tables[key], chosen, k, tokenizer, exclude=special):
                rows.append(
                    {
                        "mode": mode,
                        "table": name,
                        "token": label(hit["id"], hit["token"]),
                        "neighbours": " ".join(f"{label(j, t)} {c:.2f}" for j, t, c in hit["neighbours"]),
                    }
                )
    csv_path = write_csv(out_dir / "nearest_neighbours.csv", rows)
    md_path = write_markdown(out_dir / "nearest_neighbours.md", rows)
    return {"csv": csv_path, "markdown": md_path, "queries": [tokenizer.id_to_piece(i) for i in chosen]}


EVAL_KEYS = ("mlm_loss", "mlm_acc", "rtd_loss", "rtd_acc", "rtd_auc")


def final_eval(runs: dict[str, RunRecord], out_dir: Path) -> dict:
    """(e) Held-out MLM loss, RTD accuracy and AUC per mode, from the last eval row."""
    rows = []
    for mode, run in runs.items():
        evals = run.rows("eval")
        last = evals[-1] if evals else run.summary.get("final_eval", {})
        rows.append(
            {"mode": mode, "step": last.get("step", ""), **{k: last[k] for k in EVAL_KEYS if k in last}}
        )
    csv_path = write_csv(out_dir / "final_eval.csv", rows)
    md_path = write_markdown(out_dir / "final_eval.md", rows)
    shown = [k for k in ("mlm_loss", "rtd_acc", "rtd_auc") if any(k in r for r in rows)]

    def draw(axes):
        for ax, key in zip(np.atleast_1d(axes), shown):
            ax.bar(
                [r["mode"] for r in rows],
                [r.get(key, float("nan")) for r in rows],
                color=[sharing.get(r["mode"]).color for r in rows],
            )
            ax.set(title=f"held-out {key}")

    figures = figure(out_dir / "final_eval", draw, width=3.2 * max(1, len(shown)), ncols=max(1, len(shown)))
    return {"csv": csv_path, "figures": figures, "markdown": md_path, "table": rows}


def tug_of_war_report(run_dirs: dict[str, str | Path], out_dir: str | Path) -> dict:
    """All five views for runs keyed by sharing mode (name -> run directory); writes every
    CSV / PNG / SVG / markdown table and summary.json into out_dir, and returns the summary."""
    if not run_dirs:
        raise ValueError("run_dirs is empty; pass {'es': run_dir, 'nes': run_dir, 'gdes': run_dir}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {mode: load_run(path) for mode, path in run_dirs.items()}
    parts = {
        "mlm_loss": mlm_loss_curves(runs, out_dir),
        "embedding_cosine": embedding_similarity(runs, out_dir),
        "grad_conflict": gradient_conflict(runs, out_dir),
        "class_separation": class_structure(runs, out_dir),
        "nearest_neighbours": neighbour_tables(runs, out_dir),
        "final_eval": final_eval(runs, out_dir),
    }
    cos = {r["mode"]: r for r in parts["embedding_cosine"]["table"]}
    summary = {
        "runs": {mode: str(path) for mode, path in run_dirs.items()},
        "final_smoothed_mlm_loss": parts["mlm_loss"]["final_smoothed_mlm_loss"],
        "embedding_cosine": {m: {k: v for k, v in r.items() if k != "mode"} for m, r in cos.items()},
        "grad_cos_mean": parts["grad_conflict"]["mean"],
        "class_gap": {
            f"{r['mode']}/{r['table']}": r["gap"] for r in (parts["class_separation"] or {}).get("table", [])
        },
        "final_eval": {
            r["mode"]: {k: v for k, v in r.items() if k != "mode"} for r in parts["final_eval"]["table"]
        },
        "files": sorted(p.name for p in _paths(parts)),
    }
    summary["paper_claims"] = _paper_claims(summary)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _paths(obj) -> list[Path]:
    """Every file path inside the parts' results (the files this report wrote)."""
    if isinstance(obj, Path):
        return [obj]
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in _paths(v)]
    if isinstance(obj, list):
        return [p for v in obj for p in _paths(v)]
    return []


def _paper_claims(summary: dict) -> dict:
    """The DeBERTaV3 paper's claims about sharing (He et al. 2023, §3.2-3.3), as observed in these runs:
    ES's generator MLM loss ends highest (its MLM converges more slowly), and the embedding geometry
    (NES: E_G more self-similar than E_D; ES's shared table below NES's E_G). True / False; absent
    when a mode is missing."""
    mlm, cos = summary["final_smoothed_mlm_loss"], summary["embedding_cosine"]
    es, nes, gdes = sharing.ES.name, sharing.NES.name, sharing.GDES.name
    claims = {}
    if {es, nes, gdes} <= mlm.keys():
        claims["es_mlm_loss_highest"] = bool(mlm[es] > max(mlm[nes], mlm[gdes]))
    if nes in cos:
        claims["nes_generator_more_similar_than_discriminator"] = bool(cos[nes]["E_G"] > cos[nes]["E_D"])
    if {es, nes} <= cos.keys():
        claims["es_table_below_nes_generator"] = bool(cos[es]["E_G"] < cos[nes]["E_G"])
    return claims


# ----------------------------------------------------------------------------------------------
# Over seeds: each quantity per run, mean ± std per mode, paired differences between modes


def run_quantities(run: RunRecord) -> dict[str, float]:
    """The tug-of-war figures of one run as scalars: final held-out MLM loss and RTD AUC, the held-out
    curves' scalars (`heldout_curve_quantities`), the mean train MLM loss over the run (the area under
    its curve: lower = converged faster), the average pairwise cosine of each table and E_G's minus E_D's, the class-separation gap of E_G and E_D (synthetic
    corpus) and the probe means (similarity pull of each loss, gradient cosine). A diverged run keeps
    its non-finite values (NaN loss at the last evaluation, NaN mean): it is counted as a failure by
    the report, never silently averaged over its finite rows."""
    out: dict[str, float] = {}
    evals = [r for r in run.rows("eval") if "mlm_loss" in r]
    if evals:
        out["final_mlm_loss"] = _number(evals[-1]["mlm_loss"])
        if "rtd_auc" in evals[-1]:
            out["final_rtd_auc"] = _number(evals[-1]["rtd_auc"])
    out.update(heldout_curve_quantities(run.rows("eval")))
    train = [_number(r["mlm_loss"]) for r in run.rows("train") if "mlm_loss" in r]
    if train:
        out["mean_train_mlm_loss"] = float(np.mean(train))
    tables = run.embeddings()
    cos = table_cosines(tables, seen_token_ids(run, tables["generator"].shape[0]))
    out.update({f"cos_{name}": value for name, value in cos.items()})
    out["cos_E_G_minus_E_D"] = cos["E_G"] - cos["E_D"]
    classes = seen_classes(run)
    if classes:
        for key, name in (("generator", "E_G"), ("discriminator", "E_D")):
            out[f"class_gap_{name}"] = class_separation(tables[key], classes)["gap"]
    for key in ("similarity_pull_mlm", "similarity_pull_rtd", "grad_cos"):
        values = [_number(r[key]) for r in run.rows("probe") if key in r]
        if values:
            out[key] = float(np.mean(values))
    return out


def heldout_curve_quantities(evals: list[dict]) -> dict[str, float]:
    """Scalars of the held-out evaluations (metrics.jsonl's eval rows, in step order): mlm_area, the MLM
    curve's area over its step span (claims.curve_area); mlm_flatten_fraction, the share of the MLM drop
    made in the last quarter of training (claims.flattening); final_fixed_auc, the last evaluation's AUC
    on the fixed corruption set (lab/pretrain/evaluate.py: the same corrupted rows for every mode, so it
    compares discriminators where rtd_auc does not); fixed_auc_flatten_fraction, the same share for the
    detection error 1 - fixed_auc, which falls like a loss. A curve's keys need two evaluations with the
    value (final_fixed_auc one, like final_rtd_auc: the steps=0 control has exactly one) and are left out
    otherwise; a non-finite value (a diverged run) makes the key NaN, a failure the report counts."""
    out: dict[str, float] = {}
    mlm = [(r["step"], _number(r["mlm_loss"])) for r in evals if "mlm_loss" in r]
    fixed = [(r["step"], _number(r["fixed_auc"])) for r in evals if "fixed_auc" in r]
    if fixed:
        out["final_fixed_auc"] = fixed[-1][1]
    if len(mlm) >= 2:
        out["mlm_area"] = _curve_scalar(claims.curve_area, mlm)
        out["mlm_flatten_fraction"] = _curve_scalar(_flatten_fraction, mlm)
    if len(fixed) >= 2:
        error = [(step, 1 - auc) for step, auc in fixed]
        out["fixed_auc_flatten_fraction"] = _curve_scalar(_flatten_fraction, error)
    return out


def _flatten_fraction(steps, values) -> float:
    return claims.flattening(steps, values)["fraction"]


def _curve_scalar(measure, points: list[tuple[int, float]]) -> float:
    """measure(steps, values) of one curve, NaN when a value is not finite (claims' measures refuse it)."""
    steps, values = zip(*points)
    return float(measure(steps, values)) if all(map(math.isfinite, values)) else math.nan


def _number(v) -> float:
    """A logged value as a float; None (what JSON makes of NaN / inf in some writers) as NaN."""
    return math.nan if v is None else float(v)


def read_run_rows(path: Path) -> list[dict]:
    """tug_of_war_runs.csv back as records {mode, pretrain_seed, quantity, value}: an empty cell is a
    quantity the run does not have (cos_E_delta outside GDES), 'nan' a failed value."""
    records = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            mode, seed = row.pop("mode"), int(row.pop("pretrain_seed"))
            records += [
                {"mode": mode, "pretrain_seed": seed, "quantity": k, "value": float(v)}
                for k, v in row.items()
                if v != ""
            ]
    return records


def seeded_report(
    run_dirs: dict[tuple[str, int], str | Path],
    out_dir: str | Path,
    comparisons=((sharing.GDES.name, sharing.ES.name), (sharing.GDES.name, sharing.NES.name)),
    primary: tuple = (),
) -> dict:
    """The tug-of-war over pre-training seeds, for runs keyed by (mode, seed).

    Writes into out_dir: tug_of_war_runs.csv (every quantity of every run: the rows every table is
    computed from), then `tug_of_war_tables` from that file; curves with error bands over seeds (MLM
    loss train and held-out, the fixed-set AUC, the similarity pulls), each next to its CSV, and the
    single-seed views of `tug_of_war_report` for the first seed in seed-<s>/. `primary`: the claims
    tested in the differences table (see `tug_of_war_tables`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {key: load_run(path) for key, path in run_dirs.items()}
    per_run = [
        {"mode": mode, "pretrain_seed": seed, **run_quantities(run)} for (mode, seed), run in runs.items()
    ]
    write_csv(out_dir / "tug_of_war_runs.csv", per_run, digits=None)
    tables = tug_of_war_tables(read_run_rows(out_dir / "tug_of_war_runs.csv"), out_dir, comparisons, primary)
    figures = []
    for name, split, key, title in (
        ("mlm_loss_train", "train", "mlm_loss", "generator MLM loss (train), mean ± std over seeds"),
        ("mlm_loss_heldout", "eval", "mlm_loss", "generator MLM loss (held out), mean ± std over seeds"),
        (
            "fixed_auc_heldout",
            "eval",
            "fixed_auc",
            "discriminator AUC on the fixed corruption set (held out)\nmean ± std over seeds",
        ),
        ("similarity_pull_mlm", "probe", "similarity_pull_mlm", PROBE_TITLES["similarity_pull_mlm"]),
        ("similarity_pull_rtd", "probe", "similarity_pull_rtd", PROBE_TITLES["similarity_pull_rtd"]),
    ):
        rows = [
            {"mode": mode, "pretrain_seed": seed, "step": r["step"], key: r[key]}
            for (mode, seed), run in runs.items()
            for r in run.rows(split)
            if finite(r.get(key))
        ]
        if rows:
            write_csv(out_dir / f"{name}.csv", rows)
            figures.append(stats.curves_with_bands(rows, "step", key, "mode", out_dir / name, title))
    first_seed = min(seed for _, seed in runs)
    detail = {mode: run.path for (mode, seed), run in runs.items() if seed == first_seed}
    single = tug_of_war_report(detail, out_dir / f"seed-{first_seed}")
    return {
        "runs": {f"{mode}-s{seed}": str(path) for (mode, seed), path in run_dirs.items()},
        **tables,
        "single_seed_claims": single["paper_claims"],
        "figures": tables["figures"] + [str(p) for paths in figures if paths for p in paths],
    }


def tug_of_war_tables(records: list[dict], out_dir: Path, comparisons, primary: tuple = ()) -> dict:
    """From the per-run records: tug_of_war_summary.{csv,md} (mean ± std and t interval per quantity
    and mode over the finite runs, failed runs counted), tug_of_war_differences.{csv,md} (paired over
    pre-training seeds; the rows of the claims `primary` (lab.analysis.claims.Claim: quantity, comparison, family)
    tested within their families by lab.analysis.claims.test_claims, every other row exploratory) and
    the differences figure as small multiples."""
    summary = stats.summarize(records, ("quantity", "mode"))
    write_csv(out_dir / "tug_of_war_summary.csv", summary)
    write_markdown(out_dir / "tug_of_war_summary.md", summary)
    diffs = stats.paired_by_seed(records, ("quantity",), comparisons)
    quantity_of = itemgetter("quantity")
    diffs = claims.overlay_claims(diffs, claims.test_claims(primary, records, quantity_of), quantity_of)
    write_csv(out_dir / "tug_of_war_differences.csv", diffs)
    write_markdown(out_dir / "tug_of_war_differences.md", diffs)
    figure = stats.differences_plot(
        diffs,
        ("quantity",),
        out_dir / "tug_of_war_differences",
        "Paired differences over pre-training seeds (each panel its own scale)",
    )
    return {"summary": summary, "differences": diffs, "figures": [str(p) for p in figure or []]}
