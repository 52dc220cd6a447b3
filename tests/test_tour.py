"""The tour's default model (lab/notebook/tour.py): trained, never a random initialisation."""

import torch

from lab.model import preset
from lab.notebook import tour
from lab.rtd import RTDModel


def test_the_tour_default_is_a_trained_model(tmp_path):
    run, used = tour.default_run(tmp_path / "tour", steps=6, demo=tmp_path / "no-demo-here")
    assert run == tmp_path / "tour" / "model" and "trained here for 6 steps" in used
    model, tokenizer = tour.load_model(run)
    torch.manual_seed(0)  # the initialisation the run started from (PretrainConfig.seed = 0)
    fresh = RTDModel(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=512), "gdes")
    assert not torch.equal(model.generator_table, fresh.generator_table)
    assert model.embedding_delta.abs().max() > 0  # E_delta starts at zero: RTD has trained it
    # a second call reuses the finished run instead of training again
    again, _ = tour.default_run(tmp_path / "tour", steps=6, demo=tmp_path / "no-demo-here")
    assert again == run


def test_the_tour_shows_the_demo_run_when_there_is_one(tmp_path):
    demo, _ = tour.default_run(tmp_path / "first", steps=2, demo=tmp_path / "no-demo-here")
    run, used = tour.default_run(tmp_path / "second", demo=demo)
    assert run == demo and "make demo" in used
    assert not (tmp_path / "second" / "model").exists()  # nothing trained
