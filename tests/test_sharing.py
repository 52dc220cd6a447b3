"""Sharing modes (lab/sharing.py): the gradient isolation each mode declares, and a fourth mode, written
and registered in this file alone, through pre-training, snapshots, the explorer and the experiment."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_pretrain import tiny_config

from lab import sharing
from lab.analysis import experiment
from lab.analysis.runs import CONTROL
from lab.model import preset
from lab.notebook import explorer
from lab.pretrain.loop import train
from lab.pretrain.snapshots import load_snapshots, snapshot_steps
from lab.rtd import RTDModel
from lab.sharing import SharingMode

SPECIAL = torch.tensor([0, 1, 2, 3])
ROOT = Path(__file__).resolve().parents[1]


class FrozenTable(SharingMode):
    """D reads stopgrad(E_G) and nothing else: GDES without E_delta, so RTD trains no word table."""

    def attach(self, model):
        model.discriminator.word_embeddings = None

    def discriminator_table(self, model):
        return model.generator_table.detach()

    def rtd_table(self, model):
        return None


FROZEN = FrozenTable("frozen", "frozen E_G", "C3")


@pytest.fixture(scope="module")
def frozen():
    """FROZEN registered for this module's tests, the registry as it was afterwards."""
    before = dict(sharing.REGISTRY)
    sharing.register(FROZEN)
    yield FROZEN
    sharing.REGISTRY.clear()
    sharing.REGISTRY.update(before)


def tiny_rtd(name):
    torch.manual_seed(0)
    return RTDModel(preset("tiny", hidden_dropout=0.0, attention_dropout=0.0), name)


def packed_batch(B=4, T=32, vocab=999):
    ids = torch.randint(4, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 1, 2
    return ids, torch.ones_like(ids)


def grad_norm(loss, table) -> float:
    """|d loss / d table|, 0 where the loss does not reach the table."""
    (g,) = torch.autograd.grad(loss, [table], retain_graph=True, allow_unused=True)
    return 0.0 if g is None else g.norm().item()


# ---------------------------------------------------------------------------------------------- the declarations


def check_declared_isolation(model: RTDModel) -> None:
    """What each loss reaches is what the model's mode declares: MLM trains E_G and no table of D's side;
    RTD trains the mode's rtd_table, and E_G only when the mode shares it."""
    mode = model.sharing
    out = model(*packed_batch(), SPECIAL, 999)
    E_G, own = model.generator_table, mode.rtd_table(model)
    assert grad_norm(out.mlm_loss, E_G) > 0
    assert (grad_norm(out.rtd_loss, E_G) > 0) == mode.shares_generator_table
    if own is not None:
        assert grad_norm(out.rtd_loss, own) > 0
        assert (grad_norm(out.mlm_loss, own) > 0) == (own is E_G)  # MLM never reaches D's own table
    # D's forward reads the rows of the table that is snapshotted and exported
    ids = out.corrupted_ids
    torch.testing.assert_close(model.discriminator_word_embeds(ids), model.discriminator_table()[ids])


@pytest.mark.parametrize("name", sharing.names())
def test_each_mode_isolates_the_gradients_it_declares(name):
    check_declared_isolation(tiny_rtd(name))


def test_es_shares_one_table_that_both_losses_update():
    model = tiny_rtd(sharing.ES.name)
    assert model.discriminator.word_embeddings is model.generator.word_embeddings
    assert model.sharing.rtd_table(model) is model.generator_table


def test_nes_tables_are_two_parameters():
    model = tiny_rtd(sharing.NES.name)
    assert model.sharing.rtd_table(model) is model.discriminator.word_embeddings.weight
    assert model.discriminator_table() is not model.generator_table


def test_gdes_reads_the_generator_table_plus_a_zero_residual():
    """E_G gets no RTD gradient and E_delta no MLM gradient (test above); E_delta starts at zero, so at
    initialisation D reads exactly G's table, and the delta is the one extra table exported."""
    model = tiny_rtd(sharing.GDES.name)
    delta = model.embedding_delta
    assert model.sharing.rtd_table(model) is delta
    assert torch.count_nonzero(delta) == 0
    torch.testing.assert_close(model.discriminator_table(), model.generator_table)
    assert set(model.exported_tables()) == {"generator", "discriminator", "delta"}


def test_the_isolation_check_catches_a_mode_that_lies():
    """A mode declaring ES's table unshared fails the check: the check can fail."""
    liar = sharing.SharedTable("liar", "liar", "C4", shares_generator_table=False)
    model = tiny_rtd(sharing.ES.name)
    model.sharing = liar
    with pytest.raises(AssertionError):
        check_declared_isolation(model)


def test_registry_refuses_a_taken_name_and_names_the_modes_for_an_unknown_one():
    with pytest.raises(ValueError, match="registered already"):
        sharing.register(sharing.SharedTable("gdes", "GDES again", "C5"))
    with pytest.raises(ValueError, match="'es', 'nes', 'gdes'"):
        sharing.get("tied")


# ---------------------------------------------------------------------------------------------- a fourth mode


def test_a_mode_registered_here_isolates_its_gradients(frozen):
    model = tiny_rtd(frozen.name)
    check_declared_isolation(model)
    assert model.discriminator_own_table() is None
    assert [n for n, _ in model.named_parameters() if "word_embeddings" in n] == [
        "generator.word_embeddings.weight"
    ]


@pytest.fixture(scope="module")
def frozen_run(frozen, tmp_path_factory):
    out = tmp_path_factory.mktemp("frozen")
    train(tiny_config(out, sharing=frozen.name))  # 8 steps, probe and snapshot every 2
    return out


def test_a_mode_registered_here_pre_trains_snapshots_and_exports(frozen_run):
    summary = json.loads((frozen_run / "summary.json").read_text())
    assert summary["completed"] and summary["sharing"] == "frozen"
    assert snapshot_steps(frozen_run) == [0, 2, 4, 6, 8]
    snapshots = load_snapshots(frozen_run)
    for snap in snapshots.values():  # D reads E_G itself, and there is no delta
        assert set(snap) == {"generator", "discriminator", "ids"}
        assert torch.equal(snap["generator"], snap["discriminator"])
    assert not torch.equal(snapshots[0]["generator"], snapshots[8]["generator"])  # MLM trained E_G
    # the exported discriminator's word table is the generator's final one, under the normal name
    disc = load_file(str(frozen_run / "export" / "discriminator" / "model.safetensors"))
    gen = load_file(str(frozen_run / "export" / "generator" / "model.safetensors"))
    name = next(k for k in disc if k.endswith("word_embeddings.weight"))
    torch.testing.assert_close(disc[name], gen[name])
    # the probe: RTD trains no word table, so no conflict to measure and nothing on E_G
    probes = [json.loads(line) for line in (frozen_run / "metrics.jsonl").open()]
    probes = [r for r in probes if r["split"] == "probe"]
    assert probes and all(math.isnan(r["grad_cos"]) and r["rtd_grad_on_generator"] == 0 for r in probes)


def test_a_mode_registered_here_has_an_explorer_frame(frozen, frozen_run):
    timelines = explorer.load_timelines({frozen.name: frozen_run})
    assert timelines[frozen.name].steps == [0, 2, 4, 6, 8]
    fig = explorer.frame_figure(timelines, 4)
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("frozen E_G E_D") for t in titles)
    legend = fig.axes[-1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["frozen E_G"]


def test_a_mode_registered_here_goes_through_the_experiment(frozen, tmp_path):
    cfg = experiment.recipe(
        "smoke",
        out_dir=str(tmp_path / "exp"),
        modes=(sharing.GDES.name, frozen.name),
        tasks=("synth_tag",),
        pretrain_seeds=(0,),
        finetune_seeds=(1,),
        progress="none",
        **{"finetune.glue_dir": str(ROOT / "tests" / "fixtures" / "glue")},
    )
    summary = experiment.run(cfg)
    rows = summary["tug_of_war"]["summary"]
    cos = {r["mode"]: r for r in rows if r["quantity"] == "cos_E_G"}
    assert set(cos) == {"gdes", "frozen"} and all(r["n"] == 1 for r in cos.values())
    # the untrained control fine-tunes beside the modes; it is not a sharing mode
    assert {r["mode"] for r in summary["downstream"]["table"]} == {"gdes", "frozen", CONTROL}
    assert CONTROL not in sharing.names()
    report = Path(cfg.out_dir) / "report"
    assert "frozen" in (report / "tug_of_war_summary.md").read_text()
    assert (report / "README.md").is_file()
