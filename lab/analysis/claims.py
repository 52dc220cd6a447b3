"""The paper's claims fixed in code before the run, the family test that decides them, and the
convergence quantities claim (a) rests on.

A `Claim` names one comparison between two sharing modes (lab.sharing), the direction the
paper expects, and the family it is Holm-corrected in. A family is a tuple of claims written here, not
chosen after the data: `evaluate_family` tests every member, adjusts within the family and reads each
one whatever direction the data take — "agrees with the paper", "against the paper" or "not resolved".

The unit of replication is the pre-training seed throughout: a mode's value for a seed is the mean over
its fine-tuning seeds (mode_seed_means), and the paired difference between two modes is
taken within each pre-training seed (same initialisation, data order and masking noise).

(c), the paper's Table 6 (He, Gao, Chen, ICLR 2023, arXiv 2111.09543: base models, MNLI-m 88.8 ES,
88.3 NES, 89.3 GDES; SQuAD v2.0 F1 86.3 / 85.3 / 87.2), is an ordering, GDES > ES > NES: the family is
all three pairwise differences, `ORDERING`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lab.analysis import stats

KINDS = ("difference", "equivalence")
DIRECTIONS = {"higher": 1, "lower": -1, "equal": 0}
READS = ("agrees with the paper", "against the paper", "not resolved")


@dataclass(frozen=True)
class Claim:
    name: str  # plain words, e.g. "GDES above ES"
    family: str  # Holm runs within a family; one family per claim of the paper
    comparison: str  # "first - second", two sharing modes
    direction_expected: (
        str  # "higher": the paper expects first - second > 0; "lower": < 0; "equal": equivalence
    )
    quantity: str = ""  # what is measured (the report maps it to its column), e.g. "main metric, test split"
    kind: str = "difference"  # "difference": two-sided paired t; "equivalence": TOST within ±margin
    margin: float | None = None  # equivalence only: the largest |difference| that counts as none, in the
    # quantity's units, fixed with the claim before the run
    primary: bool = True  # primary claims decide; the others are shown as exploratory

    def __post_init__(self):
        modes = [m.strip() for m in self.comparison.split(" - ")]
        if len(modes) != 2 or not all(modes) or modes[0] == modes[1]:
            raise ValueError(
                f"Claim {self.name!r}: comparison must read 'first - second', got {self.comparison!r}"
            )
        if self.kind not in KINDS:
            raise ValueError(f"Claim {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.direction_expected not in DIRECTIONS:
            raise ValueError(
                f"Claim {self.name!r}: direction_expected must be one of {tuple(DIRECTIONS)}, "
                f"got {self.direction_expected!r}"
            )
        if (self.kind == "equivalence") != (self.direction_expected == "equal"):
            raise ValueError(f"Claim {self.name!r}: an equivalence claim, and only one, expects 'equal'")
        if self.kind == "equivalence" and not (self.margin is not None and self.margin > 0):
            raise ValueError(f"Claim {self.name!r}: an equivalence claim needs a positive margin, fixed now")
        if self.kind == "difference" and self.margin is not None:
            raise ValueError(f"Claim {self.name!r}: a margin belongs to an equivalence claim only")

    @property
    def modes(self) -> tuple[str, str]:
        first, second = (m.strip() for m in self.comparison.split(" - "))
        return first, second


# (a), the paper's figure of the generator's MLM loss over training: under ES it converges more slowly
# than under NES or GDES. The primary quantity is the whole held-out curve, its area per step
# (curve_area: the mean level over training), not a level at one step picked after the fact; the final
# level and where the mean curves cross are reported beside it (exploratory).
CONVERGENCE_FAMILY = "(a) generator convergence"
# (b), the paper's embedding analysis: under ES the shared table is pulled away from the structure the
# MLM task gives it; GDES keeps the generator's structure. Measured directly as the class gap of E_G
# (lab.analysis.tug_of_war.class_separation: mean cosine within a word class minus across classes, on
# the synthetic language where every word's class is known); "keeps" is an equivalence, GDES ≈ NES,
# tested by TOST within CLASS_GAP_MARGIN.
STRUCTURE_FAMILY = "(b) generator embedding structure"
# The margin, fixed before the runs of the recipe that tests it: a quarter of ES's shortfall against NES
# in a pilot outside the recipe (`tiny`, 1,500 steps at lr 2e-3, synthetic:0, seed 0, one run each:
# class gap of E_G 0.369 ES, 0.493 NES, a gap of 0.12), so GDES counts as keeping E_G's structure when
# it is within a quarter of the tug-of-war's effect of NES, in either direction.
CLASS_GAP_MARGIN = 0.03
TUG_OF_WAR_CLAIMS = (
    Claim("NES's generator converges faster than ES's", CONVERGENCE_FAMILY, "nes - es", "lower", "mlm_area"),
    Claim("GDES's generator converges faster than ES's", CONVERGENCE_FAMILY, "gdes - es", "lower", "mlm_area"),
    Claim("NES's E_G holds more class structure than ES's", STRUCTURE_FAMILY, "nes - es", "higher", "class_gap_E_G"),
    Claim("GDES's E_G holds more class structure than ES's", STRUCTURE_FAMILY, "gdes - es", "higher", "class_gap_E_G"),
    Claim("GDES keeps E_G's class structure (as NES)", STRUCTURE_FAMILY, "gdes - nes", "equal", "class_gap_E_G",
          kind="equivalence", margin=CLASS_GAP_MARGIN),
)  # fmt: skip

# every pair of modes the tug-of-war tables compare, paired over pre-training seeds
TUG_OF_WAR_COMPARISONS = (("gdes", "es"), ("gdes", "nes"), ("nes", "es"))

ORDERING_FAMILY = "(c) downstream ordering"
ORDERING = (
    Claim("GDES above ES", ORDERING_FAMILY, "gdes - es", "higher", "main metric"),
    Claim("GDES above NES", ORDERING_FAMILY, "gdes - nes", "higher", "main metric"),
    Claim("ES above NES", ORDERING_FAMILY, "es - nes", "higher", "main metric"),
)


def mode_seed_means(records: Sequence[Mapping], value: str = "value") -> tuple[dict[str, dict], list]:
    """From run records {"mode", "pretrain_seed", optionally "finetune_seed", value} of one quantity to
    what evaluate_family takes: mode -> {pretrain_seed: mean over its fine-tuning seeds}. A pre-training
    seed with a non-finite value in any mode is a failed seed: left out of every mode (the pairing stays
    intact) and returned in the second element, sorted, so the report can count it."""
    by_mode = {key[0]: per_seed for key, per_seed in stats.seed_means(records, ("mode",), value).items()}
    failed = {
        s for per_seed in by_mode.values() for s, v in per_seed.items() if not all(map(math.isfinite, v))
    }
    values = {
        m: {s: float(np.mean(v)) for s, v in per_seed.items() if s not in failed}
        for m, per_seed in by_mode.items()
    }
    return values, sorted(failed, key=str)


def test_claims(
    claims: Sequence[Claim], records: Sequence[Mapping], quantity_of=lambda r: r["quantity"]
) -> dict[tuple[str, str], dict]:
    """Every claim tested within its family (evaluate_family) on per-run records {"mode",
    "pretrain_seed", optionally "finetune_seed", "value", and what `quantity_of` reads}: a claim's
    values are the records whose quantity is its `quantity`, paired over the pre-training seeds both of
    its modes hold with finite values (a failed seed is counted in the row's failed_seeds). A claim with
    fewer than two such seeds is left out of its family (and of Holm's m). Returns
    {(quantity, comparison): row}, the row evaluate_family's plus failed_seeds."""
    out = {}
    for family in dict.fromkeys(c.family for c in claims):
        members, values, failed_of = [], {}, []
        for i, c in enumerate(c for c in claims if c.family == family):
            rows = [r for r in records if quantity_of(r) == c.quantity and r["mode"] in c.modes]
            per_mode, failed = mode_seed_means(rows)
            paired = set.intersection(*(set(per_mode.get(m, {})) for m in c.modes))
            if len(paired) < 2:
                continue
            values.update({f"{m}@{i}": {s: per_mode[m][s] for s in paired} for m in c.modes})
            first, second = c.modes
            members.append(dataclasses.replace(c, comparison=f"{first}@{i} - {second}@{i}"))
            failed_of.append((c, len(failed)))
        if members:
            for (c, failed), row in zip(failed_of, evaluate_family(members, values)):
                out[(c.quantity, c.comparison)] = {**row, "comparison": c.comparison, "failed_seeds": failed}
    return out


# the columns of evaluate_family's rows that a claim's row in a differences table takes
CLAIM_COLUMNS = (
    "claim", "kind", "expected", "margin", "n", "difference", "std", "t_low", "t_high", "resolvable", "dz",
    "power", "power_holm", "n_for_80", "n_for_80_holm", "boot_low", "boot_high", "boot_method", "boot_note",
    "p_signflip", "p_holm", "resolved", "reads", "p_signflip_holm", "signflip_floor", "signflip_can_resolve",
    "failed_seeds", "tost_low", "tost_high",
)  # fmt: skip


def overlay_claims(diffs: list[dict], tested: Mapping[tuple[str, str], dict], quantity_of) -> list[dict]:
    """Replace the exploratory statistics of the rows of a differences table (stats.paired_by_seed) that
    a claim tested (`test_claims`) by the claim's: its family, Holm p, reading, power, TOST interval.
    Rows are matched on (quantity_of(row), comparison); the other rows stay exploratory."""
    for row in diffs:
        claim = tested.get((quantity_of(row), row["comparison"]))
        if claim is not None:
            row.update(
                {k: claim[k] for k in CLAIM_COLUMNS if k in claim}, family=claim["family"], p_t=claim["p"]
            )
    return diffs


def paired_differences(claim: Claim, seed_values: Mapping[str, Mapping[Hashable, float]]) -> np.ndarray:
    """first - second of the claim per pre-training seed, in sorted seed order. `seed_values`: mode ->
    {pretrain_seed: value}, fine-tuning seeds already averaged (mode_seed_means). Both modes must hold the
    same seeds: failed seeds are left out of both before calling (mode_seed_means does)."""
    first, second = claim.modes
    missing = [m for m in (first, second) if m not in seed_values]
    if missing:
        raise ValueError(f"claim {claim.name!r}: no values for mode(s) {missing}; have {sorted(seed_values)}")
    a, b = seed_values[first], seed_values[second]
    if set(a) != set(b):
        raise ValueError(
            f"claim {claim.name!r}: pre-training seeds differ between {first} and {second} "
            f"(only in {first}: {sorted(set(a) - set(b), key=str)}, only in {second}: "
            f"{sorted(set(b) - set(a), key=str)}); pair them on the seeds both hold"
        )
    seeds = sorted(a, key=str)
    return stats.require_finite([a[s] for s in seeds], first) - stats.require_finite(
        [b[s] for s in seeds], second
    )


def reading(claim: Claim, difference: float, resolved: bool) -> str:
    """One of READS: a resolved difference in the expected direction agrees, the other way is against the
    paper; a resolved equivalence agrees; anything unresolved is "not resolved"."""
    if not resolved:
        return "not resolved"
    if claim.kind == "equivalence":
        return "agrees with the paper"
    return (
        "agrees with the paper"
        if np.sign(difference) == DIRECTIONS[claim.direction_expected]
        else "against the paper"
    )


def evaluate_family(
    claims: Sequence[Claim],
    seed_values: Mapping[str, Mapping[Hashable, float]],
    alpha: float = stats.ALPHA,
    seed: int = 0,
) -> list[dict]:
    """Test every claim of one family, Holm-adjust within it and read each one.

    Unit: the pre-training seed (`seed_values`: mode -> {pretrain_seed: value}, fine-tuning seeds
    averaged; built by mode_seed_means from run records). A difference claim gets the two-sided paired
    t-test (assumed: normal differences) with its 95 % t interval, the paired bootstrap with its small-n
    caveat, the exact sign-flip p (assumed: differences symmetric about 0) Holm-adjusted over the family,
    and the power at the observed dz at `alpha` and at Holm's strictest level alpha / m, with the seeds
    80 % power would need at each. An equivalence claim gets TOST at its margin (stats.tost_paired, its
    (1 - 2 alpha) interval in tost_low / tost_high); its p_tost stands in the Holm family (and in the
    sign-flip view, which has no equivalence form) and its power columns are empty. `resolved`:
    Holm-adjusted p below `alpha` (`resolvable` stays at stats.ALPHA / m, as paired_test gives it).

    Returns one row per claim, in the family's order.
    """
    families = {c.family for c in claims}
    if len(families) != 1:
        raise ValueError(f"evaluate_family takes the claims of one family, got {sorted(families)}")
    m = len(claims)
    rows = []
    for claim in claims:
        d = paired_differences(claim, seed_values)
        test = stats.paired_test(d, np.zeros_like(d), family_size=m, seed=seed)
        row = {
            "claim": claim.name,
            "family": claim.family,
            "comparison": claim.comparison,
            "quantity": claim.quantity,
            "kind": claim.kind,
            "expected": claim.direction_expected,
            "margin": math.nan if claim.margin is None else claim.margin,
            "primary": claim.primary,
            "n": test["n"],
            "difference": test["mean"],
            "std": test["std"],
            "t_low": test["t_low"],
            "t_high": test["t_high"],
            "resolvable": test["resolvable"],
            **_difference_views(test, m, alpha),
        }
        if claim.kind == "equivalence":
            tost = stats.tost_paired(d, claim.margin, alpha)
            row.update(p=tost["p_tost"], p_lower=tost["p_lower"], p_upper=tost["p_upper"])
            row.update(tost_low=tost["low"], tost_high=tost["high"], p_signflip=tost["p_tost"])
            row.update(power=math.nan, power_holm=math.nan, n_for_80=None, n_for_80_holm=None)  # no t power
        rows.append(row)
    adjusted = stats.holm([r["p"] for r in rows])
    signflip = stats.signflip_holm([r["p_signflip"] for r in rows], [r["n"] for r in rows], alpha)
    for claim, row, p, flip in zip(claims, rows, adjusted, signflip):
        row["p_holm"] = p
        row["resolved"] = "yes" if p < alpha else "no"
        row["reads"] = reading(claim, row["difference"], p < alpha)
        row.update(
            p_signflip_holm=flip["p_signflip_holm"],
            signflip_floor=flip["floor"],
            signflip_can_resolve=flip["can_resolve"],
        )
    return rows


def _difference_views(test: dict, m: int, alpha: float) -> dict:
    """The two-sided t p, power and seeds needed at the observed dz, bootstrap and sign-flip of one claim."""
    return {
        "p": test["p_t"],
        **stats.power_columns(test["mean"], test["std"], test["n"], m, alpha),
        "boot_low": test["boot_low"],
        "boot_high": test["boot_high"],
        "boot_method": test["boot_method"],
        "boot_note": stats.bootstrap_caveat(test["n"]),
        "p_signflip": test["p_signflip"],
    }


# ------------------------------------------------------------------------------ convergence, claim (a)


def _curve(steps: Sequence[float], losses: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = stats.require_finite(steps, f"{what} steps"), stats.require_finite(losses, f"{what} losses")
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"{what}: needs steps and losses of equal length >= 2, got {x.shape} and {y.shape}")
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"{what}: steps must increase strictly, got {x.tolist()}")
    return x, y


def curve_area(steps: Sequence[float], losses: Sequence[float]) -> float:
    """Area under one run's held-out MLM curve by the trapezoid rule over its evaluated steps, divided by
    the step span: the curve's mean level over training (loss units), lower for a run that gets down
    sooner. Runs compared by it must share their evaluation steps."""
    x, y = _curve(steps, losses, "curve_area")
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def steps_to_threshold(steps: Sequence[float], losses: Sequence[float], threshold: float) -> float | None:
    """The first evaluated step whose loss is at or below `threshold` (no interpolation between evaluations:
    the answer is on the evaluation grid), None when the run never gets there. The threshold is fixed
    before the run, like a claim."""
    x, y = _curve(steps, losses, "steps_to_threshold")
    reached = np.flatnonzero(y <= threshold)
    return float(x[reached[0]]) if reached.size else None


FLATTEN_LAST_SHARE = 0.25  # the flattening rule's last part of training ...
FLATTEN_MAX_GAIN = 0.05  # ... and the largest share of the total drop it may still bring


def flattening(
    steps: Sequence[float],
    losses: Sequence[float],
    last_share: float = FLATTEN_LAST_SHARE,
    max_gain: float = FLATTEN_MAX_GAIN,
) -> dict:
    """Has the curve flattened? The rule: the last `last_share` of training (by steps) improves the loss by
    under `max_gain` of the total drop from the first evaluation to the last.

    The loss where the last part starts is read off the curve by linear interpolation between evaluations.
    Returns {total_drop, last_drop, fraction (last_drop / total_drop), flattened, reads}; a curve that did
    not drop at all has fraction nan and is not flattened (it never trained)."""
    x, y = _curve(steps, losses, "flattening")
    if not (0 < last_share < 1 and 0 < max_gain < 1):
        raise ValueError(
            f"flattening: last_share and max_gain must lie in (0, 1), got {last_share}, {max_gain}"
        )
    start = x[0] + (1 - last_share) * (x[-1] - x[0])
    total, last = float(y[0] - y[-1]), float(np.interp(start, x, y) - y[-1])
    rule = (
        f"the last {last_share:.0%} of training improves the loss by under {max_gain:.0%} of the total drop"
    )
    if total <= 0:
        return {"total_drop": total, "last_drop": last, "fraction": math.nan, "flattened": False,
                "reads": f"no overall drop: not trained ({rule} cannot apply)"}  # fmt: skip
    fraction = last / total
    flattened = fraction < max_gain
    return {
        "total_drop": total,
        "last_drop": last,
        "fraction": fraction,
        "flattened": flattened,
        "reads": f"{'flattened' if flattened else 'not flattened'}: {fraction:.1%} of the drop in the last "
        f"{last_share:.0%} ({rule})",
    }


def convergence_summary(
    steps: Sequence[float], losses: Sequence[float], threshold: float | None = None
) -> dict:
    """One run's convergence: {area (curve_area), final (the last evaluation), steps_to_threshold (None
    without a threshold or when never reached), threshold, first_step, last_step, flatten_fraction,
    flattened}. The unit of a comparison built on it is still the pre-training seed: one summary per run."""
    x, y = _curve(steps, losses, "convergence_summary")
    flat = flattening(x, y)
    return {
        "area": curve_area(x, y),
        "final": float(y[-1]),
        "steps_to_threshold": None if threshold is None else steps_to_threshold(x, y, threshold),
        "threshold": math.nan if threshold is None else float(threshold),
        "first_step": float(x[0]),
        "last_step": float(x[-1]),
        "flatten_fraction": flat["fraction"],
        "flattened": flat["flattened"],
    }


def mean_curve(rows: Sequence[Mapping], mode: str, value: str = "mlm_loss") -> tuple[np.ndarray, np.ndarray]:
    """A mode's mean curve over its pre-training seeds: rows {"mode", "pretrain_seed", "step", value};
    returns (steps, means), steps sorted. Every seed must hold every step (the mean of a different set
    of seeds at each step would draw a curve no run followed)."""
    per_step: dict[float, dict[Hashable, float]] = {}
    for r in rows:
        if r["mode"] == mode:
            per_step.setdefault(float(r["step"]), {})[r["pretrain_seed"]] = float(r[value])
    if not per_step:
        raise ValueError(f"mean_curve: no rows for mode {mode!r}")
    seeds = set.union(*(set(v) for v in per_step.values()))
    gaps = {s: sorted(seeds - set(v), key=str) for s, v in per_step.items() if set(v) != seeds}
    if gaps:
        raise ValueError(
            f"mean_curve: mode {mode!r} lacks seeds at some steps {gaps}; evaluate every run alike"
        )
    steps = np.array(sorted(per_step))
    means = [
        np.mean(stats.require_finite(list(per_step[s].values()), f"{mode} at step {s:g}")) for s in steps
    ]
    return steps, np.array(means)


def curve_crossings(rows: Sequence[Mapping], first: str, second: str, value: str = "mlm_loss") -> list[dict]:
    """Where the mean curves of two modes cross (see mean_curve). Between two evaluations where
    first - second changes sign the crossing step is interpolated linearly; an evaluation where the means
    are equal counts as a crossing when the sign differs on its two sides. Returns [{step, after,
    lower_after}] in step order: `after` the evaluation where the new order is first seen, `lower_after`
    the mode whose mean is lower from there. An empty list: one mode stays lower (or equal) throughout."""
    (xa, ya), (xb, yb) = mean_curve(rows, first, value), mean_curve(rows, second, value)
    if not np.array_equal(xa, xb):
        raise ValueError(f"curve_crossings: {first} and {second} were evaluated at different steps")
    gap = ya - yb
    signed = [(x, np.sign(g)) for x, g in zip(xa, gap) if g != 0]
    crossings = []
    for (x0, s0), (x1, s1) in zip(signed, signed[1:]):
        if s0 == s1:
            continue
        i0, i1 = np.flatnonzero(xa == x0)[0], np.flatnonzero(xa == x1)[0]
        zeros = [xa[i] for i in range(i0 + 1, i1) if gap[i] == 0]
        step = zeros[0] if zeros else x0 + gap[i0] / (gap[i0] - gap[i1]) * (x1 - x0)
        crossings.append(
            {"step": float(step), "after": float(x1), "lower_after": first if s1 < 0 else second}
        )
    return crossings
