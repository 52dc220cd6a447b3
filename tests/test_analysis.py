import math

import pytest
import torch

from lab.analysis import tug_of_war as analysis
from lab.pretrain import probe


def test_average_pairwise_cosine_orthogonal_rows_is_zero():
    assert probe.average_pairwise_cosine(torch.eye(5)) == pytest.approx(0.0, abs=1e-12)


def test_average_pairwise_cosine_identical_rows_is_one():
    E = torch.tensor([[1.0, 2.0, 3.0]]).repeat(4, 1) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    assert probe.average_pairwise_cosine(E) == pytest.approx(1.0)


def test_average_pairwise_cosine_matches_explicit_pairs_and_ids():
    torch.manual_seed(0)
    E = torch.randn(30, 8)
    ids = [1, 4, 7, 9, 20]
    u = torch.nn.functional.normalize(E[ids], dim=1)
    sim = u @ u.T
    n = len(ids)
    expected = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
    assert probe.average_pairwise_cosine(E, ids) == pytest.approx(float(expected), abs=1e-6)


def test_average_pairwise_cosine_two_opposite_rows_is_minus_one():
    assert probe.average_pairwise_cosine(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-1.0)


def test_gradient_cosine_opposite_same_and_zero():
    g = torch.randn(3, 4)
    assert probe.gradient_cosine(g, -3 * g) == pytest.approx(-1.0)
    assert probe.gradient_cosine(g, 2 * g) == pytest.approx(1.0)
    assert probe.gradient_cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == pytest.approx(0.0)
    assert math.isnan(probe.gradient_cosine(g, torch.zeros(3, 4)))


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


# ---------------------------------------------------------------------------------------------- report


def fabricate_run(path, sharing: str, seed: int = 0, steps: int = 40, slow: float | None = None):
    """A run directory with the contract's files, from a tiny synthetic corpus and made-up curves: the
    generator table clusters by class (strongly), the discriminator's less so, as the paper describes.
    The MLM curve is 6 * slow / (1 + 0.1 step), slow = 1.5 for ES and 1 otherwise unless given."""
    import json

    import numpy as np
    from safetensors.torch import save_file

    from lab.synthetic import SyntheticLanguage
    from lab.tokenizer import train_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    language = SyntheticLanguage(0)
    docs = list(language.documents(3000))
    tokenizer = train_tokenizer(docs, 1000, out_dir=path / "tokenizer")
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for ids in tokenizer.encode_batch(docs):
        np.add.at(counts, ids, 1)
    np.save(path / "token_counts.npy", counts)
    classes = language.token_classes(tokenizer).classes
    (path / "token_classes.json").write_text(json.dumps({str(k): v for k, v in classes.items()}))
    g = torch.Generator().manual_seed(seed)
    names = sorted(set(classes.values()))
    centroids = torch.randn(len(names), 16, generator=g)
    E_G = torch.randn(tokenizer.vocab_size, 16, generator=g)
    for i, c in classes.items():
        E_G[i] = centroids[names.index(c)] + 0.3 * torch.randn(16, generator=g)
    delta = torch.randn(tokenizer.vocab_size, 16, generator=g) * 2.0
    tables = {"generator": E_G, "discriminator": E_G + delta if sharing != "es" else E_G}
    if sharing == "gdes":
        tables["delta"] = delta
    save_file({k: v.clone().contiguous() for k, v in tables.items()}, str(path / "embeddings.safetensors"))
    slow = slow if slow is not None else (1.5 if sharing == "es" else 1.0)
    rows = []
    for step in range(1, steps + 1):
        mlm = 6.0 * slow / (1 + 0.1 * step)
        rows.append({"split": "train", "step": step, "loss": mlm + 5, "mlm_loss": mlm, "rtd_loss": 0.1, "lr": 1e-3,
                     "tokens": 128 * step, "tokens_per_s": 1000.0, "elapsed_s": 0.1 * step})  # fmt: skip
        if step % 10 == 0:
            rows.append({"split": "eval", "step": step, "mlm_loss": mlm + 0.1, "mlm_acc": 0.3, "rtd_loss": 0.2,
                         "rtd_acc": 0.9, "rtd_auc": 0.8, "replaced_rate": 0.12,
                         "fixed_auc": 1 - 0.4 * slow / (1 + 0.1 * step)})  # fmt: skip
            cos = {"es": -0.2, "nes": 0.0, "gdes": float("nan")}[sharing]
            rows.append(
                {"split": "probe", "step": step, "grad_cos": cos, "grad_norm_mlm": 1.0, "grad_norm_rtd": 2.0}
            )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.json").write_text(json.dumps({"sharing": sharing}))
    (path / "summary.json").write_text(json.dumps({"sharing": sharing, "final_eval": rows[-2]}))
    return path


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {mode: fabricate_run(root / mode, mode, seed=i) for i, mode in enumerate(("es", "nes", "gdes"))}


def test_report_writes_every_view_and_summary(fake_runs, tmp_path):
    import json

    summary = analysis.tug_of_war_report(fake_runs, tmp_path / "report")
    out = tmp_path / "report"
    for stem in ("mlm_loss", "embedding_cosine", "grad_conflict", "class_separation", "final_eval"):
        for ext in ("csv", "png", "svg"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0, f"{stem}.{ext}"
    neighbours = (out / "nearest_neighbours.md").read_text()
    assert neighbours.count("\n") > 3 and "[noun." in neighbours  # synthetic tokens carry their class
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    # the fabricated curves make ES slowest; its E_D is E_G; only GDES has E_delta
    assert summary["paper_claims"]["es_mlm_loss_highest"] is True
    cos = summary["embedding_cosine"]
    assert cos["es"]["E_G"] == pytest.approx(cos["es"]["E_D"])
    assert "E_delta" in cos["gdes"] and "E_delta" not in cos["nes"]
    # class-clustered E_G has a clearly positive gap; the noisier E_D a smaller one
    assert summary["class_gap"]["nes/E_G"] > 0.3
    assert summary["class_gap"]["nes/E_D"] < summary["class_gap"]["nes/E_G"]
    assert summary["grad_cos_mean"]["es"]["grad_cos"] == pytest.approx(-0.2)
    assert "gdes" not in summary["grad_cos_mean"]  # all-nan probes are left out, not averaged to nan
    assert summary["final_eval"]["nes"]["rtd_auc"] == pytest.approx(0.8)


def test_seen_tokens_exclude_specials_and_unseen(fake_runs):
    import numpy as np

    run = analysis.load_run(fake_runs["nes"])
    ids = analysis.seen_token_ids(run, 10_000)
    counts = np.load(fake_runs["nes"] / "token_counts.npy")
    assert ids and all(counts[i] > 0 for i in ids)
    assert not set(ids) & set(run.tokenizer().special_ids)


def test_load_run_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        analysis.load_run(tmp_path)


def test_attention_terms_equal_a_literal_computation():
    """Each term entry by entry from its definition, with idx(i, j) from the official bucket formula
    (tests/test_reference.py); small buckets (B=8, M=16) so T=20 reaches log buckets and the index clamp."""
    from test_reference import reference_index

    from lab.model import Encoder, preset

    enc = Encoder(preset("tiny", position_buckets=8, max_relative_positions=16)).eval()
    T = 20
    ids = torch.randint(4, 1000, (2, T))
    h = enc.embed(ids, torch.ones_like(ids))
    rel, index = enc.relative_positions(T, ids.device)
    att = enc.layers[0].attention
    terms = analysis.attention_terms(att, h, rel, index)

    with torch.no_grad():
        W = {n: p.double() for n, p in att.named_parameters()}
        H, Dh = att.num_heads, att.head_size
        P = enc.rel_norm(enc.rel_embeddings.weight).double()  # all 2B rows
        idx = reference_index(T, 8, 16)  # [T, T] into the full table

        def project(x, name):  # [N, D] -> [H, N, Dh]
            return (x @ W[name + ".weight"].T + W[name + ".bias"]).view(-1, H, Dh).transpose(0, 1)

        for b in range(2):
            Qc, Kc = project(h[b].double(), "query"), project(h[b].double(), "key")
            Qr, Kr = project(P, "query"), project(P, "key")
            for head in range(H):
                c2c = torch.empty(T, T, dtype=torch.float64)
                c2p, p2c = torch.empty_like(c2c), torch.empty_like(c2c)
                for i in range(T):
                    for j in range(T):
                        c2c[i, j] = Qc[head, i] @ Kc[head, j]
                        c2p[i, j] = Qc[head, i] @ Kr[head, idx[i, j]]
                        p2c[i, j] = Kc[head, j] @ Qr[head, idx[i, j]]
                scale = (3 * Dh) ** -0.5
                for name, want in (("c2c", c2c), ("c2p", c2p), ("p2c", p2c)):
                    got = terms[name][b, head].double()
                    assert (got - want * scale).abs().max() < 1e-5, (
                        f"{name} differs at batch {b}, head {head}"
                    )
    assert terms["c2c"].shape == (2, 2, T, T)


def test_similarity_pull_signs_and_finite_difference():
    from lab.pretrain.probe import average_pairwise_cosine, similarity_pull

    E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    together = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # -grad moves row 1 towards row 0
    assert similarity_pull(E, together, skip=0) < 0 < similarity_pull(E, -together, skip=0)
    E = E.double()
    grad = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-6
    numeric = (average_pairwise_cosine(E - eps * grad) - average_pairwise_cosine(E + eps * grad)) / (2 * eps)
    assert abs(similarity_pull(E, grad, skip=0) - numeric) < 1e-6
    # the special rows are left out by default
    assert similarity_pull(
        torch.cat([torch.randn(4, 2), E]), torch.cat([torch.randn(4, 2), grad])
    ) == pytest.approx(similarity_pull(E, grad, skip=0))


def test_es_mlm_loss_highest_is_false_when_another_mode_is_slower(tmp_path):
    # the same fabricated runs, but NES's curve is the slow one: the claim must read False
    runs = {mode: fabricate_run(tmp_path / mode, mode, seed=i, slow=1.5 if mode == "nes" else 1.0)
            for i, mode in enumerate(("es", "nes", "gdes"))}  # fmt: skip
    summary = analysis.tug_of_war_report(runs, tmp_path / "report")
    assert summary["paper_claims"]["es_mlm_loss_highest"] is False
    # strict: a tie with the slowest other mode is not "highest"
    cos = {"nes": {"E_G": 0.3, "E_D": 0.1}, "es": {"E_G": 0.1}}
    tie = analysis._paper_claims(
        {"final_smoothed_mlm_loss": {"es": 3.0, "nes": 3.0, "gdes": 2.0}, "embedding_cosine": cos}
    )
    assert tie["es_mlm_loss_highest"] is False
    above = analysis._paper_claims(
        {"final_smoothed_mlm_loss": {"es": 3.1, "nes": 3.0, "gdes": 2.0}, "embedding_cosine": cos}
    )
    assert above["es_mlm_loss_highest"] is True
    assert above["nes_generator_more_similar_than_discriminator"] is True
    swapped = {"nes": {"E_G": 0.1, "E_D": 0.3}, "es": {"E_G": 0.2}}
    below = analysis._paper_claims({"final_smoothed_mlm_loss": {}, "embedding_cosine": swapped})
    assert below == {
        "nes_generator_more_similar_than_discriminator": False,
        "es_table_below_nes_generator": False,
    }


def test_report_without_matplotlib_writes_every_csv(fake_runs, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a GPU box without it
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    summary = analysis.tug_of_war_report(fake_runs, tmp_path)
    for stem in ("mlm_loss", "embedding_cosine", "grad_conflict", "class_separation", "final_eval"):
        assert (tmp_path / f"{stem}.csv").stat().st_size > 0
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.svg"))
    assert summary["paper_claims"]["es_mlm_loss_highest"] is True


def test_seeded_report_pairs_runs_by_seed(tmp_path):
    import csv

    runs = {(mode, seed): fabricate_run(tmp_path / f"{mode}-{seed}", mode, seed=seed)
            for seed in (0, 1) for mode in ("es", "nes")}  # fmt: skip
    out = analysis.seeded_report(runs, tmp_path / "report", comparisons=(("nes", "es"),))
    diffs = {r["quantity"]: r for r in out["differences"]}
    # mean train MLM loss: ES's curve is 1.5 x NES's at every step, in both seeds
    nes_mean = sum(6.0 / (1 + 0.1 * s) for s in range(1, 41)) / 40
    assert diffs["mean_train_mlm_loss"]["difference"] == pytest.approx(-0.5 * nes_mean)
    # held-out MLM loss at step 40: 6 / 5 + 0.1 (NES) vs 1.5 * 6 / 5 + 0.1 (ES)
    assert diffs["final_mlm_loss"]["difference"] == pytest.approx(-0.6)
    assert (
        diffs["final_mlm_loss"]["n"] == 2 and diffs["final_mlm_loss"]["family"] == "exploratory"
    )  # no primary family given: every comparison is exploratory
    # ES's discriminator table is its generator table
    per_run = list(csv.DictReader((tmp_path / "report" / "tug_of_war_runs.csv").open()))
    es = [r for r in per_run if r["mode"] == "es"]
    assert all(float(r["cos_E_G_minus_E_D"]) == 0 for r in es)
    for name in (
        "tug_of_war_summary.md",
        "tug_of_war_differences.md",
        "mlm_loss_train.csv",
        "fixed_auc_heldout.csv",
        "seed-0/embedding_cosine.csv",
    ):
        assert (tmp_path / "report" / name).is_file()
    # the held-out curves' scalars are columns; ES's fixed-set AUC is lower at the end (0.4 * 1.5 / 5 error)
    assert {"mlm_area", "mlm_flatten_fraction", "final_fixed_auc", "fixed_auc_flatten_fraction"} <= set(
        per_run[0]
    )
    assert diffs["final_fixed_auc"]["difference"] == pytest.approx(0.04)


def test_heldout_curve_quantities_follow_claims_and_skip_what_a_run_lacks():
    from lab.analysis import claims

    steps, mlm, auc = [0, 10, 20, 30, 40], [8.0, 5.0, 4.0, 3.6, 3.5], [0.5, 0.7, 0.8, 0.84, 0.85]
    rows = [{"step": s, "mlm_loss": m, "fixed_auc": a} for s, m, a in zip(steps, mlm, auc)]
    out = analysis.heldout_curve_quantities(rows)
    assert out == {
        "mlm_area": pytest.approx(claims.curve_area(steps, mlm)),
        "mlm_flatten_fraction": pytest.approx((3.6 - 3.5) / (8.0 - 3.5)),  # the last quarter: step 30 -> 40
        "final_fixed_auc": 0.85,
        "fixed_auc_flatten_fraction": pytest.approx((0.85 - 0.84) / (0.85 - 0.5)),  # of the error 1 - AUC
    }
    # one evaluation (the steps=0 control): the last AUC only; runs from before fixed_auc: the MLM keys only
    assert analysis.heldout_curve_quantities(rows[:1]) == {"final_fixed_auc": 0.5}
    old = [{k: v for k, v in r.items() if k != "fixed_auc"} for r in rows]
    assert set(analysis.heldout_curve_quantities(old)) == {"mlm_area", "mlm_flatten_fraction"}
    assert analysis.heldout_curve_quantities([]) == {}
    # a diverged run: NaN, never an exception
    rows[-1]["mlm_loss"] = None
    assert math.isnan(analysis.heldout_curve_quantities(rows)["mlm_area"])


def test_a_figure_saved_twice_is_the_same_bytes(tmp_path):
    """A rerun rewrites no committed figure: the PNG and the SVG (dates, element ids) come out identical."""
    from lab.analysis.stats import save_figure

    written = []
    for run in ("first", "second"):
        fig, ax = analysis.new_figure()
        ax.plot([0, 1, 2], [1.0, 3.0, 2.0], label="curve")
        ax.bar([0, 1], [1.0, 2.0])
        ax.legend()
        written.append([p.read_bytes() for p in save_figure(fig, tmp_path / run / "figure")])
    assert written[0] == written[1]
