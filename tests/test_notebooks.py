"""Every notebook runs through papermill with tiny parameters into a temp dir and leaves a summary.json."""

import json
from pathlib import Path

import pytest

from lab.notebook import runner as notebook

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == [
        "00_tour",
        "01_pretrain",
        "02_tug_of_war",
        "03_downstream",
        "04_experiment",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_first_among_code_cells(path):
    cells = json.loads(path.read_text())["cells"]
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith("# ")
    code = [c for c in cells if c["cell_type"] == "code"]
    tagged = [i for i, c in enumerate(code) if "parameters" in c["metadata"].get("tags", [])]
    assert tagged == [0]
    values = notebook.notebook_parameters(path)  # plain literals only, or this raises
    assert "out_dir" in values and str(values["out_dir"]).startswith("runs/")
    assert any("# NBVAL_CHECK_OUTPUT" in "".join(c["source"]) for c in code)
    # papermill reads the same names (a comment it cannot parse would hide a parameter from it)
    import papermill

    assert list(papermill.inspect_notebook(str(path))) == list(values)


def test_parameters_cell_must_come_first(tmp_path):
    nb = json.loads(NOTEBOOKS[1].read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    code[1]["metadata"]["tags"] = ["parameters"]
    bad = tmp_path / "bad.ipynb"
    bad.write_text(json.dumps(nb))
    with pytest.raises(ValueError, match="exactly one code cell tagged 'parameters'"):
        notebook.notebook_parameters(bad)


def test_lab_run_rejects_an_unknown_parameter(capsys):
    assert notebook.cli_run(["01_pretrain", "-p", "stepz", "3"]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "steps" in err and "sharing" in err


def test_run_notebook_rejects_unknown_names_before_running(tmp_path):
    with pytest.raises(ValueError, match="valid names"):
        notebook.run_notebook("00_tour", {"sharring": "es"}, tmp_path)
    assert not (tmp_path / "00_tour.ipynb").exists()


def test_parse_value_reads_literals_and_keeps_words():
    assert notebook.parse_value("3") == 3
    assert notebook.parse_value("[1, 2]") == [1, 2]
    assert notebook.parse_value("nes") == "nes"
    assert notebook.parse_value("runs/x") == "runs/x"


# ---------------------------------------------------------------------------------------------- papermill runs


def _summary(out_dir: Path) -> dict:
    assert (out_dir / "summary.json").is_file(), f"no summary.json in {out_dir}"
    return json.loads((out_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("nb01")
    notebook.run_notebook(
        "01_pretrain",
        {
            "steps": 6,
            "batch_size": 4,
            "seq_len": 32,
            "sharing": "nes",
            "corpus": "synthetic:seed=0,words=30000",
        },
        out,
    )
    return out


def test_01_pretrain_writes_a_run_directory(pretrained):
    summary = _summary(pretrained)
    assert summary["sharing"] == "nes" and summary["steps"] == 6 and summary["completed"]
    for name in (
        "metrics.jsonl",
        "embeddings.safetensors",
        "export/discriminator/config.json",
        "figures/curves.png",
    ):
        assert (pretrained / name).is_file(), name
    assert (pretrained / "01_pretrain.ipynb").is_file()  # the executed copy


def test_01_pretrain_losses_start_where_a_random_model_must(pretrained):
    """The independent check behind 01's nbval-checked final MLM loss (a value this code produced): a
    freshly initialised generator (weights ~ N(0, 0.02)) predicts nearly uniformly over the V pieces, so its
    held-out MLM loss is ln V, and the discriminator's logits are near 0, so its RTD loss is ln 2; training
    must then bring the MLM loss below ln V."""
    import math

    from lab.tokenizer import Tokenizer

    vocab = Tokenizer.load(pretrained / "tokenizer" / "spm.model").vocab_size
    rows = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in rows if r["split"] == "eval"]
    assert held[0]["step"] == 0
    assert held[0]["mlm_loss"] == pytest.approx(math.log(vocab), abs=0.1)
    assert held[0]["rtd_loss"] == pytest.approx(math.log(2), abs=0.05)
    assert _summary(pretrained)["final_eval"]["mlm_loss"] < math.log(vocab) - 0.05


def test_tour_parameter_counts_by_hand():
    """00_tour prints (and nbval checks) these counts for the tiny preset with its 868-piece synthetic
    tokenizer. Written out here: a layer is Q, K, V, O (4 x (D*D + D)), the FFN (D*F + F + F*D + D) and two
    LayerNorms (4D); the encoder adds the relative table (2 x 256 buckets x D) and two LayerNorms (4D). The
    same closed form reproduces the official model cards (22M / 44M / 86M / 304M backbones):
    tests/test_model.py::test_preset_parameter_counts_match_the_official_table."""
    from lab.model import preset
    from lab.notebook import tour
    from lab.rtd import RTDModel

    D, F, V = 64, 256, 868
    layer = 4 * (D * D + D) + (D * F + F + F * D + D) + 4 * D  # 49,984
    encoder_extra = 2 * 256 * D + 4 * D  # 33,024
    generator = 1 * layer + encoder_extra + V * D  # half the discriminator's 2 layers
    discriminator = 2 * layer + encoder_extra + V * D
    mlm_head = D * D + D + 2 * D + V  # dense, LayerNorm, output bias over the tied word table
    rtd_head = D * D + D + 2 * D + D + 1  # dense, LayerNorm, one logit
    delta = V * D  # GDES: E_delta; the discriminator reads stopgrad(E_G) + E_delta
    rows = tour.parameter_counts(RTDModel(preset("tiny", vocab_size=V), "gdes"))
    assert [r["total"] for r in rows] == [
        generator,
        discriminator,
        generator + (discriminator - V * D) + delta + mlm_head + rtd_head,
    ]
    assert (generator, discriminator) == (138_560, 188_544)  # what the committed 00_tour shows


def test_00_tour_on_a_trained_run(pretrained, tmp_path):
    from lab.tokenizer import Tokenizer

    notebook.run_notebook(
        "00_tour", {"run_dir": str(pretrained), "text": "hello world", "layer": 1}, tmp_path
    )
    summary = _summary(tmp_path)
    assert summary["model"] == str(pretrained)
    assert summary["terms"] == ["c2c", "c2p", "p2c"]
    # the run's own tokenizer pieces, plus [CLS] and [SEP]: the tour encodes with the run's tokenizer
    tokenizer = Tokenizer.load(pretrained / "tokenizer" / "spm.model")
    assert summary["tokens"] == len(tokenizer.encode("hello world")) + 2
    for name in ("rtd.png", "attention_terms.png", "widget_rtd.png", "widget_attention.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), name
    # what the widgets drew, as the executed notebook keeps it: images, never a Figure's text repr
    # (a pyplot-free Figure passed to display() from a widget shows as '<Figure size 630x180 ...>')
    executed = json.loads((tmp_path / "00_tour.ipynb").read_text())
    states = executed["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    shown = [o for m in states.values() if m["model_name"] == "OutputModel" for o in m["state"]["outputs"]]
    assert [sorted(o["data"]) for o in shown] == [["image/png", "text/plain"]] * 2
    assert not any("<Figure size" in json.dumps(o) for o in shown)


def test_02_tug_of_war_on_fabricated_runs(tmp_path):
    """The made-up curves make ES the slowest learner; here ES's MLM curve is halved, so it is the
    fastest and the claim "ES has the highest MLM loss" must come out False (its True side is covered in
    tests/test_analysis.py on the unmodified curves)."""
    from test_analysis import fabricate_run

    runs = {m: fabricate_run(tmp_path / m, m, seed=i) for i, m in enumerate(("es", "nes", "gdes"))}
    metrics = runs["es"] / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for row in rows:
        if row["split"] in ("train", "eval"):
            row["mlm_loss"] *= 0.5
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    notebook.run_notebook(
        "02_tug_of_war", {"runs": {m: str(p) for m, p in runs.items()}}, tmp_path / "report"
    )
    summary = _summary(tmp_path / "report")
    final = summary["final_smoothed_mlm_loss"]
    assert final["es"] < min(final["nes"], final["gdes"])
    assert summary["paper_claims"]["es_mlm_loss_highest"] is False
    assert set(summary["embedding_cosine"]) == {"es", "nes", "gdes"}
    assert "mlm_loss.png" in summary["files"] and "class_separation.svg" in summary["files"]


def test_03_downstream_on_the_fixture_glue(pretrained, tmp_path):
    notebook.run_notebook(
        "03_downstream", {"init": str(pretrained), "tasks": ["sst2"], "max_train_examples": 8}, tmp_path
    )
    summary = _summary(tmp_path)
    assert summary["tasks"] == ["sst2"]
    assert summary["checkpoints"] == [pretrained.name]
    # the fixture's SST-2 dev set has two sentences: 0, 1 or 2 right is 0, 50 or 100 percent (a score
    # left as a fraction, or computed on the 5 training rows, would not be one of these)
    assert summary["scores"][pretrained.name]["sst2"] in (0.0, 50.0, 100.0)
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "results.png").is_file()


@pytest.mark.slow
def test_sweep_runs_three_modes_then_the_report(tmp_path, capsys):
    args = [
        "--pretrain.corpus",
        "synthetic:seed=0,words=30000",
        "--pretrain.preset",
        "tiny",
        "--pretrain.steps",
        "4",
        "--pretrain.batch-size",
        "4",
        "--pretrain.seq-len",
        "32",
        "--out-dir",
        str(tmp_path),
    ]
    assert notebook.cli_sweep(args) == 0
    for mode in ("es", "nes", "gdes"):
        assert _summary(tmp_path / mode)["sharing"] == mode
    report = _summary(tmp_path / "tug_of_war")
    assert set(report["embedding_cosine"]) == {"es", "nes", "gdes"}
    assert str(tmp_path / "tug_of_war") in capsys.readouterr().out
