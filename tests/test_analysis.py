import math

import pytest
import torch

from lab import analysis


def test_average_pairwise_cosine_orthogonal_rows_is_zero():
    assert analysis.average_pairwise_cosine(torch.eye(5)) == pytest.approx(0.0, abs=1e-12)


def test_average_pairwise_cosine_identical_rows_is_one():
    E = torch.tensor([[1.0, 2.0, 3.0]]).repeat(4, 1) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    assert analysis.average_pairwise_cosine(E) == pytest.approx(1.0)


def test_average_pairwise_cosine_matches_explicit_pairs_and_ids():
    torch.manual_seed(0)
    E = torch.randn(30, 8)
    ids = [1, 4, 7, 9, 20]
    u = torch.nn.functional.normalize(E[ids], dim=1)
    sim = u @ u.T
    n = len(ids)
    expected = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
    assert analysis.average_pairwise_cosine(E, ids) == pytest.approx(float(expected), abs=1e-6)


def test_average_pairwise_cosine_two_opposite_rows_is_minus_one():
    assert analysis.average_pairwise_cosine(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-1.0)


def test_gradient_cosine_opposite_same_and_zero():
    g = torch.randn(3, 4)
    assert analysis.gradient_cosine(g, -3 * g) == pytest.approx(-1.0)
    assert analysis.gradient_cosine(g, 2 * g) == pytest.approx(1.0)
    assert analysis.gradient_cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == pytest.approx(0.0)
    assert math.isnan(analysis.gradient_cosine(g, torch.zeros(3, 4)))


def test_class_separation_two_class_toy_table():
    # Class a: rows along e1 and (e1+e2)/sqrt2 -> within cos = 1/sqrt2; class b: two copies of e3 -> 1.
    # Between pairs: e1.e3=0, (e1+e2).e3=0 -> between = 0. Within over all same-class ordered pairs:
    # (2 * 1/sqrt2 + 2 * 1) / 4.
    E = torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0], [0, 0, 1.0], [0, 0, 2.0]])
    out = analysis.class_separation(E, {0: "a", 1: "a", 2: "b", 3: "b"})
    within = (2 / math.sqrt(2) + 2) / 4
    assert out["within"] == pytest.approx(within)
    assert out["between"] == pytest.approx(0.0, abs=1e-12)
    assert out["gap"] == pytest.approx(within)


def test_class_separation_needs_two_classes():
    with pytest.raises(ValueError, match="two classes"):
        analysis.class_separation(torch.eye(3), {0: "a", 1: "a"})


def test_nearest_neighbours_finds_the_closest_row():
    E = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    out = analysis.nearest_neighbours(E, [0], k=2, tokenizer=None)
    assert [n[0] for n in out[0]["neighbours"]] == [1, 2]
    assert out[0]["token"] == "0"
