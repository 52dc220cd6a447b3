"""Statistics over seeds with the pre-training seed as the unit of replication (scipy.stats).

The unit. The same pre-training seed gives ES, NES and GDES the same initialisation, data order and
masking noise, so modes are compared on per-seed paired differences. Fine-tuning seeds of one
discriminator share its pre-training draw: they are not independent replicates. A downstream score is
therefore first averaged over the fine-tuning seeds of each pre-training seed, and the comparison runs
over the pre-training seeds (n = number of pre-training seeds, n - 1 degrees of freedom). The
two-level bootstrap (pre-training seeds, then fine-tuning seeds within each) is the second view.

The tests (scipy.stats): the Student-t interval of the mean paired difference and its p-value
(`ttest_rel`), the paired bootstrap interval (`bootstrap(paired=True)`, BCa from `BCA_MIN_N` seeds,
percentile below, seeded) and the exact sign-flip p-value (`permutation_test(permutation_type=
"samples")`, all 2^n sign patterns). Decisions rest on the t-test: the exact sign-flip test cannot go
below 2 / 2^n (0.0625 at n = 5), so it is reported, not used to decide.

Families. Each claim names its primary comparisons before the run (`PRIMARY` in lab/analysis/experiment.py);
their t p-values are Holm-corrected within the claim's family, and a primary comparison is *resolved*
when its Holm-adjusted p is below ALPHA. Every other comparison is exploratory: shown with its
unadjusted interval and labelled so. `resolvable` is the smallest difference the design could call
resolved at the spread it saw: the half width of the t interval at the family's strictest Holm level
(ALPHA / family size).

Equivalence and power. A claim that two modes do *not* differ is tested by TOST within a margin fixed
before the run (`tost_paired`); not resolving a difference is not evidence of equivalence. Each paired
comparison's power at its observed dz, and the pre-training seeds 80 % power would need, come from the
noncentral t (`power_paired_t`, `n_for_power`, `power_columns`): planning numbers, not evidence.

Secondary views, labelled as such. The sign-flip p Holm-adjusted like the t p with the floor it can never
pass (`signflip_holm`); the bootstrap interval's caveat below BCA_MIN_N seeds (`bootstrap_caveat`); per-mode
intervals over pre-training seed means (`summarize_by_seed`; `summarize` counts every run as a replicate).
The claims and their families themselves live in lab/analysis/claims.py.

Failures. A non-finite value is a failed run, never a number: every function here refuses NaN / inf
with `NonFiniteError`; the report counts failures per mode and leaves the failed seeds out of a
comparison openly (column `failed_seeds`).

numpy / scipy only at import time; the plotting functions import matplotlib / seaborn when called and
return None (with the reason in `PLOTTING_UNAVAILABLE`) where they are not installed, e.g. on a bare
GPU box, so the numbers are always written.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
RESAMPLES = 10_000
BCA_MIN_N = 10  # BCa's jackknife acceleration is unreliable on fewer values: percentile below
POWER_TARGET = 0.8  # the power the seeds-needed columns (n_for_80, n_for_80_holm) are computed for
EXACT_SIGN_FLIPS = 2**16  # up to n = 16 every sign pattern is enumerated; above, RESAMPLES random ones


class NonFiniteError(ValueError):
    """A statistic was given NaN or inf: a failed run must be counted, not averaged."""


def require_finite(values, what: str = "values") -> np.ndarray:
    """`values` as a float array; NonFiniteError naming `what` and the bad positions if any is not finite."""
    x = np.asarray(values, dtype=float)
    bad = np.flatnonzero(~np.isfinite(x.ravel()))
    if bad.size:
        raise NonFiniteError(
            f"{what}: {bad.size} non-finite value(s) at position(s) {bad.tolist()} (failed runs); count them "
            "as failures and leave their seeds out explicitly (see lab.analysis.stats.paired_by_seed) instead"
        )
    return x


def mean_std(values: Sequence[float], what: str = "values") -> dict:
    """mean, sample std (ddof 1; 0 for a single value) and n. Refuses non-finite values."""
    x = require_finite(values, what)
    if x.size == 0:
        raise ValueError(f"{what}: no values")
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0, "n": int(x.size)}


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """scipy's one-sample Student-t interval of the mean (nan, nan for fewer than two values)."""
    x = require_finite(values, "t_interval")
    if x.size < 2:
        return math.nan, math.nan
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    ci = sps.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the k-th smallest p times (m - k + 1),
    made monotone, capped at 1. Reject where adjusted p < alpha."""
    p = require_finite(pvalues, "holm")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def paired_test(a: Sequence[float], b: Sequence[float], family_size: int = 1, seed: int = 0) -> dict:
    """a − b over paired values (one pair per pre-training seed), with scipy's tests.

    Returns {mean, std, n, t_low, t_high, p_t, boot_low, boot_high, boot_method, p_signflip,
    resolvable}: the t interval and p-value (`ttest_rel`), the paired bootstrap interval (BCa from
    BCA_MIN_N pairs, percentile below; `seed` fixes it), the exact sign-flip p-value and the smallest
    |difference| this spread could resolve at level ALPHA / family_size. Refuses non-finite values and
    fewer than two pairs.
    """
    x, y = require_finite(a, "first mode"), require_finite(b, "second mode")
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_test needs two 1-d sequences of equal length, got {x.shape} and {y.shape}")
    n = x.size
    if n < 2:
        raise ValueError(f"paired_test needs at least two paired seeds, got {n}; add pre-training seeds")
    d = x - y
    out = {**mean_std(d), "t_low": float(d[0]), "t_high": float(d[0]), "p_t": 1.0 if d[0] == 0 else 0.0}
    if np.ptp(d) > 0:  # constant differences: no spread, no test (scipy would return nan)
        t = sps.ttest_rel(x, y)
        ci = t.confidence_interval(CONFIDENCE)
        out.update(t_low=float(ci.low), t_high=float(ci.high), p_t=float(t.pvalue))
    mean_diff = lambda u, v, axis=-1: np.mean(u - v, axis=axis)  # noqa: E731
    method = "BCa" if n >= BCA_MIN_N else "percentile"
    if np.ptp(d) > 0:
        boot = sps.bootstrap(
            (x, y),
            mean_diff,
            paired=True,
            vectorized=True,
            n_resamples=RESAMPLES,
            confidence_level=CONFIDENCE,
            method=method,
            random_state=np.random.default_rng(seed),
        )
        out.update(
            boot_low=float(boot.confidence_interval.low), boot_high=float(boot.confidence_interval.high)
        )
    else:
        out.update(boot_low=float(d[0]), boot_high=float(d[0]))
    flips = np.inf if 2**n <= EXACT_SIGN_FLIPS else RESAMPLES
    perm = sps.permutation_test(
        (x, y),
        mean_diff,
        permutation_type="samples",
        vectorized=True,
        n_resamples=flips,
        random_state=np.random.default_rng(seed),
    )
    q = sps.t.ppf(1 - ALPHA / (2 * family_size), n - 1)
    out.update(
        boot_method=method, p_signflip=float(perm.pvalue), resolvable=float(q * out["std"] / math.sqrt(n))
    )
    return out


def two_level_bootstrap(diffs: Mapping[Hashable, Sequence[float]], seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean difference resampling pre-training seeds with replacement, then
    the fine-tuning seeds within each picked seed with replacement. `diffs`: pre-training seed ->
    the per-fine-tuning-seed differences. Seeded. (scipy's bootstrap has no nested resampling.)"""
    groups = [require_finite(v, f"pre-training seed {k}") for k, v in diffs.items()]
    if len(groups) < 2 or any(g.size == 0 for g in groups):
        raise ValueError("two_level_bootstrap needs at least two pre-training seeds, each with a value")
    rng = np.random.default_rng(seed)
    means = np.empty(RESAMPLES)
    for i in range(RESAMPLES):
        picked = rng.integers(0, len(groups), size=len(groups))
        means[i] = np.mean(
            [groups[j][rng.integers(0, groups[j].size, size=groups[j].size)].mean() for j in picked]
        )
    low, high = np.quantile(means, [ALPHA / 2, 1 - ALPHA / 2])
    return float(low), float(high)


def verdict(row: Mapping, first: str = "first", second: str = "second") -> str:
    """The plain-words column of a comparison table."""
    tag = "" if row.get("family", "exploratory") != "exploratory" else " (exploratory, uncorrected)"
    if not row.get("resolved"):
        return "not resolved" + tag
    return f"{first} {'higher' if row['difference'] > 0 else 'lower'}{tag}"


# ------------------------------------------------------------------------------- equivalence and power


def tost_paired(diffs: Sequence[float], margin: float, alpha: float = ALPHA) -> dict:
    """Two one-sided t-tests (TOST) that the mean paired difference lies within ±margin.

    Unit of replication: the pre-training seed. `diffs` holds one difference per pre-training seed
    (fine-tuning seeds already averaged within it). Assumed: the differences are independent draws from
    one normal distribution (Student t, n - 1 degrees of freedom), and `margin` — the largest |difference|
    that counts as none, in the quantity's own units — was fixed before the run; a margin picked after
    seeing the data decides nothing. Failing to show equivalence is not evidence of a difference.

    p_lower tests H0 mean <= -margin against mean > -margin (`ttest_1samp(d, -margin,
    alternative="greater")`), p_upper tests H0 mean >= +margin against mean < +margin
    (`alternative="less"`). Equivalent at level `alpha` when both are below it, that is when
    p_tost = max(p_lower, p_upper) < alpha, which is the same as the (1 - 2 alpha) t interval
    [low, high] lying inside (-margin, +margin).

    Returns {mean, std, n, margin, alpha, p_lower, p_upper, p_tost, low, high, confidence, equivalent,
    reads}.
    """
    d = require_finite(diffs, "tost_paired differences")
    if not (isinstance(margin, int | float) and math.isfinite(margin) and margin > 0):
        raise ValueError(
            f"tost_paired: margin must be a positive number, got {margin!r}; state before the run the "
            "largest |difference| that counts as no difference, in the quantity's units"
        )
    if not 0 < alpha < 0.5:
        raise ValueError(f"tost_paired: alpha must lie in (0, 0.5), got {alpha!r}")
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"tost_paired needs at least two paired differences, got shape {d.shape}")
    out = {**mean_std(d), "margin": float(margin), "alpha": float(alpha), "confidence": 1 - 2 * alpha}
    if np.ptp(d) == 0:  # no spread, no t statistic: the constant difference decides alone
        inside = abs(float(d[0])) < margin
        out.update(p_lower=float(not inside), p_upper=float(not inside), low=float(d[0]), high=float(d[0]))
    else:
        lower = sps.ttest_1samp(d, -margin, alternative="greater")
        upper = sps.ttest_1samp(d, margin, alternative="less")
        ci = sps.ttest_1samp(d, 0.0).confidence_interval(1 - 2 * alpha)
        out.update(
            p_lower=float(lower.pvalue), p_upper=float(upper.pvalue), low=float(ci.low), high=float(ci.high)
        )
    out["p_tost"] = max(out["p_lower"], out["p_upper"])
    out["equivalent"] = bool(out["p_tost"] < alpha)
    out["reads"] = ("" if out["equivalent"] else "not shown ") + f"equivalent within ±{margin:g}"
    return out


def effect_size_dz(diffs: Sequence[float]) -> float:
    """Cohen's dz of paired differences: mean / sample std (ddof 1), one difference per pre-training seed.
    nan when the differences have no spread."""
    d = require_finite(diffs, "effect_size_dz differences")
    if d.size < 2:
        raise ValueError(f"effect_size_dz needs at least two paired differences, got {d.size}")
    sd = float(d.std(ddof=1))
    return float(d.mean()) / sd if sd > 0 else math.nan


def power_paired_t(dz: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at standardised effect `dz` with `n` pairs, level `alpha`.

    Unit: the pre-training seed (n pairs, n - 1 degrees of freedom). Assumed: normal differences whose
    true mean / sd equals `dz`. At an *observed* dz this is the power the design would have if the
    effect were exactly what one sample showed — a planning number, not evidence. Under H1 the t
    statistic follows a noncentral t with n - 1 degrees of freedom and noncentrality dz * sqrt(n)
    (`scipy.stats.nct`); power = P(|T| > t_{1 - alpha/2, n - 1}), both tails counted."""
    if n < 2:
        raise ValueError(f"power_paired_t needs n >= 2 pairs, got {n}")
    if not math.isfinite(dz):
        raise ValueError(f"power_paired_t: dz must be finite, got {dz!r}")
    df, nc = n - 1, dz * math.sqrt(n)
    q = sps.t.ppf(1 - alpha / 2, df)
    # P(T < -q) written as P(T' > q) with T' = -T ~ nct(df, -nc): scipy's nct.cdf is nan that far into
    # its lower tail (df 5, nc 10), its sf is not
    return float(sps.nct.sf(q, df, nc) + sps.nct.sf(q, df, -nc))


def n_for_power(dz: float, power: float = 0.8, alpha: float = ALPHA, n_max: int = 100_000) -> int | None:
    """The smallest number of pre-training seeds n >= 2 whose two-sided paired t-test at level `alpha` has
    at least `power` at effect `dz` (see power_paired_t for what is assumed); None when dz is 0 or more
    than `n_max` seeds would be needed. Power grows with n, so the search doubles then bisects."""
    if not 0 < power < 1:
        raise ValueError(f"n_for_power: power must lie in (0, 1), got {power!r}")
    if dz == 0 or not math.isfinite(dz):
        return None
    high = 2
    while power_paired_t(dz, high, alpha) < power:
        if high >= n_max:
            return None
        high = min(2 * high, n_max)
    low = high // 2  # the previous high (power below target), or 1
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if power_paired_t(dz, mid, alpha) >= power else (mid, high)
    return high


def power_columns(mean: float, std: float, n: int, family_size: int = 1, alpha: float = ALPHA) -> dict:
    """The power columns of one paired comparison row (mean, std and n of its per-pre-training-seed
    differences, as `paired_test` and `paired_by_seed` give them): the observed dz, the power at it at
    `alpha` and at Holm's strictest level alpha / family_size, and the seeds 80 % power would need at
    each (see power_paired_t for what is assumed). nan / None where dz is 0 or undefined."""
    dz = mean / std if std > 0 else math.nan
    if not math.isfinite(dz) or dz == 0 or n < 2:
        return {"dz": dz, "power": math.nan, "power_holm": math.nan, "n_for_80": None, "n_for_80_holm": None}
    return {
        "dz": dz,
        "power": power_paired_t(dz, n, alpha),
        "power_holm": power_paired_t(dz, n, alpha / family_size),
        "n_for_80": n_for_power(dz, POWER_TARGET, alpha),
        "n_for_80_holm": n_for_power(dz, POWER_TARGET, alpha / family_size),
    }


# --------------------------------------------------------------------------------- secondary views


def signflip_floor(n: int) -> float:
    """The smallest two-sided p the sign-flip test of `paired_test` can give with n pairs: 2 / 2^n when
    every sign pattern is enumerated (all differences one sign), 2 / (RESAMPLES + 1) when sampled."""
    return 2 / 2**n if 2**n <= EXACT_SIGN_FLIPS else 2 / (RESAMPLES + 1)


def signflip_holm(p_signflip: Sequence[float], n: int | Sequence[int], alpha: float = ALPHA) -> list[dict]:
    """The family's exact sign-flip p-values Holm-adjusted like its t p-values (same order as given).

    Unit: the pre-training seed; `n` is the number of pairs behind each p (one int for all). Assumed
    only that the differences are symmetric about 0 under H0 (no normality). Each row also carries the
    floor 2 / 2^n and the best Holm-adjusted p the comparison could ever reach (family size x floor):
    when that is not below `alpha` (e.g. 2 x 2/64 = 0.0625 for two comparisons over 6 seeds) the
    sign-flip view can never resolve it, whatever the data, and `can_resolve` says so.

    Returns [{p_signflip, p_signflip_holm, floor, best_holm, can_resolve}].
    """
    p = require_finite(p_signflip, "signflip_holm p-values")
    sizes = [int(n)] * p.size if isinstance(n, int | np.integer) else [int(k) for k in n]
    if len(sizes) != p.size:
        raise ValueError(f"signflip_holm: {p.size} p-values but {len(sizes)} pair counts n")
    rows = []
    for value, adjusted, k in zip(p, holm(p), sizes):
        floor = signflip_floor(k)
        best = min(1.0, p.size * floor)
        rows.append(
            {
                "p_signflip": float(value),
                "p_signflip_holm": adjusted,
                "floor": floor,
                "best_holm": best,
                "can_resolve": best < alpha,
            }
        )
    return rows


def bootstrap_caveat(n: int) -> str:
    """The label a paired bootstrap interval over n pre-training seeds carries: "" from BCA_MIN_N seeds on,
    below that a note that the percentile interval covers less than its nominal level (it resamples only
    n values; at n = 6 a simulation in tests/test_stats.py finds well under 95 %) and the t interval is
    the one to read."""
    if n >= BCA_MIN_N:
        return ""
    return (
        f"percentile bootstrap over n = {n} pre-training seeds covers less than its nominal "
        f"{CONFIDENCE:.0%} below n = {BCA_MIN_N}: read the t interval"
    )


def seed_means(
    records: Sequence[Mapping], group: Sequence[str], value: str = "value"
) -> dict[tuple, dict[Hashable, list[float]]]:
    """Per combination of the `group` fields (first-seen order): pre-training seed -> the values of its
    fine-tuning seeds (one value when there are none). The grouping every seed-level statistic starts
    from: the fine-tuning seeds of one pre-training seed share its draw."""
    cells: dict[tuple, dict[Hashable, list[float]]] = {}
    for r in records:
        key = tuple(r[g] for g in group)
        cells.setdefault(key, {}).setdefault(r["pretrain_seed"], []).append(float(r[value]))
    return cells


def summarize_by_seed(
    records: Sequence[Mapping], group: Sequence[str], value: str = "value", confidence: float = CONFIDENCE
) -> list[dict]:
    """Per-mode (per `group` combination) intervals with the pre-training seed as the unit.

    The fine-tuning seeds of each pre-training seed are averaged first; mean, std and the Student-t
    interval then run over the n pre-training seed means (n - 1 degrees of freedom). Assumed: the seed
    means are independent normal draws. A pre-training seed with any non-finite value is a failed run:
    left out and counted in `failed_seeds`. `finetune_seeds`: the fewest fine-tuning seeds behind a mean.
    Unlike `summarize`, which treats every fine-tuning run as a replicate, this interval is honest.
    """
    rows = []
    for key, per_seed in seed_means(records, group, value).items():
        kept = {s: v for s, v in per_seed.items() if all(map(math.isfinite, v))}
        means = [float(np.mean(v)) for v in kept.values()]
        row = {**dict(zip(group, key)), "mean": math.nan, "std": math.nan, "n": len(means)}
        if means:
            row.update(mean_std(means))
        row["t_low"], row["t_high"] = (
            t_interval(means, confidence) if len(means) > 1 else (math.nan, math.nan)
        )
        row["finetune_seeds"] = min((len(v) for v in kept.values()), default=0)
        row["failed_seeds"] = len(per_seed) - len(kept)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- tables


def summarize(records: Sequence[Mapping], group: Sequence[str], value: str = "value") -> list[dict]:
    """Per combination of the `group` fields (first-seen order): mean ± std and the t interval over the
    finite values, with n (finite values) and failed (non-finite values, counted, not averaged)."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault(tuple(r[g] for g in group), []).append(float(r[value]))
    rows = []
    for key, vals in groups.items():
        kept = [v for v in vals if math.isfinite(v)]
        row = {**dict(zip(group, key)), "mean": math.nan, "std": math.nan, "n": 0}
        if kept:
            row.update(mean_std(kept))
        row["t_low"], row["t_high"] = t_interval(kept) if len(kept) > 1 else (math.nan, math.nan)
        row["failed"] = len(vals) - len(kept)
        rows.append(row)
    return rows


def paired_by_seed(
    records: Sequence[Mapping],
    quantity: Sequence[str],
    comparisons: Sequence[tuple[str, str]],
    seed: int = 0,
) -> list[dict]:
    """Paired differences between modes for every quantity, the pre-training seed as the unit.

    records: {"mode", <quantity fields>, "pretrain_seed", optionally "finetune_seed", "value"}.
    Within each pre-training seed the values are averaged over fine-tuning seeds; a pre-training seed
    with a non-finite value in either mode, or without both modes, is left out and counted in
    `failed_seeds` / `unpaired_seeds`. Every row is "exploratory" (uncorrected): the claims a table
    tests replace their rows' statistics with their family's (lab.analysis.claims.overlay_claims).
    One row per quantity and comparison; with fewer than two usable seeds its difference is NaN and it
    reads "too few seeds".
    """
    cells: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = tuple(r.get(q, "") for q in quantity)
        per_seed = cells.setdefault(key, {}).setdefault(r["mode"], {}).setdefault(r["pretrain_seed"], {})
        per_seed[r.get("finetune_seed", "")] = float(r["value"])
    rows = []
    for key, modes in cells.items():
        for first, second in comparisons:
            if first not in modes or second not in modes:
                continue
            name = f"{first} - {second}"
            a, b = modes[first], modes[second]
            common = sorted(set(a) & set(b))
            bad = [p for p in common if not all(map(math.isfinite, [*a[p].values(), *b[p].values()]))]
            usable = [p for p in common if p not in bad and set(a[p]) == set(b[p])]
            row = {
                **dict(zip(quantity, key)),
                "comparison": name,
                "family": "exploratory",
                "n": len(usable),
                "failed_seeds": len(bad),
                "unpaired_seeds": len(set(a) ^ set(b)) + len(common) - len(bad) - len(usable),
            }
            if len(usable) < 2:
                rows.append({**row, "difference": math.nan, "resolved": False, "reads": "too few seeds"})
                continue
            test = paired_test(
                [np.mean(list(a[p].values())) for p in usable],
                [np.mean(list(b[p].values())) for p in usable],
                seed=seed,
            )
            row.update(
                difference=test["mean"],
                std=test["std"],
                t_low=test["t_low"],
                t_high=test["t_high"],
                p_t=test["p_t"],
                boot_low=test["boot_low"],
                boot_high=test["boot_high"],
                boot_method=test["boot_method"],
                p_signflip=test["p_signflip"],
                resolvable=test["resolvable"],
            )
            inner = {len(a[p]) for p in usable}
            if inner != {1}:
                row["finetune_seeds"] = min(inner)
                diffs = {p: [a[p][f] - b[p][f] for f in sorted(a[p], key=str)] for p in usable}
                row["boot2_low"], row["boot2_high"] = two_level_bootstrap(diffs, seed)
            rows.append(row)
    return _resolve_exploratory(rows)


def _resolve_exploratory(rows: list[dict]) -> list[dict]:
    """`resolved` (the row's own p below ALPHA, as "yes" / "no"), the power columns at ALPHA
    (`power_columns`), the bootstrap caveat (`boot_note`) and the plain-words `reads` of every tested row."""
    for r in rows:
        if "p_t" in r:
            r["p_holm"] = math.nan
            r["resolved"] = bool(r["p_t"] < ALPHA)
            r.update(power_columns(r["difference"], r["std"], r["n"], 1))
            r["boot_note"] = bootstrap_caveat(r["n"])
            first, second = r["comparison"].split(" - ")
            r["reads"] = verdict(r, first, second)
        r["resolved"] = "yes" if r["resolved"] else "no"
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
    # plotting packages imported here: a bare GPU box has none, and the CSVs are written without them
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.subplots()
    frame = pd.DataFrame([{x: r[x], y: r[y], hue: r[hue]} for r in rows if finite(r.get(y))])
    sns.lineplot(data=frame, x=x, y=y, hue=hue, errorbar="sd", ax=ax)
    ax.set(title=title, ylabel=ylabel or y)
    return save_figure(fig, out_stem)


def bars_with_spread(
    rows: Sequence[Mapping], x: str, y: str, hue: str, out_stem: Path, title: str = ""
) -> list[Path] | None:
    """Bars of the mean of `y` per `x` and `hue` with ± one std over the seeds (seaborn); PNG + SVG.
    None when matplotlib / seaborn are not installed."""
    if not plotting_available() or not rows:
        return None
    # plotting packages imported here: a bare GPU box has none, and the CSVs are written without them
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.6 * len({r[x] for r in rows}) + 2), 3.6))
    ax = fig.subplots()
    frame = pd.DataFrame([{x: r[x], y: r[y], hue: r[hue]} for r in rows if finite(r.get(y))])
    sns.barplot(data=frame, x=x, y=y, hue=hue, errorbar="sd", ax=ax, capsize=0.1)
    ax.set(title=title)
    return save_figure(fig, out_stem)


def differences_plot(
    rows: Sequence[Mapping], label: Sequence[str], out_stem: Path, title: str = "", ncols: int = 4
) -> list[Path] | None:
    """Small multiples: one panel per quantity (its own x scale), one line per comparison with its
    t interval (the unit: pre-training seeds). Primary comparisons in colour with a star, resolved
    ones filled; exploratory comparisons grey. 0 marked. With no interval to draw (fewer than two
    pre-training seeds) the figure says so. None when matplotlib is not installed or rows is empty."""
    if not plotting_available() or not rows:
        return None
    # plotting packages imported here: a bare GPU box has none, and the CSVs are written without them
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    drawable = [r for r in rows if finite(r.get("difference")) and finite(r.get("t_low"))]
    if not drawable:
        fig = Figure(figsize=(6.4, 1.6))
        fig.text(
            0.5,
            0.5,
            f"{title}\nno interval to draw: a paired t interval needs at least two pre-training seeds\n"
            f"(the largest n here: {max(int(r.get('n') or 0) for r in rows)})",
            ha="center",
            va="center",
            fontsize=9,
        )
        return save_figure(fig, out_stem)
    rows = drawable

    panels: dict[str, list[Mapping]] = {}
    for r in rows:
        panels.setdefault(" · ".join(str(r[k]) for k in label), []).append(r)
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(
        figsize=(3.2 * ncols, 0.45 * max(len(p) for p in panels.values()) * nrows + 1.1 * nrows + 0.6)
    )
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, (name, members) in zip(axes, panels.items()):
        ys = np.arange(len(members))[::-1]
        for yy, r in zip(ys, members):
            is_primary = r.get("family", "exploratory") != "exploratory"
            color = "C3" if is_primary else "0.55"
            resolved = r.get("resolved") in ("yes", True)
            ax.errorbar(
                r["difference"],
                yy,
                xerr=[[r["difference"] - r["t_low"]], [r["t_high"] - r["difference"]]],
                fmt="o",
                color=color,
                mfc=color if resolved else "white",
                capsize=3,
            )
        ax.axvline(0, color="k", lw=0.6)
        labels = [
            ("★ " if r.get("family", "exploratory") != "exploratory" else "") + r["comparison"]
            for r in members
        ]
        ax.set_yticks(ys, labels, fontsize=7)
        ax.set_ylim(-0.7, len(members) - 0.3)
        ax.set_title(name, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(4))
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        title + "\n★ red: primary (Holm within its claim); grey: exploratory; "
        "filled: resolved; bars: 95 % t interval over pre-training seeds",
        fontsize=8,
    )
    return save_figure(fig, out_stem)


def save_figure(fig, stem: Path) -> list[Path]:
    """`fig` as <stem>.png and <stem>.svg, every figure's one way to the disk. A rerun writes identical
    bytes: the SVG has no date in its metadata, and its element ids are hashed with a fixed salt (the
    file's name) instead of a random one."""
    from matplotlib import rc_context  # matplotlib is optional: every caller checks it is there

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=120)
    with rc_context({"svg.hashsalt": stem.name}):
        fig.savefig(paths[1], metadata={"Date": None})
    return paths
