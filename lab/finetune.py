"""GLUE fine-tuning of a pre-trained discriminator, and the results table that compares checkpoints.

    train(FinetuneConfig(task="mrpc", init="runs/gdes", out_dir="runs/ft/gdes/mrpc"))  -> results dict
    python -m lab finetune --task mrpc --init runs/gdes --out runs/ft/gdes/mrpc --seeds 1,2,3
    python -m lab finetune --table runs/ft --table-out figures/glue_results

Head (PAPER.md §6): pooled = gelu(Dense(h_CLS)), logits = Linear(dropout(pooled)); cross-entropy,
or MSE on a single output for STS-B. Inputs are `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, the
longer side of a pair truncated first. AdamW (no decay on biases and LayerNorm), linear warmup then
linear decay, grad-norm clip 1.0, dev evaluation after every epoch; each seed reports the epoch with
the best main metric (and that state is the one kept). Batches are padded to their own longest row;
evaluation batches are sorted by length so little padding is computed.

Defaults per task (`TASK_DEFAULTS`) start from the official DeBERTaV3-large recipe and are scaled
for the small models this workbench trains:
  * learning rate x6: the official small/xsmall MNLI rate is 4.5e-5 against 7e-6 for large;
  * at least 3 epochs (the small-model MNLI recipe uses 3 where large uses 2);
  * warmup as a fraction of all steps (10%) instead of the paper's step counts, which assume the full
    training sets and would swallow a whole run on a `max_train_examples` slice;
  * batch size, head dropout and max length as in the paper (max length is capped by the model's).
Every default can be overridden in `FinetuneConfig`; `results.json` records the values used.

Outputs in `out_dir`: config.json, metrics.jsonl (one row per seed and epoch), results.json
({task, init, metrics_per_seed, mean, median, std, n_dev_examples, config}).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lab import glue
from lab.model import Encoder, init_weights
from lab.tokenizer import Tokenizer
from lab.util import append_jsonl, atomic_write_json, pick_device, replace_strict

# Official DeBERTaV3-large recipe (PAPER.md §6): epochs, warmup steps, lr, batch, head dropout, max len.
PAPER_RECIPE = {
    "mnli": (2, 500, 7e-6, 64, 0.3, 256),
    "qqp": (6, 1000, 1e-5, 64, 0.2, 320),
    "qnli": (6, 200, 7e-6, 64, 0.2, 512),
    "sst2": (8, 500, 6e-6, 32, 0.1, 128),
    "cola": (10, 50, 5.5e-6, 32, 0.1, 64),
    "stsb": (4, 50, 7e-6, 32, 0.1, 128),
    "rte": (6, 50, 1e-5, 32, 0.3, 320),
    "mrpc": (6, 50, 6e-6, 32, 0.2, 128),
    "wnli": (6, 50, 6e-6, 32, 0.1, 128),  # not in the paper's table; MRPC-like settings
}
LR_SCALE = 6.0  # small-model rate / large-model rate in the official MNLI recipes (4.5e-5 / 7e-6)
TASK_DEFAULTS = {
    task: {"epochs": max(epochs, 3), "lr": lr * LR_SCALE, "batch_size": batch, "head_dropout": dropout,
           "max_seq_len": max_len}
    for task, (epochs, _warmup, lr, batch, dropout, max_len) in PAPER_RECIPE.items()
}  # fmt: skip

# GLUE dev results from PAPER.md §5, in percent, main metric of each task (MNLI: matched).
PAPER_RESULTS = {
    "DeBERTaV3-large (paper)": {"cola": 75.3, "sst2": 96.9, "mrpc": 92.2, "stsb": 93.0, "qqp": 93.0,
                                "mnli": 91.8, "qnli": 96.0, "rte": 92.7},
    "DeBERTaV3-base (paper)": {"mnli": 90.6},
    "DeBERTaV3-small (paper)": {"mnli": 88.3},
    "DeBERTaV3-xsmall (paper)": {"mnli": 88.1},
    "ELECTRA-Small re-impl. (paper)": {"cola": 58.7, "sst2": 88.0, "mrpc": 86.0, "stsb": 86.2, "qqp": 88.6,
                                       "mnli": 80.4, "qnli": 87.5, "rte": 67.5},
}  # fmt: skip


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = "mrpc"  # GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli
    glue_dir: str = ""  # GLUE root with <TASK>/train.tsv ...; "" = $LAB_DATA_DIR/glue
    init: str = ""  # pre-training run dir (uses export/discriminator/), HF-format dir, or hub name
    out_dir: str = "runs/finetune"  # where config.json, metrics.jsonl and results.json go
    epochs: int | None = None  # None = task default (TASK_DEFAULTS)
    lr: float | None = None  # peak learning rate; None = task default
    batch_size: int | None = None  # None = task default
    warmup_steps: int | None = None  # linear warmup steps; None = warmup_ratio of all steps
    warmup_ratio: float = 0.1  # used when warmup_steps is None
    weight_decay: float = 0.01  # AdamW decay, not applied to biases and LayerNorm
    head_dropout: float | None = None  # dropout before the output layer; None = task default
    max_seq_len: int | None = None  # tokens incl. [CLS]/[SEP]; None = task default, capped by the model
    seeds: tuple[int, ...] = (1,)  # one fine-tuning run per seed (head init + batch order)
    max_train_examples: int | None = None  # a fixed random slice (same for every seed); None = all
    max_eval_examples: int | None = None  # per dev split; None = all
    eval_batch_size: int = 128
    grad_clip: float = 1.0  # global grad-norm clip
    device: str = "auto"  # "auto" = cuda if available, else cpu
    bf16: bool = True  # bf16 autocast on CUDA (losses in fp32); ignored on CPU

    def __post_init__(self) -> None:
        glue.get_task(self.task)  # raises on unknown tasks, listing the known ones
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds:
            raise ValueError("FinetuneConfig.seeds is empty; give at least one seed, e.g. (1,)")
        positive = ("epochs", "lr", "batch_size", "max_seq_len", "max_train_examples", "max_eval_examples")
        for name in (*positive, "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(
                    f"FinetuneConfig.{name} must be positive (or None for the default), got {value}"
                )
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"FinetuneConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("warmup_ratio", "head_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"FinetuneConfig.{name} must be in [0, 1), got {value}")

    def resolved(self) -> FinetuneConfig:
        """The config with every None replaced by the task's default."""
        task = glue.get_task(self.task).name
        defaults = {k: v for k, v in TASK_DEFAULTS[task].items() if getattr(self, k) is None}
        return replace_strict(self, task=task, **defaults)


# ---------------------------------------------------------------------------------------------- model


class Classifier(nn.Module):
    """Encoder + the official GLUE head on the [CLS] state."""

    def __init__(self, encoder: Encoder, num_labels: int, head_dropout: float):
        super().__init__()
        D = encoder.cfg.hidden_size
        self.encoder = encoder
        self.dense = nn.Linear(D, D)
        self.dropout = nn.Dropout(head_dropout)
        self.out = nn.Linear(D, num_labels)
        for module in (self.dense, self.out):
            init_weights(module, encoder.cfg.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids, attention_mask)[:, 0]  # [B, D], the [CLS] position
        pooled = F.gelu(self.dense(h))
        return self.out(self.dropout(pooled))  # [B, num_labels]


def resolve_init(init: str) -> tuple[Path, Path]:
    """(HF-format model dir, spm.model) for a pre-training run dir, an HF-format dir, or a hub name."""
    from lab import hf

    if not init:
        raise ValueError(
            "FinetuneConfig.init is empty; pass a pre-training run dir, an HF-format dir or a hub name"
        )
    path = Path(init).expanduser()
    if (path / "export" / "discriminator" / "config.json").is_file():  # a lab pre-training run
        model_dir = path / "export" / "discriminator"
        candidates = [model_dir / "spm.model", path / "tokenizer" / "spm.model"]
    elif (path / "summary.json").is_file() or (path / "checkpoints").is_dir():
        raise ValueError(
            f"pre-training run {path} has no export/discriminator/; finish (or re-export) the run first"
        )
    else:
        model_dir = hf.resolve(init)  # an HF-format dir, or a hub download; clear errors otherwise
        candidates = [model_dir / "spm.model"]
    for spm_path in candidates:
        if spm_path.is_file():
            return model_dir, spm_path
    raise ValueError(f"no tokenizer for {init}: looked for {', '.join(map(str, candidates))}")


def load_encoder(init: str) -> tuple[Encoder, Tokenizer]:
    """The pre-trained encoder and its tokenizer, checked to agree on the vocabulary."""
    from lab import hf

    model_dir, spm_path = resolve_init(init)
    tokenizer = Tokenizer.load(spm_path)
    encoder = hf.from_pretrained(model_dir)
    if encoder.cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"{model_dir} has {encoder.cfg.vocab_size} embedding rows but its tokenizer {spm_path} produces "
            f"ids up to {tokenizer.vocab_size - 1}; use the tokenizer the checkpoint was pre-trained with"
        )
    return encoder, tokenizer


# ---------------------------------------------------------------------------------------------- data


def encode_split(split: glue.GlueSplit, tokenizer: Tokenizer, max_len: int) -> list[list[int]]:
    """`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, at most max_len ids; the longer side loses tokens first."""
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    texts_a = tokenizer.encode_batch(split.texts_a)
    if split.texts_b is None:
        return [[cls, *a[: max_len - 2], sep] for a in texts_a]
    rows = []
    for a, b in zip(texts_a, tokenizer.encode_batch(split.texts_b)):
        excess = len(a) + len(b) - (max_len - 3)
        if excess > 0:  # cut the longer side down to the shorter, then both alternately (HF longest_first)
            cut_a = min(excess, max(0, len(a) - len(b)))
            cut_b = min(excess - cut_a, max(0, len(b) - len(a)))
            rest = excess - cut_a - cut_b
            cut_a, cut_b = cut_a + (rest + 1) // 2, cut_b + rest // 2
            a, b = a[: len(a) - cut_a], b[: len(b) - cut_b]
        rows.append([cls, *a, sep, *b, sep])
    return rows


def pad_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest row of this batch: input_ids [B, T], attention_mask [B, T]."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def predict(model: Classifier, rows: list[list[int]], cfg: FinetuneConfig, device, pad_id: int) -> np.ndarray:
    """Logits for every row [N, C], computed in length-sorted batches and returned in input order."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = np.zeros((len(rows), model.out.out_features), dtype=np.float32)
    for start in range(0, len(order), cfg.eval_batch_size):
        idx = order[start : start + cfg.eval_batch_size]
        ids, mask = pad_batch([rows[i] for i in idx], pad_id)
        with _autocast(device, cfg):
            logits = model(ids.to(device), mask.to(device))
        out[idx] = logits.float().cpu().numpy()
    return out


def _autocast(device: torch.device, cfg: FinetuneConfig):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")


# ---------------------------------------------------------------------------------------------- training


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (no_decay if isinstance(module, nn.LayerNorm) or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def finetune_seed(cfg, seed, task, encoder, train_rows, train_labels, dev, pad_id, device):
    """One fine-tuning run from a copy of `encoder`: (model in its best-dev state, best metrics, history)."""
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(encoder), task.num_labels, cfg.head_dropout).to(device)
    opt = _optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, total))
    labels = torch.tensor(train_labels, dtype=torch.float if task.is_regression else torch.long)
    key = glue.main_metric(task.name)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, best_score, history = None, None, -math.inf, []
    bar = tqdm(total=total, desc=f"{task.name} seed {seed}", leave=False, disable=None)
    t0 = time.time()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses = []
        for idx in torch.randperm(len(train_rows), generator=generator).split(cfg.batch_size):
            ids, mask = pad_batch([train_rows[i] for i in idx], pad_id)
            with _autocast(device, cfg):
                logits = model(ids.to(device), mask.to(device)).float()  # [B, C]
            y = labels[idx].to(device)
            loss = F.mse_loss(logits[:, 0], y) if task.is_regression else F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        per_split = {}
        for split, (rows, gold) in dev.items():
            logits = predict(model, rows, cfg, device, pad_id)
            per_split[split] = (logits[:, 0] if task.is_regression else logits.argmax(1), gold)
        metrics = glue.dev_metrics(task.name, per_split)
        row = {"seed": seed, "epoch": epoch, "step": epoch * steps_per_epoch,
               "train_loss": float(np.mean(losses)), "elapsed_s": time.time() - t0, **metrics}  # fmt: skip
        history.append(row)
        score = metrics[key] if math.isfinite(metrics[key]) else -math.inf  # constant predictions give nan
        if best is None or score > best_score:
            best_score = score
            best = {**metrics, "best_epoch": epoch}
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        bar.write(f"{task.name} seed {seed} epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} {shown} "
                  f"(best {key} {best[key]:.4f} @ {best['best_epoch']}) {row['elapsed_s']:.1f}s")  # fmt: skip
    bar.close()
    model.load_state_dict(best_state)
    return model, best, history


def _summary(per_seed: list[dict]) -> tuple[dict, dict, dict]:
    """mean, median and std (sample std, 0 for one seed) of every metric across seeds."""
    keys = [k for k in per_seed[0] if k not in ("seed", "best_epoch")]
    values = {k: np.array([m[k] for m in per_seed], dtype=float) for k in keys}
    mean = {k: float(v.mean()) for k, v in values.items()}
    median = {k: float(np.median(v)) for k, v in values.items()}
    std = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
    return mean, median, std


def train(cfg: FinetuneConfig) -> dict:
    """Fine-tune `cfg.init` on `cfg.task` once per seed; writes and returns results.json's content."""
    cfg = cfg.resolved()
    task = glue.get_task(cfg.task)
    glue_dir = cfg.glue_dir or None
    # Data and checkpoint errors surface before any training starts.
    splits = glue.load_task(task.name, glue_dir)
    encoder, tokenizer = load_encoder(cfg.init)
    max_len = min(cfg.max_seq_len, encoder.cfg.max_seq_len)
    train_split = splits["train"].take(cfg.max_train_examples)
    train_rows = encode_split(train_split, tokenizer, max_len)
    dev = {}
    for split in task.dev_splits:
        part = splits[split].take(cfg.max_eval_examples)
        dev[split] = (encode_split(part, tokenizer, max_len), np.asarray(part.labels))
    device = pick_device(cfg.device)

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", dataclasses.asdict(cfg))
    (out / "metrics.jsonl").unlink(missing_ok=True)
    per_seed = []
    for seed in cfg.seeds:
        _, best, history = finetune_seed(cfg, seed, task, encoder, train_rows, train_split.labels, dev,
                                         tokenizer.pad_id, device)  # fmt: skip
        for row in history:
            append_jsonl(out / "metrics.jsonl", row)
        per_seed.append({"seed": seed, **best})
    mean, median, std = _summary(per_seed)
    results = {
        "task": task.name,
        "init": cfg.init,
        "main_metric": glue.main_metric(task.name),
        "metrics_per_seed": per_seed,
        "mean": mean,
        "median": median,
        "std": std,
        "n_train_examples": len(train_rows),
        "n_dev_examples": sum(len(rows) for rows, _ in dev.values()),
        "config": dataclasses.asdict(cfg),
    }
    atomic_write_json(out / "results.json", results)
    return results


# ---------------------------------------------------------------------------------------------- results table


def checkpoint_label(init: str) -> str:
    """A short row name for a checkpoint: the run dir's name, or the hub/dir name."""
    path = Path(init)
    if path.name == "discriminator" and path.parent.name == "export":
        return path.parent.parent.name
    return path.name or str(init)


def results_table(
    paths, out_stem: str | Path = "figures/glue_results", include_paper: bool = True
) -> list[dict]:
    """Collect results.json files (or folders searched for them) into one table of main metrics in percent.

    Rows are checkpoints (plus the paper's rows), columns are tasks; writes `<out_stem>.csv` (mean and
    std per task) and `<out_stem>.png` (grouped bars), and returns the rows.
    """
    files = []
    for p in [paths] if isinstance(paths, str | Path) else paths:
        p = Path(p)
        files += sorted(p.rglob("results.json")) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"no results.json found in {paths}; run `python -m lab finetune ...` first")
    by_label: dict[str, dict] = {}
    for f in files:
        r = json.loads(Path(f).read_text())
        key = r["main_metric"]
        row = by_label.setdefault(checkpoint_label(r["init"]), {"checkpoint": checkpoint_label(r["init"]),
                                                                "source": "ours"})  # fmt: skip
        row[r["task"]] = 100 * r["mean"][key]
        row[f"{r['task']}_std"] = 100 * r["std"][key]
        row[f"{r['task']}_seeds"] = len(r["metrics_per_seed"])
    rows = list(by_label.values())
    if include_paper:
        rows += [{"checkpoint": name, "source": "paper", **scores} for name, scores in PAPER_RESULTS.items()]
    tasks = [t for t in glue.TASKS if any(t in r for r in rows if r["source"] == "ours")] or list(glue.TASKS)
    columns = ["checkpoint", "source"] + [c for t in tasks for c in (t, f"{t}_std", f"{t}_seeds")]

    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    with open(out_stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {c: (f"{row[c]:.2f}" if isinstance(row.get(c), float) else row.get(c, "")) for c in columns}
            )
    _plot_table(rows, tasks, out_stem.with_suffix(".png"))
    return rows


def _plot_table(rows: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if any(t in r for t in tasks)]
    width = 0.8 / max(1, len(shown))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(shown)) ** 0.5), 4))
    for i, row in enumerate(shown):
        xs = [j + i * width for j, t in enumerate(tasks) if t in row]
        ys = [row[t] for t in tasks if t in row]
        err = [row.get(f"{t}_std", 0.0) for t in tasks if t in row]
        ax.bar(
            xs, ys, width, yerr=err, label=row["checkpoint"], hatch="//" if row["source"] == "paper" else None
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
    ax.set_xticklabels([f"{t}\n({glue.main_metric(t)})" for t in tasks])
    ax.set_ylabel("GLUE dev score (%)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_table(
    tasks, inits, seeds=(1, 2, 3), out_dir="runs/glue", out_stem="figures/glue_results", **overrides
):
    """Fine-tune every init on every task (results in out_dir/<checkpoint>/<task>/), then `results_table`."""
    for init in inits:
        for task in tasks:
            name = glue.get_task(task).name
            run_out = Path(out_dir) / checkpoint_label(init) / name
            train(
                FinetuneConfig(
                    task=name, init=str(init), seeds=tuple(seeds), out_dir=str(run_out), **overrides
                )
            )
    return results_table(out_dir, out_stem)


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab finetune", description=__doc__.split("\n")[0])
    p.add_argument("--task", help="GLUE task, or a comma list (cola,sst2,...) to fine-tune each")
    p.add_argument(
        "--init", action="append", help="run dir / HF dir / hub name; repeat to compare checkpoints"
    )
    p.add_argument("--out", help="output dir (with several tasks or inits: the root of <checkpoint>/<task>/)")
    p.add_argument("--glue-dir", default="", help="GLUE root (default $LAB_DATA_DIR/glue)")
    p.add_argument("--seeds", default="1", help="comma list, e.g. 1,2,3")
    for flag, kind in [("epochs", int), ("lr", float), ("batch-size", int), ("warmup-steps", int),
                       ("warmup-ratio", float), ("weight-decay", float), ("head-dropout", float),
                       ("max-seq-len", int), ("max-train-examples", int), ("max-eval-examples", int),
                       ("eval-batch-size", int)]:  # fmt: skip
        p.add_argument(f"--{flag}", type=kind)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-bf16", action="store_true", help="run in fp32 on CUDA too")
    p.add_argument(
        "--table", nargs="+", metavar="DIR", help="only collect results.json under DIR(s) into a table"
    )
    p.add_argument("--table-out", default="figures/glue_results", help="stem of the table's .csv and .png")
    return p


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)  # unknown flags exit with status 2 and a usage message
    if args.table:
        rows = results_table(args.table, args.table_out)
        print(f"wrote {args.table_out}.csv and .png ({len(rows)} rows)")
        return 0
    if not args.task or not args.init or not args.out:
        _parser().error("--task, --init and --out are required (or --table DIR to build a table)")
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("task", "init", "out", "glue_dir", "seeds", "device", "no_bf16", "table", "table_out")
                 and v is not None}  # fmt: skip
    common = dict(glue_dir=args.glue_dir, device=args.device, bf16=not args.no_bf16, **overrides)
    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    tasks = [t for t in args.task.split(",") if t.strip()]
    try:
        if len(tasks) == 1 and len(args.init) == 1:
            results = train(
                FinetuneConfig(task=tasks[0], init=args.init[0], out_dir=args.out, seeds=seeds, **common)
            )
            key = results["main_metric"]
            print(f"{results['task']} {key}: mean {results['mean'][key]:.4f} median {results['median'][key]:.4f} "
                  f"std {results['std'][key]:.4f} over {len(seeds)} seed(s) -> {args.out}/results.json")  # fmt: skip
        else:
            run_table(tasks, args.init, seeds, out_dir=args.out, out_stem=args.table_out, **common)
            print(f"wrote {args.table_out}.csv and .png")
    except ValueError as err:
        print(f"error: {err}")
        return 1
    return 0
