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


def test_primary_family_is_holm_corrected_and_the_rest_exploratory():
    # three quantities over 6 pre-training seeds with t p-values near 0.02 each
    rng = np.random.default_rng(1)
    records = []
    for q, shift in (("x", 0.5), ("y", 0.5), ("z", 0.5)):
        base = rng.normal(size=6)
        noise = np.array([0.4, -0.3, 0.5, -0.2, 0.1, -0.5])
        for p in range(6):
            records += [{"mode": "es", "pretrain_seed": p, "quantity": q, "value": base[p]},
                        {"mode": "gdes", "pretrain_seed": p, "quantity": q, "value": base[p] + shift + noise[p]}]  # fmt: skip
    primary = {"claim": [(("x",), "gdes - es"), (("y",), "gdes - es")]}
    rows = {
        r["quantity"]: r for r in stats.paired_by_seed(records, ("quantity",), (("gdes", "es"),), primary)
    }
    assert rows["x"]["family"] == rows["y"]["family"] == "claim" and rows["z"]["family"] == "exploratory"
    assert [rows[q]["p_holm"] for q in "xy"] == pytest.approx(
        stats.holm([rows["x"]["p_t"], rows["y"]["p_t"]])
    )
    assert rows["x"]["p_holm"] > rows["x"]["p_t"]
    assert 0.025 < rows["z"]["p_t"] < 0.05 and rows["z"]["resolved"] == "yes"  # uncorrected, so resolved
    assert rows["x"]["resolved"] == "no"  # the same data under Holm is not
    assert "exploratory" in rows["z"]["reads"] and "exploratory" not in rows["x"]["reads"]


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
