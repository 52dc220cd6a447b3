"""The time-lapse explorer (lab/notebook/explorer.py): frame alignment, the per-step numbers, the widget's PNGs, the GIF."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lab.analysis.tug_of_war import class_separation
from lab.notebook import explorer
from lab.pretrain.snapshots import choose_ids, snapshot_path

STEPS = (0, 10, 20, 30, 40)


def fabricate_snapshots(run_dir, steps=STEPS, rows=200):
    """Snapshots for a fabricated run (tests/test_analysis.py's fabricate_run): the tables at step s are
    the run's final tables blended with a random start, s / last of the way there."""
    final = load_file(str(run_dir / "embeddings.safetensors"))
    ids = choose_ids(np.load(run_dir / "token_counts.npy"), set(range(5)), rows)
    g = torch.Generator().manual_seed(0)
    start = {k: 0.02 * torch.randn(len(ids), v.shape[1], generator=g) for k, v in final.items()}
    for step in steps:
        w = step / steps[-1]
        tables = {k: (w * v[ids] + (1 - w) * start[k]).half() for k, v in final.items()}
        path = snapshot_path(run_dir, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({**tables, "ids": torch.tensor(ids)}, str(path))
    (run_dir / "embeddings" / "ids.json").write_text(json.dumps({"ids": ids}))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from test_analysis import fabricate_run

    root = tmp_path_factory.mktemp("runs")
    return {
        m: fabricate_snapshots(fabricate_run(root / m, m, seed=i))
        for i, m in enumerate(("es", "nes", "gdes"))
    }


# ---------------------------------------------------------------------------------------------- alignment


def test_identical_frames_give_the_identity():
    frame = np.random.default_rng(0).normal(size=(50, 2))
    np.testing.assert_allclose(explorer.procrustes(frame, frame), np.eye(2), atol=1e-12)
    first, second = explorer.aligned_frames([frame, frame.copy()])
    np.testing.assert_allclose(second, first, atol=1e-12)


@pytest.mark.parametrize("reflect", [False, True])
def test_a_rotated_frame_is_recovered(reflect):
    rng = np.random.default_rng(1)
    frame = rng.normal(size=(60, 2)) * [3.0, 1.0]
    angle = 1.1
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    if reflect:  # PCA's axes come with arbitrary signs: a reflection must be undone as well
        turn = turn @ np.diag([1.0, -1.0])
    _, recovered = explorer.aligned_frames([frame, frame @ turn])
    np.testing.assert_allclose(recovered, frame, atol=1e-10)


def test_a_table_turned_in_d_dimensions_gives_the_same_frame():
    """PCA sees the table only up to an orthogonal map; Procrustes then removes PCA's own turn and flips."""
    rng = np.random.default_rng(2)
    table = rng.normal(size=(80, 16)) * np.linspace(3, 0.5, 16)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    frames = explorer.aligned_frames([explorer.pca_2d(table), explorer.pca_2d(table @ q)])
    np.testing.assert_allclose(frames[1], frames[0], atol=1e-8)


# ---------------------------------------------------------------------------------------------- the numbers


def test_timeline_titles_carry_the_tables_numbers_at_each_step(runs):
    timeline = explorer.load_timeline("nes", runs["nes"])
    assert timeline.steps == list(STEPS)
    assert timeline.colour_by.startswith("latent word class")
    classes = {int(k): v for k, v in json.loads((runs["nes"] / "token_classes.json").read_text()).items()}
    last = load_file(str(snapshot_path(runs["nes"], 40)))
    by_row = {r: classes[i] for r, i in enumerate(last["ids"].tolist()) if i in classes}
    assert timeline.gap["E_G"][-1] == pytest.approx(
        class_separation(last["generator"].float(), by_row)["gap"]
    )
    # the fabricated E_G clusters by class more and more as the blend moves from noise to the final table
    assert timeline.gap["E_G"][0] < 0.05 < timeline.gap["E_G"][-1]
    assert timeline.index(25) == 2 and timeline.index(40) == 4 and timeline.index(-1) == 0


def test_frequency_bands_without_classes(runs, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(runs["gdes"], plain)
    (plain / "token_classes.json").unlink()
    timeline = explorer.load_timeline("gdes", plain)
    assert timeline.colour_by.startswith("frequency band")
    assert sorted(set(timeline.colour.tolist())) == list(range(explorer.BANDS))
    assert all(np.isnan(timeline.gap["E_G"]))


# ---------------------------------------------------------------------------------------------- widget and GIF


def test_the_callback_draws_a_png_and_a_new_one_per_step(runs, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(explorer, "display", lambda *objects: shown.extend(objects))
    box = explorer.explore(runs)
    play, slider = box.children[0].children
    assert list(slider.options) == [(str(s), s) for s in STEPS] or list(slider.options) == list(STEPS)
    assert play.max == len(STEPS) - 1
    slider.value = 40
    assert len(shown) == 2
    for obj in shown:  # a PNG image, never a Figure (whose text repr is '<Figure size ...>')
        assert isinstance(obj, IPython.display.Image) and obj.data.startswith(b"\x89PNG")
    assert shown[0].data != shown[1].data


def test_without_snapshots_the_explorer_says_so(runs, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(runs["es"], bare)
    shutil.rmtree(bare / "embeddings")
    note = explorer.explore({"es": bare})
    assert "No word-table snapshots" in note.data
    assert explorer.write_animation({"es": bare}, tmp_path / "a.gif") is None


def test_animation_is_a_gif_with_a_frame_per_step(runs, tmp_path):
    from PIL import Image

    path = explorer.write_animation(runs, tmp_path / "tug_of_war.gif")
    with Image.open(path) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == len(STEPS)
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
    assert durations == [500] * (len(STEPS) - 1) + [1000]  # 2 frames/s, the last step held twice as long
    assert path.stat().st_size < 3e6
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    # the titles' numbers beside the GIF: a row per mode, table and step, equal to the timelines'
    import csv

    with open(path.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    timelines = explorer.load_timelines(runs)
    assert len(rows) == sum(len(tl.cosine) * len(tl.steps) for tl in timelines.values())
    last = next(r for r in reversed(rows) if r["table"] == "E_G")
    tl = timelines[last["mode"]]
    assert int(last["step"]) == tl.steps[-1]
    assert float(last["avg_cosine"]) == pytest.approx(tl.cosine["E_G"][-1], rel=1e-5)
