"""Helpers for notebooks/00_tour.ipynb: one model, one sentence, and what each part of RTD does to it.

Every view is a plain matplotlib Figure (no pyplot state), so it renders the same in Jupyter, in a
headless papermill run and in a saved PNG. Without pyplot no inline backend registers a PNG formatter
for Figure, so a Figure passed to `display` shows as its text repr (`<Figure size 630x180 with 1 Axes>`);
the widgets therefore show each view as PNG bytes (`figure_png`), never as a Figure.
"""

from __future__ import annotations

import io
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import torch
from IPython.display import Image, display
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import lab.sharing
from lab.analysis.tug_of_war import attention_terms
from lab.model import count_parameters, preset
from lab.notebook.runner import pretrain_config, project_path, relative_path
from lab.pretrain.checkpoint import candidates, load_state
from lab.pretrain.loop import train
from lab.rtd import RTDModel, draw_noise
from lab.synthetic import SyntheticLanguage
from lab.tokenizer import Tokenizer

DEMO_RUN = "runs/demo/gdes"  # `make demo`'s GDES run, relative to the project root
TOUR_CORPUS = "synthetic:seed=0,words=60000"  # enough text for a few hundred steps, tokenised in seconds


def default_run(
    out_dir: str | Path,
    preset_name: str = "tiny",
    sharing: str = "gdes",
    seed: int = 0,
    steps: int = 400,
    demo: str | Path = DEMO_RUN,
) -> tuple[Path, str]:
    """The run the tour shows when it is given none, and a sentence saying which: `make demo`'s GDES run
    when it has a checkpoint, else a `preset_name` model trained now on the synthetic corpus for `steps`
    steps into out_dir/model (~25 s for the tiny one on 2 CPU cores, with a progress bar; a finished run
    there is reused). So the tour's P(replaced) comes from a discriminator that has learnt something."""

    demo = project_path(demo)
    if candidates(demo / "checkpoints"):
        return demo, f"`make demo`'s GDES run ({relative_path(demo)})"
    run = project_path(out_dir) / "model"
    fields = dict(preset=preset_name, sharing=sharing, seed=seed, corpus=TOUR_CORPUS, vocab_size=1000)
    summary = train(pretrain_config(run, steps, batch_size=16, seq_len=64, lr=2e-3, **fields))
    auc = summary["final_eval"]["rtd_auc"]
    return run, (
        f"a {preset_name} {lab.sharing.get(sharing).label} model trained here for {steps} steps on the synthetic corpus "
        f"({relative_path(run)}; `make demo` would provide a longer-trained one); held-out RTD AUC {auc:.2f} (0.5 = chance)"
    )


def load_model(run_dir: str | Path):
    """(RTDModel, Tokenizer) from a run directory's newest good checkpoint."""
    run_dir = Path(run_dir)
    state = load_state(run_dir)
    cfg = state["config"]
    tokenizer = Tokenizer.load(run_dir / "tokenizer" / "spm.model")
    model_cfg = preset(cfg["preset"], vocab_size=tokenizer.vocab_size, max_seq_len=max(cfg["seq_len"], 512))
    model = RTDModel(model_cfg, cfg["sharing"], cfg["gen_depth_ratio"], cfg["gen_width_ratio"], cfg["emd"])
    model.load_state_dict(state["model"])
    return model.eval(), tokenizer


def example_sentence(seed: int = 0) -> str:
    """The first sentence of the synthetic corpus: text the synthetic tokenizer knows."""
    document = next(iter(SyntheticLanguage(seed).documents(200)))
    return document.split(" . ")[0] + " ."


def parameter_counts(model: RTDModel) -> list[dict]:
    """count_parameters for G and D (from their configs) next to the module's actual parameter count."""
    rows = []
    for name in ("generator", "discriminator"):
        encoder = getattr(model, name)
        counts = count_parameters(encoder.cfg)
        rows.append(
            {"part": name, "layers": encoder.cfg.num_layers, "hidden": encoder.cfg.hidden_size, **counts}
        )
    rows.append({"part": "rtd model (all modules)", "total": sum(p.numel() for p in model.parameters())})
    return rows


@torch.no_grad()
def replaced_token_detection(model: RTDModel, tokenizer: Tokenizer, text: str, mask_prob=0.3, seed=0) -> dict:
    """One RTD step on `text`: which tokens were masked, what G sampled, and D's P(replaced) per token."""
    ids = torch.tensor([[tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]])  # [1, T]
    mask = torch.ones_like(ids)
    special = torch.tensor(sorted(tokenizer.special_ids))
    gen = torch.Generator().manual_seed(seed)
    noise = draw_noise(1, ids.shape[1], mask_prob, gen, "cpu")
    out = model(ids, mask, special, tokenizer.mask_id, 1.0, mask_prob, "mask", 1.0, noise)
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[0, out.positions[0][out.valid[0]]] = True
    piece = tokenizer.id_to_piece
    return {
        "tokens": [piece(int(i)) for i in ids[0]],
        "masked": masked[0].tolist(),
        "corrupted": [piece(int(i)) for i in out.corrupted_ids[0]],
        "replaced": out.labels[0].bool().tolist(),
        "p_replaced": torch.sigmoid(out.rtd_logits[0]).tolist(),
    }


def plot_replaced(result: dict):
    """Tokens as boxes coloured by D's P(replaced); masked positions show G's sample underneath."""
    n = len(result["tokens"])
    fig = Figure(figsize=(max(6, 0.9 * n), 1.8))
    ax = fig.subplots()
    cmap = colormaps["Reds"]
    for i, (tok, p) in enumerate(zip(result["tokens"], result["p_replaced"])):
        ax.add_patch(_box(i, cmap(p), edge="k" if result["replaced"][i] else "none"))
        ax.text(i + 0.5, 0.62, tok.replace("▁", ""), ha="center", va="center", fontsize=8)
        ax.text(i + 0.5, 0.32, f"{p:.2f}", ha="center", va="center", fontsize=7)
        if result["masked"][i]:
            ax.text(
                i + 0.5,
                -0.15,
                "→ " + result["corrupted"][i].replace("▁", ""),
                ha="center",
                fontsize=7,
                color="C0",
            )
    ax.set_xlim(0, n)
    ax.set_ylim(-0.35, 1.05)
    ax.axis("off")
    ax.set_title(
        "D's P(replaced) per token (boxed: actually replaced; blue: G's sample at masked slots)", fontsize=9
    )
    return fig


def _box(i, color, edge):
    return Rectangle((i + 0.05, 0.15), 0.9, 0.8, facecolor=color, edgecolor=edge, lw=1.5)


@torch.no_grad()
def attention_decomposition(model: RTDModel, tokenizer: Tokenizer, text: str, side="discriminator", layer=0):
    """c2c / c2p / p2c score terms of one layer of G or D on `text`, per head: numpy [H, T, T] each."""
    encoder = getattr(model, side)
    ids = torch.tensor([[tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]])  # [1, T]
    mask = torch.ones_like(ids)
    word_embeds = model.discriminator_word_embeds(ids) if side == "discriminator" else None
    hidden = [encoder.embed(ids, mask, word_embeds)]
    hidden += encoder(ids, mask, word_embeds, return_all=True)  # the input of layer l is hidden[l]
    rel, index = encoder.relative_positions(ids.shape[1], ids.device)  # [R, D], [2, T, T]
    terms = attention_terms(encoder.layers[layer].attention, hidden[layer], rel, index)
    out = {k: v[0].numpy() for k, v in terms.items()}  # [H, T, T]
    out["tokens"] = [tokenizer.id_to_piece(int(i)).replace("▁", "") for i in ids[0]]
    return out


def plot_attention(terms: dict, max_heads: int = 4):
    """A grid: one row per head, columns c2c, c2p, p2c, and their sum (the pre-softmax scores)."""
    heads = min(max_heads, terms["c2c"].shape[0])
    names = ["c2c", "c2p", "p2c", "sum"]
    fig = Figure(figsize=(3.0 * len(names), 2.8 * heads))
    axes = np.atleast_2d(fig.subplots(heads, len(names)))
    tokens = terms["tokens"]
    for h in range(heads):
        maps = [terms["c2c"][h], terms["c2p"][h], terms["p2c"][h]]
        maps.append(sum(maps))
        for ax, name, m in zip(axes[h], names, maps):
            image = ax.imshow(m, cmap="RdBu_r", vmin=-np.abs(m).max(), vmax=np.abs(m).max())
            ax.set_title(f"head {h}: {name}", fontsize=8)
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def figure_png(fig, path: str | Path | None = None, dpi: int = 100) -> bytes:
    """The figure rendered once as PNG bytes (written to `path` too, when given)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    png = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(png)
    return png


def interactive(model: RTDModel, tokenizer: Tokenizer, text: str, out_dir: Path):
    """Text box + sliders that redraw the RTD and attention views (and save them as PNGs in out_dir)."""
    # continuous_update=False: one redraw when the sentence is submitted (Enter) or a slider is let go,
    # not one per keystroke or slider pixel, each of which would queue a model forward and two figures
    box = widgets.Text(
        value=text, description="sentence", continuous_update=False, layout=widgets.Layout(width="90%")
    )
    prob = widgets.FloatSlider(
        value=0.3, min=0.05, max=0.8, step=0.05, description="mask prob", continuous_update=False
    )
    layer = widgets.IntSlider(
        value=0,
        min=0,
        max=model.discriminator.cfg.num_layers - 1,
        description="D layer",
        continuous_update=False,
    )
    seed = widgets.IntSlider(value=0, min=0, max=20, description="seed", continuous_update=False)
    view = widgets.Output()

    def redraw(_=None):
        view.clear_output(wait=True)
        with view:  # an exception here is shown in the output area, not lost in the kernel log
            rtd = plot_replaced(replaced_token_detection(model, tokenizer, box.value, prob.value, seed.value))
            att = plot_attention(attention_decomposition(model, tokenizer, box.value, layer=layer.value))
            for fig, name in ((rtd, "widget_rtd.png"), (att, "widget_attention.png")):
                display(Image(data=figure_png(fig, Path(out_dir) / name)))

    for w in (box, prob, layer, seed):
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([box, widgets.HBox([prob, layer, seed]), view])
