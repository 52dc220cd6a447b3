"""Paired differences over pre-training seeds, scipy's tests, Holm and failures, on hand-made numbers."""

import math
import sys

import numpy as np
import pytest

from lab.analysis import stats

# nine (pre-training seed, fine-tuning seed) pairs; the noise sums to 0 and its sample std is
# sqrt((4 * 0.04 + 4 * 0.01) / 8) = sqrt(0.025)
PAIRS = [(p, f) for p in range(3) for f in range(3)]
NOISE = [-0.2, -0.1, 0.0, 0.1, 0.2, -0.2, -0.1, 0.1, 0.2]
# a baseline that varies across pairs far more than the effect (seed-to-seed variation both modes share)
BASE = [10.0, 14.0, 7.0, 22.0, 3.0, 18.0, 9.0, 30.0, 12.0]


def records_from(values: dict, mode: str, **labels) -> list[dict]:
    return [
        {"mode": mode, "pretrain_seed": p, "finetune_seed": f, "value": v, **labels}
        for (p, f), v in values.items()
    ]


def test_paired_test_agrees_with_scipy_and_a_hand_computed_t_interval():
    from scipy import stats as sps

    a = [1.1, 1.5, 3.0, 2.2, 1.9]
    b = [1.0, 1.0, 1.0, 1.0, 1.0]
    d = stats.paired_test(a, b)
    diffs = np.subtract(a, b)
    half = sps.t.ppf(0.975, 4) * diffs.std(ddof=1) / math.sqrt(5)
    assert d["mean"] == pytest.approx(diffs.mean()) and d["n"] == 5
    assert (d["t_low"], d["t_high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert d["p_t"] == pytest.approx(sps.ttest_rel(a, b).pvalue)
    # exact sign flips: all five differences positive, so only the all-positive and all-negative
    # patterns are as extreme: p = 2 / 2^5
    assert d["p_signflip"] == pytest.approx(2 / 32)
    boot = sps.bootstrap((np.array(a), np.array(b)), lambda u, v, axis=-1: np.mean(u - v, axis=axis), paired=True,
                         method="percentile", random_state=np.random.default_rng(0))  # fmt: skip
    assert (d["boot_low"], d["boot_high"]) == pytest.approx(tuple(boot.confidence_interval))
    assert d["boot_method"] == "percentile" and stats.paired_test(a * 2, b * 2)["boot_method"] == "BCa"
    # the smallest resolvable difference is the t half width at ALPHA / family size
    assert d["resolvable"] == pytest.approx(half)
    q3 = sps.t.ppf(1 - 0.05 / 6, 4) * diffs.std(ddof=1) / math.sqrt(5)
    assert stats.paired_test(a, b, family_size=3)["resolvable"] == pytest.approx(q3)


def test_clustered_data_resolves_over_nine_pairs_but_not_over_three_pretraining_seeds():
    # the fine-tuning seeds of one pre-training seed share its draw: their differences cluster around
    # the seed's own offset (+0.8, +0.1, +0.6), with small spread inside each cluster
    offsets = {0: 0.8, 1: 0.1, 2: 0.6}
    within = [-0.02, 0.0, 0.02]
    b = {(p, f): 5.0 + p for p in range(3) for f in range(3)}
    a = {(p, f): b[p, f] + offsets[p] + within[f] for p in range(3) for f in range(3)}
    from scipy import stats as sps

    nine = sps.ttest_1samp([a[k] - b[k] for k in a], 0.0)
    assert nine.pvalue < 0.05  # pseudo-replication: the 9 pairs treated as independent "resolve" it
    rows = stats.paired_by_seed(records_from(a, "gdes", task="t") + records_from(b, "es", task="t"),
                                ("task",), (("gdes", "es"),))  # fmt: skip
    (row,) = rows
    assert row["n"] == 3 and row["finetune_seeds"] == 3
    assert row["difference"] == pytest.approx(np.mean(list(offsets.values())))
    # the per-pre-training-seed analysis: t with 2 degrees of freedom on the 3 seed means
    means = [offsets[p] for p in range(3)]
    ci = sps.ttest_1samp(means, 0.0).confidence_interval()
    assert (row["t_low"], row["t_high"]) == pytest.approx((ci.low, ci.high))
    assert row["t_low"] < 0 < row["t_high"] and row["resolved"] == "no"
    assert row["boot2_low"] < row["boot2_high"]


def test_holm_on_a_known_family():
    # p sorted 0.01, 0.02, 0.04, 0.30 -> 4 * 0.01, 3 * 0.02, max(0.06, 2 * 0.04), max(0.08, 0.30)
    assert stats.holm([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([0.01, 0.011]) == pytest.approx([0.02, 0.02])  # monotone: never below an earlier step


def test_paired_by_seed_rows_are_exploratory_and_uncorrected():
    """A differences table is exploratory throughout: each row's own p decides `resolved`; the claims it
    tests take their family's Holm p from lab.analysis.claims (tests/test_claims.py)."""
    rng = np.random.default_rng(1)
    records = []
    for q, shift in (("x", 0.5), ("y", 0.5), ("z", 0.5)):
        base = rng.normal(size=6)
        noise = np.array([0.4, -0.3, 0.5, -0.2, 0.1, -0.5])
        for p in range(6):
            records += [{"mode": "es", "pretrain_seed": p, "quantity": q, "value": base[p]},
                        {"mode": "gdes", "pretrain_seed": p, "quantity": q, "value": base[p] + shift + noise[p]}]  # fmt: skip
    rows = {r["quantity"]: r for r in stats.paired_by_seed(records, ("quantity",), (("gdes", "es"),))}
    assert {r["family"] for r in rows.values()} == {"exploratory"}
    assert all(math.isnan(r["p_holm"]) for r in rows.values())
    assert 0.025 < rows["z"]["p_t"] < 0.05 and rows["z"]["resolved"] == "yes"  # uncorrected, so resolved
    assert "exploratory" in rows["z"]["reads"]
    assert rows["z"]["power"] == pytest.approx(
        stats.power_columns(rows["z"]["difference"], rows["z"]["std"], 6, 1)["power"]
    )


def test_a_nan_seed_is_refused_by_the_statistics_and_counted_by_the_comparison():
    with pytest.raises(stats.NonFiniteError, match="position"):
        stats.paired_test([1.0, float("nan"), 2.0], [0.0, 0.0, 0.0])
    with pytest.raises(stats.NonFiniteError):
        stats.mean_std([1.0, float("inf")])
    with pytest.raises(stats.NonFiniteError):
        stats.holm([0.1, float("nan")])
    b = {(p, f): 1.0 for p in range(4) for f in range(2)}
    a = {(p, f): 2.0 + 0.1 * p for p in range(4) for f in range(2)}
    a[1, 1] = float("nan")  # one collapsed fine-tuning run of pre-training seed 1
    (row,) = stats.paired_by_seed(
        records_from(a, "gdes") + records_from(b, "es"), ("task",), (("gdes", "es"),)
    )
    assert row["n"] == 3 and row["failed_seeds"] == 1
    assert row["difference"] == pytest.approx(np.mean([1.0, 1.2, 1.3]))
    table = {
        r["mode"]: r for r in stats.summarize(records_from(a, "gdes") + records_from(b, "es"), ("mode",))
    }
    assert table["gdes"]["failed"] == 1 and table["gdes"]["n"] == 7 and table["es"]["failed"] == 0


def test_bootstrap_is_seeded_and_two_level_resamples_both_levels():
    a, b = [0.3, -0.1, 0.8, 0.2, 0.5, 0.0, 0.4], [0.0] * 7
    assert stats.paired_test(a, b, seed=3)["boot_low"] == stats.paired_test(a, b, seed=3)["boot_low"]
    assert stats.paired_test(a, b, seed=3)["boot_low"] != stats.paired_test(a, b, seed=4)["boot_low"]
    # identical seed means: the outer level alone would give a zero-width interval; the inner one does not
    diffs = {0: [0.0, 2.0], 1: [0.0, 2.0], 2: [0.0, 2.0]}
    low, high = stats.two_level_bootstrap(diffs)
    assert low < 1.0 < high and high - low > 0.5
    with pytest.raises(ValueError, match="at least two paired seeds"):
        stats.paired_test([1.0], [0.0])


def test_mean_std_over_seeds():
    assert stats.mean_std([1.0, 2.0, 6.0]) == {"mean": 3.0, "std": pytest.approx(math.sqrt(7)), "n": 3}
    assert stats.mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}


def test_the_direction_is_named_per_task():
    records = []
    for (p, f), base, e in zip(PAIRS, BASE, NOISE):
        for mode, shift in (("es", 0.0), ("nes", 0.0), ("gdes", 2.0)):
            value = base + shift + (e if mode != "es" else 0.0)
            records.append(
                {"mode": mode, "task": "t", "pretrain_seed": p, "finetune_seed": f, "value": value}
            )
    rows = stats.paired_by_seed(records, ("task",), (("gdes", "es"), ("gdes", "nes"), ("nes", "es")))
    by = {r["comparison"]: r for r in rows}
    assert by["gdes - es"]["difference"] == pytest.approx(2.0)
    assert by["gdes - es"]["resolved"] == "yes" and by["gdes - es"]["reads"].startswith("gdes higher")
    assert by["gdes - es"]["n"] == 3 and by["gdes - es"]["finetune_seeds"] == 3
    assert by["nes - es"]["resolved"] == "no"  # noise only


def test_figures_are_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it now raises ImportError
    rows = [{"step": s, "loss": 1.0 / (s + 1), "mode": m} for s in range(3) for m in ("es", "gdes")]
    assert stats.curves_with_bands(rows, "step", "loss", "mode", tmp_path / "c") is None
    assert "figures skipped" in stats.PLOTTING_UNAVAILABLE
    assert not list(tmp_path.iterdir())


def test_curves_with_bands_writes_png_and_svg(tmp_path):
    pytest.importorskip("seaborn")
    rows = [{"step": s, "loss": 1.0 / (s + 1) + 0.1 * k, "mode": m}
            for s in range(4) for m in ("es", "gdes") for k in range(3)]  # fmt: skip
    paths = stats.curves_with_bands(rows, "step", "loss", "mode", tmp_path / "curve")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 0 for p in paths)


def test_differences_figure_with_one_seed_says_why_it_has_no_intervals(tmp_path):
    """One pre-training seed gives no t interval: the figure is still written (a notebook shows it),
    and says why instead of drawing nothing; two seeds draw the panels."""
    one = records_from({(0, 1): 1.0}, "es", quantity="q") + records_from({(0, 1): 2.0}, "gdes", quantity="q")
    rows = stats.paired_by_seed(one, ("quantity",), [("gdes", "es")])
    assert rows[0]["n"] == 1 and rows[0]["reads"] == "too few seeds"
    paths = stats.differences_plot(rows, ("quantity",), tmp_path / "one")
    assert paths and all(p.stat().st_size > 0 for p in paths)
    assert "two pre-training seeds" in (tmp_path / "one.svg").read_text()
    two = records_from({(0, 1): 1.0, (1, 1): 1.5}, "es", quantity="q")
    two += records_from({(0, 1): 2.0, (1, 1): 2.2}, "gdes", quantity="q")
    paths = stats.differences_plot(
        stats.paired_by_seed(two, ("quantity",), [("gdes", "es")]), ("quantity",), tmp_path / "two"
    )
    assert paths and "two pre-training seeds" not in (tmp_path / "two.svg").read_text()
    assert stats.differences_plot([], ("quantity",), tmp_path / "none") is None


# --------------------------------------------------------------------------- equivalence, power, views

# six differences with mean 0 and sample std sqrt((0.01 + 0.01 + 0.04 + 0.04) / 5) = sqrt(0.02)
CENTRED = np.array([0.1, -0.1, 0.2, -0.2, 0.0, 0.0])


def test_tost_matches_two_one_sided_t_tests_computed_by_hand():
    from scipy import stats as sps

    d = CENTRED + 0.05  # mean 0.05
    se = math.sqrt(0.02) / math.sqrt(6)
    result = stats.tost_paired(d, margin=0.3, alpha=0.05)
    assert result["mean"] == pytest.approx(0.05) and result["std"] == pytest.approx(math.sqrt(0.02))
    # by hand: t = (mean + margin) / se against the upper tail, (mean - margin) / se against the lower one
    assert result["p_lower"] == pytest.approx(sps.t.sf((0.05 + 0.3) / se, 5))
    assert result["p_upper"] == pytest.approx(sps.t.cdf((0.05 - 0.3) / se, 5))
    # and the same through scipy's one-sided one-sample tests, computed here independently
    assert result["p_lower"] == pytest.approx(sps.ttest_1samp(d, -0.3, alternative="greater").pvalue)
    assert result["p_upper"] == pytest.approx(sps.ttest_1samp(d, 0.3, alternative="less").pvalue)
    assert result["p_tost"] == max(result["p_lower"], result["p_upper"])
    # the 90 % interval (1 - 2 alpha) by hand; inside ±0.3, so equivalent
    half = sps.t.ppf(0.95, 5) * se
    assert (result["low"], result["high"]) == pytest.approx((0.05 - half, 0.05 + half))
    assert result["confidence"] == pytest.approx(0.90) and result["margin"] == 0.3
    assert result["equivalent"] and result["reads"] == "equivalent within ±0.3"
    assert -0.3 < result["low"] and result["high"] < 0.3


def test_tost_says_not_equivalent_when_the_interval_reaches_past_the_margin():
    d = CENTRED + 0.05
    result = stats.tost_paired(d, margin=0.1, alpha=0.05)
    assert result["p_upper"] > 0.05 and not result["equivalent"]
    assert result["high"] > 0.1  # the same decision read off the 90 % interval
    assert result["reads"] == "not shown equivalent within ±0.1"
    # a clear difference (mean 1) is never equivalent within a small margin, whatever its spread
    assert not stats.tost_paired(CENTRED + 1.0, margin=0.5)["equivalent"]


def test_tost_refuses_a_margin_that_is_not_positive():
    for margin in (0, 0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="margin must be a positive number"):
            stats.tost_paired(CENTRED, margin=margin)
    with pytest.raises(ValueError, match="at least two"):
        stats.tost_paired([0.1], margin=0.5)
    with pytest.raises(stats.NonFiniteError):
        stats.tost_paired([0.1, float("nan"), 0.0], margin=0.5)


def power_by_integration(dz: float, n: int, alpha: float) -> float:
    """An independent route to the paired t power: condition on the sample variance. With Z ~ N(dz sqrt(n), 1)
    and V ~ chi2(n - 1), T = Z / sqrt(V / (n - 1)), so P(|T| > q) = E_V[Phi(-q s + delta) + Phi(-q s - delta)]
    with s = sqrt(V / (n - 1)): a one-dimensional integral over the chi-square density."""
    from scipy import integrate
    from scipy import stats as sps

    df, delta = n - 1, dz * math.sqrt(n)
    q = sps.t.ppf(1 - alpha / 2, df)

    def integrand(v):
        s = math.sqrt(v / df)
        return (sps.norm.cdf(-q * s + delta) + sps.norm.cdf(-q * s - delta)) * sps.chi2.pdf(v, df)

    return integrate.quad(integrand, 0, np.inf, limit=200)[0]


def test_power_of_the_paired_t_test_agrees_with_integration_and_simulation():
    from scipy import stats as sps

    for dz, n, alpha in (
        (1.0, 6, 0.05),
        (1.0, 10, 0.05),
        (0.5, 20, 0.025),
        (-1.0, 13, 0.025),
        (3.0, 4, 0.05),
    ):
        assert stats.power_paired_t(dz, n, alpha) == pytest.approx(
            power_by_integration(dz, n, alpha), abs=1e-6
        )
    # Monte Carlo: 20 000 samples of six N(1, 1) differences; standard error of the rate about 0.0035
    draws = np.random.default_rng(0).normal(1.0, 1.0, size=(20_000, 6))
    simulated = np.mean(sps.ttest_1samp(draws, 0.0, axis=1).pvalue < 0.05)
    assert stats.power_paired_t(1.0, 6) == pytest.approx(simulated, abs=0.015)
    assert 0.50 < stats.power_paired_t(1.0, 6) < 0.52
    assert stats.power_paired_t(0.0, 6) == pytest.approx(0.05)  # no effect: the test's own level
    assert stats.power_paired_t(20.0, 6) == pytest.approx(1.0)  # far tail: finite, not nan


def test_seeds_needed_for_eighty_percent_power():
    for dz, alpha in ((1.0, 0.05), (1.0, 0.025), (0.4, 0.05), (2.5, 0.05)):
        n = stats.n_for_power(dz, 0.8, alpha)
        # the smallest such n, checked against the integral, not against the function's own search
        assert power_by_integration(dz, n, alpha) >= 0.8
        assert n == 2 or power_by_integration(dz, n - 1, alpha) < 0.8
    assert stats.n_for_power(1.0) == 10 and stats.n_for_power(1.0, alpha=0.025) == 13
    assert stats.n_for_power(-1.0) == 10  # two-sided: the sign does not matter
    assert stats.n_for_power(0.0) is None and stats.n_for_power(0.01, n_max=1000) is None
    assert stats.effect_size_dz(CENTRED + 0.05) == pytest.approx(0.05 / math.sqrt(0.02))


def test_signflip_p_holm_adjusted_with_the_floor_it_can_never_pass():
    a = [1.1, 1.5, 3.0, 2.2, 1.9, 1.4]
    b = [1.0] * 6
    # all six differences positive: the sign-flip p is at its floor 2 / 2^6
    assert stats.paired_test(a, b)["p_signflip"] == pytest.approx(stats.signflip_floor(6)) == 2 / 64
    rows = stats.signflip_holm([2 / 64, 2 / 64, 0.5], 6)
    # Holm by hand: sorted 2/64, 2/64, 0.5 -> 3 * 2/64, max(3 * 2/64, 2 * 2/64), max(., 0.5)
    assert [r["p_signflip_holm"] for r in rows] == pytest.approx([6 / 64, 6 / 64, 0.5])
    assert all(r["best_holm"] == pytest.approx(6 / 64) and not r["can_resolve"] for r in rows)
    # ten seeds: the floor 2 / 1024 times three is below 0.05, so the view can resolve
    assert all(r["can_resolve"] for r in stats.signflip_holm([0.002, 0.3, 0.04], 10))
    # above EXACT_SIGN_FLIPS patterns the signs are sampled: the floor is that of RESAMPLES draws
    assert stats.paired_test([1.0 + 0.1 * i for i in range(17)], [0.0] * 17)["p_signflip"] == pytest.approx(
        stats.signflip_floor(17)
    )
    with pytest.raises(ValueError, match="pair counts"):
        stats.signflip_holm([0.1, 0.2], [6])


def test_bootstrap_caveat_below_ten_seeds_is_what_a_simulation_shows():
    from scipy import stats as sps

    assert "read the t interval" in stats.bootstrap_caveat(6) and "n = 6" in stats.bootstrap_caveat(6)
    assert stats.bootstrap_caveat(stats.BCA_MIN_N) == ""
    # coverage of the 95 % percentile bootstrap and of the t interval over six N(0, 1) differences
    rng = np.random.default_rng(0)
    boot_hits = t_hits = 0
    trials = 300
    for _ in range(trials):
        d = rng.normal(size=6)
        ci = sps.bootstrap((d,), np.mean, n_resamples=1000, method="percentile", random_state=rng)
        boot_hits += ci.confidence_interval.low < 0 < ci.confidence_interval.high
        low, high = stats.t_interval(d)
        t_hits += low < 0 < high
    assert boot_hits / trials < 0.92 < t_hits / trials


def test_per_mode_intervals_take_the_pretraining_seed_as_the_unit():
    from scipy import stats as sps

    # three pre-training seeds, three fine-tuning seeds each; the seed means are 1, 2, 6
    within = [-0.1, 0.0, 0.1]
    values = {(p, f): m + within[f] for p, m in enumerate((1.0, 2.0, 6.0)) for f in range(3)}
    values[3, 0] = float("nan")  # a fourth pre-training seed whose fine-tuning failed
    (row,) = stats.summarize_by_seed(records_from(values, "gdes"), ("mode",))
    assert row["n"] == 3 and row["finetune_seeds"] == 3 and row["failed_seeds"] == 1
    assert row["mean"] == pytest.approx(3.0) and row["std"] == pytest.approx(math.sqrt(7))
    ci = sps.ttest_1samp([1.0, 2.0, 6.0], 0.0).confidence_interval()
    assert (row["t_low"], row["t_high"]) == pytest.approx((ci.low, ci.high))
    # the fine-tuning runs taken as nine replicates give a narrower, dishonest interval
    (naive,) = stats.summarize(records_from(values, "gdes"), ("mode",))
    assert naive["n"] == 9 and naive["t_high"] - naive["t_low"] < row["t_high"] - row["t_low"]


def test_power_columns_of_a_comparison_row():
    row = stats.power_columns(mean=0.5, std=0.5, n=6, family_size=2)
    assert row["dz"] == pytest.approx(1.0)
    assert row["power"] == pytest.approx(power_by_integration(1.0, 6, stats.ALPHA), abs=1e-6)
    assert row["power_holm"] == pytest.approx(power_by_integration(1.0, 6, stats.ALPHA / 2), abs=1e-6)
    assert (row["n_for_80"], row["n_for_80_holm"]) == (
        stats.n_for_power(1.0),
        stats.n_for_power(1.0, alpha=stats.ALPHA / 2),
    )
    empty = stats.power_columns(mean=0.0, std=0.5, n=6)
    assert math.isnan(empty["power"]) and empty["n_for_80"] is None
