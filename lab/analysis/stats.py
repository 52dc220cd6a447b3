"""Statistics over seeds: mean ± std, paired differences between sharing modes with bootstrap CIs.

The experiment's question is whether one sharing mode beats another by more than seed noise. Runs are
paired: the same pre-training seed gives ES, NES and GDES the same initialisation, data order and
masking noise, and the same fine-tuning seed gives them the same head initialisation and batch order.
So the comparison is made on per-pair differences (GDES − ES for pair (pre-training seed, fine-tuning
seed)), which removes the variance the modes share; an unpaired comparison of the two groups of scores
would count that variance twice and miss real differences (`unpaired_difference` is kept to show it).

The confidence interval is a percentile bootstrap of the mean difference: resample the pairs with
replacement, recompute the mean, take the 2.5 and 97.5 percentiles. It is seeded, so a table is
reproducible to the last digit. A difference is *resolved* when its interval excludes 0 and so does the
Student-t interval of the same mean (with three pairs the bootstrap alone is far too narrow; see
`paired_difference`). Caveat:
pairs that share a pre-training seed are not independent of each other; with few pre-training seeds
the interval understates the pre-training variance, which is why the tables also list how many
pre-training seeds each difference rests on.

numpy / scipy only at import time; the plotting functions import matplotlib / seaborn when called and
return None (with the reason in `PLOTTING_UNAVAILABLE`) where they are not installed, e.g. on a bare
GPU box, so the numbers are always written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000


def mean_std(values: Sequence[float]) -> dict:
    """mean, sample std (ddof 1; 0 for a single value) and n of the finite values."""
    x = np.asarray([v for v in values if finite(v)], dtype=float)
    if x.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0, "n": int(x.size)}


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` (default: the mean) of `values`.

    Resamples `values` with replacement `resamples` times from a generator seeded with `seed`, so the
    same inputs always give the same interval. One value gives a zero-width interval at that value.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-d sequence of numbers, got shape {x.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, x.size, size=(resamples, x.size))  # [resamples, n] indices into x
    samples = x[picks]  # [resamples, n]
    stats = samples.mean(axis=1) if statistic is None else statistic(samples)  # [resamples]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean (nan, nan for fewer than two values)."""
    from scipy.stats import t

    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return math.nan, math.nan
    half = t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def paired_difference(
    a: Mapping[Hashable, float],
    b: Mapping[Hashable, float],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """a − b over the pairs both have (keys such as (pretrain_seed, finetune_seed)), with a bootstrap CI
    of the mean difference that resamples whole pairs.

    Returns {mean, std, n, ci_low, ci_high, t_low, t_high, resolved}: std is the spread of the per-pair
    differences; [ci_low, ci_high] the percentile bootstrap interval; [t_low, t_high] the Student-t
    interval of the same mean. resolved: both intervals exclude 0. Why both: with very few pairs the
    percentile bootstrap is too narrow (it can never be wider than the range of the differences, so
    three same-signed differences always "exclude 0", a 1-in-4 event under no effect); the t interval
    keeps the small-sample width, the bootstrap guards against a skewed or outlying pair. Pairs where
    either value is missing or not finite are left out (a nan-scored seed cannot be compared).
    """
    keys = [k for k in a if k in b and finite(a[k]) and finite(b[k])]
    if not keys:
        raise ValueError(
            f"no common finite pairs to compare: first has {sorted(map(str, a))}, second {sorted(map(str, b))}"
        )
    diffs = np.array([a[k] - b[k] for k in sorted(keys, key=str)], dtype=float)
    low, high = bootstrap_ci(diffs, confidence=confidence, resamples=resamples, seed=seed)
    t_low, t_high = t_interval(diffs, confidence)

    def excludes(lo, hi):  # False for nan bounds
        return bool(lo > 0 or hi < 0)

    return {
        **mean_std(diffs),
        "ci_low": low,
        "ci_high": high,
        "t_low": t_low,
        "t_high": t_high,
        "resolved": excludes(low, high) and excludes(t_low, t_high),
    }


def unpaired_difference(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """mean(a) − mean(b) with each group resampled on its own: what ignoring the pairing would say."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size == 0 or y.size == 0:
        raise ValueError("unpaired_difference needs at least one value in each group")
    rng = np.random.default_rng(seed)
    means_x = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)  # [resamples]
    means_y = y[rng.integers(0, y.size, size=(resamples, y.size))].mean(axis=1)  # [resamples]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means_x - means_y, [alpha, 1 - alpha])
    return {
        "mean": float(x.mean() - y.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "resolved": bool(low > 0 or high < 0),
    }


def verdict(diff: dict, first: str = "first", second: str = "second") -> str:
    """The plain-words column of a comparison table: which side is higher, or that it is not resolved."""
    if not diff.get("resolved"):
        return "not resolved (an interval includes 0)"
    return f"{first} higher" if diff["mean"] > 0 else f"{first} lower"


# ---------------------------------------------------------------------------------------------- tables


def summarize(records: Sequence[Mapping], group: Sequence[str], value: str = "value") -> list[dict]:
    """mean ± std over seeds of `value` for each combination of the `group` fields (first-seen order)."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault(tuple(r[g] for g in group), []).append(r[value])
    return [{**dict(zip(group, key)), **mean_std(vals)} for key, vals in groups.items()]


def compare_modes(
    records: Sequence[Mapping],
    quantity: Sequence[str],
    pairs: Sequence[tuple[str, str]] = (("gdes", "es"), ("gdes", "nes")),
    pair_keys: Sequence[str] = ("pretrain_seed", "finetune_seed"),
    seed: int = 0,
) -> list[dict]:
    """Paired differences between modes for every quantity.

    records: {"mode", <quantity fields>, <pair_keys>, "value"} (fields missing from a record count as
    ""). quantity: the fields that name what is measured (e.g. ("task", "metric")). One output row per
    quantity and (first, second) mode pair: the difference first − second over the pairs both have,
    its CI, and the verdict in words.
    """
    by_quantity: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = tuple(r.get(q, "") for q in quantity)
        pair = tuple(r.get(k, "") for k in pair_keys)
        by_quantity.setdefault(key, {}).setdefault(r["mode"], {})[pair] = r["value"]
    rows = []
    for key, modes in by_quantity.items():
        labels = dict(zip(quantity, key))
        for first, second in pairs:
            if first not in modes or second not in modes:
                continue
            try:
                diff = paired_difference(modes[first], modes[second], seed=seed)
            except ValueError:
                continue  # no common finite pair: nothing to say
            common = [p for p in modes[first] if p in modes[second]]
            rows.append(
                {
                    **labels,
                    "comparison": f"{first} - {second}",
                    "difference": diff["mean"],
                    "std": diff["std"],
                    "ci_low": diff["ci_low"],
                    "ci_high": diff["ci_high"],
                    "t_low": diff["t_low"],
                    "t_high": diff["t_high"],
                    "pairs": diff["n"],
                    "pretrain_seeds": len({p[0] for p in common}),
                    "resolved": "yes" if diff["resolved"] else "no",
                    "reads": verdict(diff, first, second),
                }
            )
    return rows


def finite(v) -> bool:
    return isinstance(v, int | float | np.floating | np.integer) and math.isfinite(float(v))


# ---------------------------------------------------------------------------------------------- figures

PLOTTING_UNAVAILABLE = ""  # set to the import error's text when matplotlib / seaborn are missing


def plotting_available() -> bool:
    global PLOTTING_UNAVAILABLE
    try:
        import matplotlib  # noqa: F401
        import seaborn  # noqa: F401
    except ImportError as err:
        PLOTTING_UNAVAILABLE = f"figures skipped: {err} (the CSV / JSON files hold every number)"
        return False
    return True


def curves_with_bands(
    rows: Sequence[Mapping], x: str, y: str, hue: str, out_stem: Path, title: str = "", ylabel: str = ""
) -> list[Path] | None:
    """Line per `hue` value, mean over the seeds at each x with a seaborn band of ± one std; PNG + SVG.
    None when matplotlib / seaborn are not installed."""
    if not plotting_available():
        return None
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.subplots()
    frame = pd.DataFrame([{x: r[x], y: r[y], hue: r[hue]} for r in rows if finite(r.get(y))])
    sns.lineplot(data=frame, x=x, y=y, hue=hue, errorbar="sd", ax=ax)
    ax.set(title=title, ylabel=ylabel or y)
    return _save(fig, Path(out_stem))


def bars_with_spread(
    rows: Sequence[Mapping], x: str, y: str, hue: str, out_stem: Path, title: str = ""
) -> list[Path] | None:
    """Bars of the mean of `y` per `x` and `hue` with ± one std over the seeds (seaborn); PNG + SVG.
    None when matplotlib / seaborn are not installed."""
    if not plotting_available() or not rows:
        return None
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.6 * len({r[x] for r in rows}) + 2), 3.6))
    ax = fig.subplots()
    frame = pd.DataFrame([{x: r[x], y: r[y], hue: r[hue]} for r in rows if finite(r.get(y))])
    sns.barplot(data=frame, x=x, y=y, hue=hue, errorbar="sd", ax=ax, capsize=0.1)
    ax.set(title=title)
    return _save(fig, Path(out_stem))


def differences_plot(
    rows: Sequence[Mapping], label: Sequence[str], out_stem: Path, title: str = ""
) -> list[Path] | None:
    """Forest plot: each comparison's mean difference with its bootstrap CI, 0 marked. None when
    matplotlib is not installed."""
    if not plotting_available() or not rows:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 0.35 * len(rows) + 1.2))
    ax = fig.subplots()
    names = [" · ".join(str(r[k]) for k in label) + f"  ({r['comparison']})" for r in rows]
    ys = np.arange(len(rows))[::-1]
    for yy, r in zip(ys, rows):
        color = "C0" if r["resolved"] == "yes" else "0.6"
        ax.errorbar(
            r["difference"],
            yy,
            xerr=[[r["difference"] - r["ci_low"]], [r["ci_high"] - r["difference"]]],
            fmt="o",
            color=color,
            capsize=3,
        )
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(ys, names, fontsize=7)
    ax.set(xlabel="paired difference, 95 % bootstrap CI (grey: CI includes 0)", title=title)
    return _save(fig, Path(out_stem))


def _save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1], metadata={"Date": None})  # no timestamp: reruns give identical files
    return paths
