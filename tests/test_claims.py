"""The paper's claims fixed in code: the three-way (c) family on hand-made numbers, Holm within it, the
readings whatever direction the data take, equivalence claims, and claim (a)'s convergence quantities."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from lab.analysis import claims

# the paper's Table 6 (He, Gao, Chen, ICLR 2023), base models: MNLI-m accuracy and SQuAD v2.0 F1
TABLE_6 = {
    "mnli_m": {"es": 88.8, "nes": 88.3, "gdes": 89.3},
    "squad_f1": {"es": 86.3, "nes": 85.3, "gdes": 87.2},
}

# six pre-training seeds: a baseline shared by all modes (seed-to-seed variation far above the effects)
BASE = np.array([70.0, 72.0, 68.0, 75.0, 71.0, 69.0])
NOISE = np.array([0.1, -0.1, 0.2, -0.2, 0.05, -0.05])


def seed_values(es, nes, gdes) -> dict:
    """mode -> {pretrain_seed: value} from per-seed offsets added to the shared baseline."""
    return {m: dict(enumerate(BASE + np.asarray(v))) for m, v in (("es", es), ("nes", nes), ("gdes", gdes))}


def by_comparison(rows):
    return {r["comparison"]: r for r in rows}


def test_the_ordering_family_is_the_papers_table_6():
    assert [c.comparison for c in claims.ORDERING] == ["gdes - es", "gdes - nes", "es - nes"]
    assert len({c.family for c in claims.ORDERING}) == 1
    assert all(c.primary and c.kind == "difference" for c in claims.ORDERING)
    for scores in TABLE_6.values():  # each expected direction is the one the paper's numbers take
        for c in claims.ORDERING:
            first, second = c.modes
            assert np.sign(scores[first] - scores[second]) == claims.DIRECTIONS[c.direction_expected]


def test_all_three_resolve_in_the_papers_direction():
    rows = by_comparison(
        claims.evaluate_family(claims.ORDERING, seed_values(1 + NOISE, 0 * NOISE, 2 + NOISE[::-1]))
    )
    assert rows["gdes - es"]["difference"] == pytest.approx(1.0)
    assert rows["gdes - nes"]["difference"] == pytest.approx(2.0)
    assert rows["es - nes"]["difference"] == pytest.approx(1.0)
    assert all(r["resolved"] == "yes" and r["reads"] == "agrees with the paper" for r in rows.values())


def test_es_below_nes_resolves_against_the_paper_and_is_reported():
    rows = by_comparison(
        claims.evaluate_family(claims.ORDERING, seed_values(-1 + NOISE, 0 * NOISE, 1 + NOISE[::-1]))
    )
    assert rows["es - nes"]["difference"] == pytest.approx(-1.0)
    assert rows["es - nes"]["resolved"] == "yes" and rows["es - nes"]["reads"] == "against the paper"
    assert rows["gdes - es"]["reads"] == rows["gdes - nes"]["reads"] == "agrees with the paper"


def test_nothing_resolves_and_holm_is_computed_by_hand():
    # ES - NES and GDES - ES: small effects in noise; the raw p of GDES - ES is below 0.05 and Holm lifts it
    es = np.array([0.5, -0.3, 0.4, 0.1, -0.2, 0.3])
    gdes = es + np.array([0.3, 0.1, 0.5, -0.1, 0.2, 0.4])
    rows = claims.evaluate_family(claims.ORDERING, seed_values(es, 0 * es, gdes))
    diffs = {"gdes - es": gdes - es, "gdes - nes": gdes, "es - nes": es}
    p = np.array([sps.ttest_1samp(diffs[r["comparison"]], 0.0).pvalue for r in rows])
    assert [r["p"] for r in rows] == pytest.approx(p.tolist())
    # Holm by hand: the smallest p times 3, the next times 2 (never below the step before), the largest alone
    p1, p2, p3 = sorted(p)
    by_hand = {p1: 3 * p1, p2: max(3 * p1, 2 * p2), p3: max(3 * p1, 2 * p2, p3)}
    assert [r["p_holm"] for r in rows] == pytest.approx([min(1.0, by_hand[v]) for v in p])
    assert p.min() < 0.05 < 3 * p.min()  # resolved alone, not within the family
    assert all(r["resolved"] == "no" and r["reads"] == "not resolved" for r in rows)


def test_each_row_carries_power_the_signflip_view_and_the_bootstrap_caveat():
    rows = claims.evaluate_family(claims.ORDERING, seed_values(0.2 + NOISE, 0 * NOISE, 0.3 + NOISE[::-1]))
    for r in rows:
        d_power = claims.stats.power_paired_t(r["dz"], r["n"], claims.stats.ALPHA)
        assert r["power"] == pytest.approx(d_power) and r["power_holm"] < r["power"]
        assert r["n_for_80_holm"] >= r["n_for_80"]
        # six seeds, three comparisons: the sign-flip view can never resolve (3 x 2/64 > 0.05)
        assert r["signflip_floor"] == pytest.approx(2 / 64) and not r["signflip_can_resolve"]
        assert r["p_signflip_holm"] >= r["p_signflip"] and "read the t interval" in r["boot_note"]


def test_an_equivalence_claim_goes_through_tost_at_its_stated_margin():
    keeps = claims.Claim(
        "GDES keeps E_G's structure", "(b) test", "gdes - nes", "equal", kind="equivalence", margin=0.5
    )
    (row,) = claims.evaluate_family([keeps], seed_values(0 * NOISE, 0 * NOISE, 0.05 + NOISE))
    assert row["margin"] == 0.5 and row["reads"] == "agrees with the paper" and row["tost_high"] < 0.5
    assert row["p"] == pytest.approx(claims.stats.tost_paired(0.05 + NOISE, 0.5)["p_tost"])
    assert math.isnan(row["power"])
    (far,) = claims.evaluate_family([keeps], seed_values(0 * NOISE, 0 * NOISE, 1.0 + NOISE))
    assert far["resolved"] == "no" and far["reads"] == "not resolved"


def test_claims_are_checked_when_written():
    with pytest.raises(ValueError, match="first - second"):
        claims.Claim("x", "f", "gdes", "higher")
    with pytest.raises(ValueError, match="direction_expected"):
        claims.Claim("x", "f", "gdes - es", "up")
    with pytest.raises(ValueError, match="positive margin"):
        claims.Claim("x", "f", "gdes - es", "equal", kind="equivalence")
    with pytest.raises(ValueError, match="only one, expects 'equal'"):
        claims.Claim("x", "f", "gdes - es", "equal")
    with pytest.raises(ValueError, match="one family"):
        claims.evaluate_family([claims.ORDERING[0], claims.Claim("x", "other", "gdes - es", "higher")], {})
    values = seed_values(NOISE, NOISE, NOISE)
    del values["nes"][3]
    with pytest.raises(ValueError, match=r"only in gdes: \[3\], only in nes: \[\]"):
        claims.evaluate_family(claims.ORDERING, values)


# --------------------------------------------------------------------------------------- convergence


def test_area_under_the_curve_by_the_trapezoid_rule():
    # (4 + 2) / 2 * 10 + (2 + 1) / 2 * 20 = 60 over a span of 30 steps
    assert claims.curve_area([0, 10, 30], [4.0, 2.0, 1.0]) == pytest.approx(2.0)
    # a run that gets down sooner has the smaller area at the same final level
    assert claims.curve_area([0, 10, 30], [4.0, 1.5, 1.0]) < claims.curve_area([0, 10, 30], [4.0, 3.0, 1.0])
    with pytest.raises(ValueError, match="increase"):
        claims.curve_area([0, 10, 10], [3.0, 2.0, 1.0])


def test_steps_to_threshold_is_the_first_evaluation_at_or_below_it():
    steps, losses = [0, 10, 20, 30], [5.0, 3.0, 2.0, 1.5]
    assert claims.steps_to_threshold(steps, losses, 2.0) == 20
    assert claims.steps_to_threshold(steps, losses, 2.5) == 20
    assert claims.steps_to_threshold(steps, losses, 1.0) is None


def test_flattening_rule_on_hand_made_curves():
    flat = claims.flattening([0, 25, 50, 75, 100], [10.0, 4.0, 2.0, 1.5, 1.45])
    assert flat["fraction"] == pytest.approx(0.05 / 8.55) and flat["flattened"]
    steep = claims.flattening([0, 25, 50, 75, 100], [10.0, 8.0, 6.0, 4.0, 2.0])
    assert steep["fraction"] == pytest.approx(2.0 / 8.0) and not steep["flattened"]
    # the start of the last quarter (step 75) read by linear interpolation: 3.0, so 1.0 of a drop of 8
    assert claims.flattening([0, 50, 100], [10.0, 4.0, 2.0])["fraction"] == pytest.approx(0.125)
    rising = claims.flattening([0, 50, 100], [5.0, 5.5, 6.0])
    assert math.isnan(rising["fraction"]) and not rising["flattened"] and "not trained" in rising["reads"]
    summary = claims.convergence_summary([0, 25, 50, 75, 100], [10.0, 4.0, 2.0, 1.5, 1.45], threshold=2.0)
    assert summary["final"] == 1.45 and summary["steps_to_threshold"] == 50 and summary["flattened"]


def curve_rows(means: dict, steps, spread=0.1) -> list[dict]:
    """Two pre-training seeds per mode, symmetric about the given mean curve."""
    return [{"mode": m, "pretrain_seed": s, "step": x, "mlm_loss": y + sign * spread}
            for m, ys in means.items() for s, sign in ((0, 1), (1, -1)) for x, y in zip(steps, ys)]  # fmt: skip


def test_where_the_mean_curves_cross():
    steps = [0, 20, 40, 60]
    rows = curve_rows({"es": [5.0, 4.0, 3.0, 2.5], "gdes": [5.5, 4.2, 2.8, 2.2]}, steps)
    # gdes - es: +0.2 at 20, -0.2 at 40: the curves cross half way, at step 30, gdes lower after
    (cross,) = claims.curve_crossings(rows, "gdes", "es")
    assert cross == {"step": pytest.approx(30.0), "after": 40.0, "lower_after": "gdes"}
    # equal at step 20, then the order flips back: two crossings, the first at the evaluation itself
    rows = curve_rows({"es": [5.0, 4.0, 3.0, 2.5], "nes": [4.8, 4.0, 3.2, 2.3]}, steps)
    crossings = claims.curve_crossings(rows, "nes", "es")
    assert [c["step"] for c in crossings] == pytest.approx([20.0, 50.0])
    assert [c["lower_after"] for c in crossings] == ["es", "nes"]
    assert claims.curve_crossings(curve_rows({"es": [5, 4], "nes": [4, 3]}, [0, 10]), "nes", "es") == []
    missing = [r for r in rows if not (r["mode"] == "es" and r["pretrain_seed"] == 1 and r["step"] == 40)]
    with pytest.raises(ValueError, match="lacks seeds"):
        claims.curve_crossings(missing, "nes", "es")


def test_mode_seed_means_average_finetuning_seeds_and_drop_failed_seeds_from_every_mode():
    records = [
        {"mode": m, "pretrain_seed": p, "finetune_seed": f, "value": 10 * p + f + (m == "gdes")}
        for m in ("es", "gdes")
        for p in range(3)
        for f in range(2)
    ]
    records[-1]["value"] = float("nan")  # gdes, pre-training seed 2, fine-tuning seed 1 failed
    values, failed = claims.mode_seed_means(records)
    assert failed == [2] and values == {"es": {0: 0.5, 1: 10.5}, "gdes": {0: 1.5, 1: 11.5}}
    assert claims.paired_differences(claims.ORDERING[0], values).tolist() == [1.0, 1.0]


def run_records(quantity: str, per_mode: dict) -> list[dict]:
    """Per-run records {mode, pretrain_seed, quantity, value} from mode -> per-seed values."""
    return [
        {"mode": m, "pretrain_seed": s, "quantity": quantity, "value": float(v)}
        for m, values in per_mode.items()
        for s, v in enumerate(values)
    ]


def test_claims_a_and_b_are_fixed_with_their_families_and_margin():
    by_family = {}
    for c in claims.TUG_OF_WAR_CLAIMS:
        by_family.setdefault(c.family, []).append(c)
    a, b = by_family[claims.CONVERGENCE_FAMILY], by_family[claims.STRUCTURE_FAMILY]
    assert [(c.quantity, c.comparison, c.direction_expected) for c in a] == [
        ("mlm_area", "nes - es", "lower"),
        ("mlm_area", "gdes - es", "lower"),
    ]
    assert [(c.quantity, c.comparison, c.kind) for c in b] == [
        ("class_gap_E_G", "nes - es", "difference"),
        ("class_gap_E_G", "gdes - es", "difference"),
        ("class_gap_E_G", "gdes - nes", "equivalence"),
    ]
    assert b[-1].margin == claims.CLASS_GAP_MARGIN > 0


def test_test_claims_runs_each_family_on_its_own_quantity_with_holm_and_tost():
    gap = {"es": 0.30 + NOISE / 100, "nes": 0.40 + NOISE[::-1] / 100, "gdes": 0.40 + NOISE / 200}
    area = {"es": 4.0 + NOISE, "nes": 3.9 + NOISE, "gdes": 3.9 + NOISE}  # shifts of 0.1, no spread
    records = run_records("class_gap_E_G", gap) + run_records("mlm_area", area)
    tested = claims.test_claims(claims.TUG_OF_WAR_CLAIMS, records)
    assert set(tested) == {(c.quantity, c.comparison) for c in claims.TUG_OF_WAR_CLAIMS}
    nes_es = tested[("class_gap_E_G", "nes - es")]
    d = gap["nes"] - gap["es"]
    assert nes_es["difference"] == pytest.approx(d.mean())
    p3 = [tested[("class_gap_E_G", c)]["p"] for c in ("nes - es", "gdes - es", "gdes - nes")]
    holm = sorted(p3)
    # Holm within (b) alone: the smallest p times 3
    assert min(tested[("class_gap_E_G", c)]["p_holm"] for c in ("nes - es", "gdes - es")) == pytest.approx(
        min(1.0, 3 * holm[0])
    )
    same = tested[("class_gap_E_G", "gdes - nes")]
    tost = sps.ttest_1samp(gap["gdes"] - gap["nes"], claims.CLASS_GAP_MARGIN, alternative="less")
    assert same["kind"] == "equivalence" and same["p"] >= tost.pvalue
    assert same["reads"] == "agrees with the paper"  # within ±0.03 with a tight interval
    assert tested[("mlm_area", "nes - es")]["reads"] == "agrees with the paper"


def test_overlay_replaces_only_the_claimed_rows():
    records = run_records("class_gap_E_G", {"es": 0.3 + NOISE / 10, "nes": 0.5 + NOISE[::-1] / 10,
                                             "gdes": 0.5 + NOISE / 10})  # fmt: skip
    records += run_records("cos_E_G", {"es": NOISE, "nes": NOISE[::-1], "gdes": NOISE})
    from lab.analysis import stats

    diffs = stats.paired_by_seed(records, ("quantity",), (("gdes", "es"), ("gdes", "nes"), ("nes", "es")))
    quantity = lambda r: r["quantity"]  # noqa: E731
    rows = claims.overlay_claims(diffs, claims.test_claims(claims.TUG_OF_WAR_CLAIMS, records), quantity)
    families = {(r["quantity"], r["comparison"]): r["family"] for r in rows}
    assert families[("class_gap_E_G", "gdes - nes")] == claims.STRUCTURE_FAMILY
    assert families[("cos_E_G", "gdes - nes")] == "exploratory"
    assert {f for (q, _), f in families.items() if q == "class_gap_E_G"} == {claims.STRUCTURE_FAMILY}
