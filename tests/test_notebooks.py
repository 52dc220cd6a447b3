"""Every notebook runs through papermill with tiny parameters into a temp dir and leaves a summary.json."""

import json
from pathlib import Path

import pytest

from lab import notebook

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["00_tour", "01_pretrain", "02_tug_of_war", "03_downstream"]


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


def test_00_tour_on_a_trained_run(pretrained, tmp_path):
    notebook.run_notebook(
        "00_tour", {"run_dir": str(pretrained), "text": "hello world", "layer": 1}, tmp_path
    )
    summary = _summary(tmp_path)
    assert summary["model"] == str(pretrained)
    assert summary["terms"] == ["c2c", "c2p", "p2c"]
    assert summary["tokens"] >= 3
    for name in ("rtd.png", "attention_terms.png", "widget_rtd.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_02_tug_of_war_on_fabricated_runs(tmp_path):
    from test_analysis import fabricate_run

    runs = {
        f"{m}_run": str(fabricate_run(tmp_path / m, m, seed=i)) for i, m in enumerate(("es", "nes", "gdes"))
    }
    notebook.run_notebook("02_tug_of_war", runs, tmp_path / "report")
    summary = _summary(tmp_path / "report")
    assert summary["paper_claims"]["es_mlm_loss_highest"] is True
    assert set(summary["embedding_cosine"]) == {"es", "nes", "gdes"}
    assert "mlm_loss.png" in summary["files"] and "class_separation.svg" in summary["files"]


def test_03_downstream_on_the_fixture_glue(pretrained, tmp_path):
    notebook.run_notebook(
        "03_downstream", {"init": str(pretrained), "tasks": ["sst2"], "max_train_examples": 8}, tmp_path
    )
    summary = _summary(tmp_path)
    assert summary["tasks"] == ["sst2"]
    assert summary["checkpoints"] == [pretrained.name]
    assert 0.0 <= summary["scores"][pretrained.name]["sst2"] <= 100.0
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "results.png").is_file()


@pytest.mark.slow
def test_sweep_runs_three_modes_then_the_report(tmp_path, capsys):
    args = [
        "--corpus",
        "synthetic:seed=0,words=30000",
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--name",
        str(tmp_path),
    ]
    assert notebook.cli_sweep(args) == 0
    for mode in ("es", "nes", "gdes"):
        assert _summary(tmp_path / mode)["sharing"] == mode
    report = _summary(tmp_path / "tug_of_war")
    assert set(report["embedding_cosine"]) == {"es", "nes", "gdes"}
    assert str(tmp_path / "tug_of_war") in capsys.readouterr().out
