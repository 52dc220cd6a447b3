"""Paired differences and bootstrap intervals on hand-made numbers."""

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


def test_known_difference_gives_its_mean_spread_and_a_ci_around_it():
    b = dict(zip(PAIRS, BASE))
    a = {k: b[k] + 1.0 + e for k, e in zip(PAIRS, NOISE)}
    d = stats.paired_difference(a, b)
    assert d["mean"] == pytest.approx(1.0)
    assert d["std"] == pytest.approx(math.sqrt(0.025))
    assert d["n"] == 9
    # t interval by hand: t_{0.975, 8} = 2.306004, half width 2.306004 * sqrt(0.025) / 3
    half = 2.306004 * math.sqrt(0.025) / 3
    assert d["t_low"] == pytest.approx(1.0 - half, abs=1e-5)
    assert d["t_high"] == pytest.approx(1.0 + half, abs=1e-5)
    # the bootstrap interval sits around 1 with about the normal-theory width (SE ~0.05)
    assert 0.85 < d["ci_low"] < 0.95 < 1.05 < d["ci_high"] < 1.15
    assert d["resolved"]


def test_zero_difference_gives_a_ci_containing_zero():
    b = dict(zip(PAIRS, BASE))
    a = {k: b[k] + e for k, e in zip(PAIRS, NOISE)}
    d = stats.paired_difference(a, b)
    assert d["mean"] == pytest.approx(0.0, abs=1e-12)
    assert d["ci_low"] < 0 < d["ci_high"]
    assert d["t_low"] < 0 < d["t_high"]
    assert not d["resolved"]
    assert stats.verdict(d, "gdes", "es") == "not resolved (an interval includes 0)"


def test_pairing_matters_where_the_shared_variation_is_large():
    # the same +0.5 in every pair; the pairs themselves differ by tens
    b = dict(zip(PAIRS, BASE))
    a = {k: b[k] + 0.5 + 0.1 * e for k, e in zip(PAIRS, NOISE)}
    paired = stats.paired_difference(a, b)
    unpaired = stats.unpaired_difference(list(a.values()), list(b.values()))
    assert paired["mean"] == pytest.approx(0.5) and unpaired["mean"] == pytest.approx(0.5)
    assert paired["resolved"] and paired["ci_low"] > 0.4
    assert not unpaired["resolved"] and unpaired["ci_low"] < -3 and unpaired["ci_high"] > 3


def test_three_same_signed_pairs_are_not_enough():
    # the percentile bootstrap of three positive values never reaches 0, the t interval does:
    # mean 13/15, std 1.00167, half width t_{0.975, 2} = 4.302653 times 1.00167 / sqrt(3) = 2.488
    a = {0: 1.1, 1: 1.5, 2: 3.0}
    b = {0: 1.0, 1: 1.0, 2: 1.0}
    d = stats.paired_difference(a, b)
    assert d["ci_low"] > 0
    assert d["t_low"] == pytest.approx(13 / 15 - 2.48832, abs=1e-3)
    assert not d["resolved"]


def test_bootstrap_is_reproducible_and_seeded():
    values = [0.3, -0.1, 0.8, 0.2, 0.5, 0.0, 0.4]
    assert stats.bootstrap_ci(values, seed=3) == stats.bootstrap_ci(values, seed=3)
    assert stats.bootstrap_ci(values, seed=3) != stats.bootstrap_ci(values, seed=4)
    assert stats.bootstrap_ci([2.5]) == (2.5, 2.5)
    with pytest.raises(ValueError, match="non-empty"):
        stats.bootstrap_ci([])


def test_unpaired_pairs_and_nan_seeds_are_left_out():
    a = {(0, 1): 2.0, (0, 2): 3.0, (1, 1): float("nan"), (2, 1): 9.0}
    b = {(0, 1): 1.0, (0, 2): 1.0, (1, 1): 1.0}
    d = stats.paired_difference(a, b)
    assert d["n"] == 2 and d["mean"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="no common finite pairs"):
        stats.paired_difference({(0, 1): 1.0}, {(0, 2): 1.0})


def test_mean_std_over_seeds():
    assert stats.mean_std([1.0, 2.0, 6.0]) == {"mean": 3.0, "std": pytest.approx(math.sqrt(7)), "n": 3}
    assert stats.mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}
    assert stats.mean_std([float("nan"), 2.0])["n"] == 1


def test_compare_modes_names_the_direction_per_task():
    records = []
    for (p, f), base, e in zip(PAIRS, BASE, NOISE):
        for mode, shift in (("es", 0.0), ("nes", 0.0), ("gdes", 2.0)):
            value = base + shift + (e if mode != "es" else 0.0)
            records.append(
                {"mode": mode, "task": "t", "pretrain_seed": p, "finetune_seed": f, "value": value}
            )
    rows = stats.compare_modes(records, ("task",), (("gdes", "es"), ("gdes", "nes"), ("nes", "es")))
    by = {r["comparison"]: r for r in rows}
    assert by["gdes - es"]["difference"] == pytest.approx(2.0)
    assert by["gdes - es"]["resolved"] == "yes" and by["gdes - es"]["reads"] == "gdes higher"
    assert by["gdes - nes"]["difference"] == pytest.approx(2.0)
    assert by["nes - es"]["resolved"] == "no"  # noise only
    assert by["gdes - es"]["pairs"] == 9 and by["gdes - es"]["pretrain_seeds"] == 3
    table = stats.summarize(records, ("task", "mode"))
    es = next(r for r in table if r["mode"] == "es")
    assert es["mean"] == pytest.approx(np.mean(BASE)) and es["n"] == 9


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
