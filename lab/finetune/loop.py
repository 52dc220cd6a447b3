"""Fine-tuning of a pre-trained discriminator on GLUE and the synthetic-language tasks
(lab/finetune/synthetic_tasks.py), over seeds; its config and the per-task defaults are lab/finetune/config.py,
the data side lab/finetune/data.py, the table that compares checkpoints lab/finetune/table.py.

    train(FinetuneConfig(task="mrpc", init="runs/gdes", out_dir="runs/ft/gdes/mrpc"))  -> results dict
    python -m lab finetune --task mrpc --init runs/gdes --out-dir runs/ft/gdes/mrpc --seeds 1,2,3
    python -m lab finetune --task synth_tag,synth_gram --init runs/gdes --out-dir runs/ft --seeds 1,2,3
    python -m lab table runs/ft --out-dir runs/ft-table        # -> runs/ft-table/glue_results.csv

Sentence heads are the official GLUE head (microsoft/DeBERTa `DeBERTa/apps/models/sequence_classification.py`,
`transformers` `DebertaV2ForSequenceClassification`): pooled = gelu(Dense(h_CLS)), logits =
Linear(dropout(pooled)); cross-entropy, or MSE on a single output for STS-B. Token tasks use
`transformers`' `DebertaV2ForTokenClassification` head, logits = Linear(dropout(h)) at every token, the
label on the first piece of each word. Inputs are `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, pairs
truncated as `transformers`' fast tokenizers do with `truncation="longest_first"` (lab/finetune/data.py).
AdamW (no decay on biases and LayerNorm), linear warmup then linear decay, grad-norm clip 1.0.

Selection and reporting (lab/finetune/task.py): after every epoch only the validation split is scored,
and the state of the epoch with the best main validation metric is kept (early-stopping style). Only
after training are the test split(s) scored, exactly twice: with the chosen state (the reported
numbers) and with the last epoch's state (`last_<metric>`, so the selection effect shows). The test
split never reaches the choice of the epoch. The paper (He, Gao, Chen, ICLR 2023, arXiv 2111.09543)
reports GLUE dev results; GLUE's test labels are not public, so here the dev files are the test splits
and validation is carved from train (lab/finetune/glue.py).

Speed: every split is tokenised and padded once into tensors that live on the training device; a
step slices its batch from them (batch width rounded up to a multiple of `length_bucket`, so a
compiled model sees few shapes), keeps its loss on the device and makes no host sync; evaluation
collects logits on the device and copies them once per split.

Defaults per task (`Task.defaults`: for GLUE, lab/finetune/glue.py) start from the official
DeBERTaV3-large recipe, scaled for the small models this workbench trains; every default can be overridden in
`FinetuneConfig`; `results.json` records the values used.

Outputs in `out_dir`: config.json, seeds/seed_<n>.json (one per finished seed, written atomically: a
rerun of an interrupted run trains only the missing seeds), metrics.jsonl (one row per seed and
epoch: training loss and validation metrics only), results.json:

    task, init, main_metric (task.main_key), selection (how the reported epoch was chosen),
    metrics_per_seed: [{seed, best_epoch, epochs, <test metrics of the chosen state, e.g. mcc or
        m_accuracy>, validation_<metric> (chosen epoch), last_<test metric> (last epoch's state)}],
    mean, median, std (over seeds, of the test metrics and their last_ twins),
    splits: {train | validation | <test split>: {role, official, loaded, used, malformed, sliced
        [, words, words_in_split]}}, n_train_examples, n_validation_examples, n_test_examples,
    official_test_examples, test_complete, config.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lab import hf
from lab.cli import config_parser, may_change_on_resume, parse_values, run_verb
from lab.finetune.config import FinetuneConfig
from lab.finetune.data import IGNORE, Encoded, length_grouped_order, load_data
from lab.finetune.table import checkpoint_label, results_table
from lab.finetune.task import SPLIT_PREFIX, VALIDATION, Task
from lab.finetune.tasks import get_task
from lab.model import Encoder, init_weights
from lab.synthetic import parse_synthetic
from lab.tokenizer import Tokenizer
from lab.training import adamw, autocast, autocast_dtype, compile_model, compile_on, linear_schedule, set_lr
from lab.util import (
    atomic_write_bytes,
    atomic_write_json,
    keep_freed_memory,
    pick_device,
    replace_strict,
    to_device,
)

SELECTION = (
    "epoch chosen on the validation split's main metric; reported metrics on the test split(s), evaluated "
    "once with the chosen state and once with the last"
)

# ---------------------------------------------------------------------------------------------- model


class Classifier(nn.Module):
    """Encoder + the official GLUE head on the [CLS] state: [B, T] ids -> [B, num_labels]."""

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


class TokenClassifier(nn.Module):
    """Encoder + a linear tagger at every token (as `transformers`' DebertaV2ForTokenClassification):
    [B, T] ids -> [B, T, num_labels]."""

    def __init__(self, encoder: Encoder, num_labels: int, head_dropout: float):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(head_dropout)
        self.out = nn.Linear(encoder.cfg.hidden_size, num_labels)
        init_weights(self.out, encoder.cfg.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.encoder(input_ids, attention_mask)))  # [B, T, num_labels]


def resolve_init(init: str) -> tuple[Path, Path]:
    """(HF-format model dir, spm.model) for a pre-training run dir, an HF-format dir, or a hub name."""
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
    model_dir, spm_path = resolve_init(init)
    tokenizer = Tokenizer.load(spm_path)
    encoder = hf.from_pretrained(model_dir)
    if encoder.cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"{model_dir} has {encoder.cfg.vocab_size} embedding rows but its tokenizer {spm_path} produces "
            f"ids up to {tokenizer.vocab_size - 1}; use the tokenizer the checkpoint was pre-trained with"
        )
    return encoder, tokenizer


def corpus_seed(init: str) -> int | None:
    """The synthetic-language seed of a lab pre-training run's corpus (`synthetic:SEED`), else None."""
    config = Path(init).expanduser() / "config.json"
    if not config.is_file():
        return None
    corpus = str(json.loads(config.read_text()).get("corpus", ""))
    if corpus == "synthetic" or corpus.startswith("synthetic:"):
        return parse_synthetic(corpus)[0]
    return None


# ---------------------------------------------------------------------------------------------- evaluation


def _bucket(cfg: FinetuneConfig, device: torch.device) -> int:
    return cfg.length_bucket or (16 if device.type == "cuda" else 1)


def _dtype(cfg: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    return autocast_dtype(cfg.dtype, device)


@torch.no_grad()
def predict(model: nn.Module, data: Encoded, cfg: FinetuneConfig, device: torch.device) -> np.ndarray:
    """Logits of every row in input order, [N, C] (token tasks: argmax class per token [N, T]),
    computed in length-sorted batches on the device and copied to the host once."""
    model.eval()
    order = np.argsort(data.lengths_host, kind="stable")
    order_dev = to_device(torch.from_numpy(order), device)
    token_level = data.labels.dim() == 2
    out = None
    for start in range(0, len(order), cfg.eval_batch_size):
        idx = order_dev[start : start + cfg.eval_batch_size]
        width = data.width(order[start : start + cfg.eval_batch_size], _bucket(cfg, device))
        ids, mask, _ = data.batch(idx, width)
        with autocast(device, _dtype(cfg, device)):
            logits = model(ids, mask).float()  # [B, C] or [B, W, C]
        if token_level:
            if out is None:
                out = torch.full(data.ids.shape, IGNORE, dtype=torch.long, device=device)
            out[idx, :width] = logits.argmax(-1)
        else:
            if out is None:
                out = torch.zeros(len(data), logits.shape[-1], device=device)
            out[idx] = logits
    return out.cpu().numpy()


def _score(task: Task, model, splits: dict[str, Encoded], cfg, device) -> dict:
    """Metrics of the given splits, keys prefixed by split (Task.split_metrics)."""
    per_split = {}
    for split, data in splits.items():
        out = predict(model, data, cfg, device)
        gold = data.labels_host
        if task.is_token_level:  # score the labelled positions: one per word
            scored = gold != IGNORE
            per_split[split] = (out[scored], gold[scored])
        else:
            per_split[split] = (out[:, 0] if task.is_regression else out.argmax(1), gold)
    return task.split_metrics(per_split)


# ---------------------------------------------------------------------------------------------- training


def _loss(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()  # losses in fp32 under bf16 autocast
    if task.is_regression:
        return F.mse_loss(logits[:, 0], labels)
    if logits.dim() == 3:  # token task: [B, W, C] against [B, W], unscored positions ignored
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    return F.cross_entropy(logits, labels)


def finetune_seed(
    cfg, seed, task, encoder, train_data: Encoded, validation: Encoded, tests: dict[str, Encoded], device
):
    """One fine-tuning run from a copy of `encoder`: (model in its chosen state, per-seed metrics, history
    of per-epoch rows). The epoch is chosen on `validation` alone; `tests` are scored after training,
    once with the chosen state and once with the last epoch's. Per-seed metrics: {best_epoch, epochs,
    <test metrics, chosen state>, validation_<metric> (chosen epoch), last_<test metric>}."""
    torch.manual_seed(seed)
    head = TokenClassifier if task.is_token_level else Classifier
    model = head(copy.deepcopy(encoder), task.num_labels, cfg.head_dropout).to(device)
    # regional: the encoder Layer compiled once, in place, so evaluation runs it compiled too
    step_model = compile_model(model) if compile_on(cfg.compile, device) else model
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    bucket = _bucket(cfg, device)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total)
    key = task.selection_key
    generator = torch.Generator().manual_seed(seed)
    best, best_state, best_score, history = None, None, -math.inf, []
    bar = tqdm(total=total, desc=f"{task.name} seed {seed}", leave=False, disable=None, mininterval=1.0)
    t0, step = time.time(), 0
    for epoch in range(1, cfg.epochs + 1):
        step_model.train()  # the compiled wrapper too, whose flag evaluation turned off
        t_epoch = time.time()
        if cfg.group_by_length:  # the batch order, planned on the host
            order = length_grouped_order(train_data.lengths_host, cfg.batch_size, generator)
        else:
            order = torch.randperm(len(train_data), generator=generator)
        order_dev = to_device(order, device)  # one copy per epoch; each step slices it
        order_host = order.numpy()
        loss_sum = torch.zeros((), device=device)
        for start in range(0, len(order), cfg.batch_size):
            rows = slice(start, start + cfg.batch_size)
            ids, mask, labels = train_data.batch(order_dev[rows], train_data.width(order_host[rows], bucket))
            set_lr(opt, cfg.lr * linear_schedule(step, warmup, total))
            with autocast(device, _dtype(cfg, device)):
                logits = step_model(ids, mask)
            loss = _loss(task, logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_sum += loss.detach()  # stays on the device: read once per epoch
            step += 1
            bar.update()
        train_loss = (loss_sum / steps_per_epoch).item()  # waits for the epoch's last step
        train_s = time.time() - t_epoch  # training alone: the evaluation below is not in it
        metrics = _score(task, step_model, {VALIDATION: validation}, cfg, device)  # validation only
        row = {
            "seed": seed,
            "epoch": epoch,
            "step": step,
            "lr": opt.param_groups[0]["lr"],  # the learning rate of the epoch's last step
            "train_loss": train_loss,
            "elapsed_s": time.time() - t0,
            "train_s": train_s,
            "train_examples_per_s": len(train_data) / train_s,
            **metrics,
        }
        history.append(row)
        score = metrics[key] if math.isfinite(metrics[key]) else -math.inf  # constant predictions give nan
        if best is None or score > best_score:
            best_score = score
            best = {"best_epoch": epoch, **metrics}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        bar.write(
            f"{task.name} seed {seed} epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} {shown} "
            f"(best {key} {best[key]:.4f} @ {best['best_epoch']}) {row['elapsed_s']:.1f}s"
        )
    bar.close()
    # the test split(s), twice and only now: the last epoch's state, then the chosen one
    last = _score(task, step_model, tests, cfg, device)
    model.load_state_dict(best_state)
    chosen = _score(task, step_model, tests, cfg, device)
    reported = {"best_epoch": best["best_epoch"], "epochs": cfg.epochs, **chosen}
    reported |= {k: v for k, v in best.items() if k != "best_epoch"}
    reported |= {f"last_{k}": v for k, v in last.items()}
    return model, reported, history


def _summary(per_seed: list[dict]) -> tuple[dict, dict, dict]:
    """mean, median and std (sample std, 0 for one seed) across seeds of every test metric (chosen and
    last_ state); seed, best_epoch, epochs and the validation_ metrics are not summarised."""
    skipped = ("seed", "best_epoch", "epochs")
    keys = [k for k in per_seed[0] if k not in skipped and not k.startswith(SPLIT_PREFIX[VALIDATION])]
    values = {k: np.array([m[k] for m in per_seed], dtype=float) for k in keys}
    mean = {k: float(v.mean()) for k, v in values.items()}
    median = {k: float(np.median(v)) for k, v in values.items()}
    std = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
    return mean, median, std


def _weights_digest(init: str) -> str:
    """sha256 over the files of the checkpoint `init` resolves to: a re-exported or replaced
    checkpoint must not be mixed with seeds fine-tuned from the old one."""
    model_dir, spm_path = resolve_init(init)
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()) + [spm_path]:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _identity(cfg: FinetuneConfig) -> dict:
    """What a finished seed's results depend on besides its seed (JSON-normalised for comparison)."""
    free = may_change_on_resume(cfg)
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in free}
    return json.loads(json.dumps({"config": config, "init_weights": _weights_digest(cfg.init)}))


def _check_same(path: Path, what: str, stored, current) -> None:
    if stored == current:
        return
    if isinstance(stored, dict) and isinstance(current, dict):

        def flat(d, p=""):
            return {f"{p}{k}": v for k, v in d.items()}

        stored, current = flat(stored.get("config", stored)), flat(current.get("config", current))
        changed = [k for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
        detail = "; ".join(f"{k}: {stored.get(k)!r} then, {current.get(k)!r} now" for k in changed)
    else:
        detail = f"{stored!r} then, {current!r} now"
    raise ValueError(
        f"{path} was fine-tuned with a different {what} ({detail or 'the init checkpoint changed'}); "
        f"use another out_dir, or delete {path.parent} to fine-tune these seeds again"
    )


def _seed_path(out: Path, seed: int) -> Path:
    return out / "seeds" / f"seed_{seed}.json"


def train(cfg: FinetuneConfig) -> dict:
    """Fine-tune `cfg.init` on `cfg.task` once per seed; writes and returns results.json's content.

    Each finished seed is saved on its own (out_dir/seeds/seed_<n>.json, atomically), so a rerun of
    an interrupted run trains only the missing seeds and ends with the same results.json; seeds saved
    under another configuration or checkpoint are refused, never mixed in."""
    cfg = cfg.resolved()
    task = get_task(cfg.task)
    if task.generated and cfg.synthetic_seed is None:
        seed = corpus_seed(cfg.init)
        if seed is None:
            warnings.warn(
                f"{cfg.init} was not pre-trained on the synthetic language (no synthetic corpus in "
                f"its config.json); {task.name} uses SyntheticLanguage(0)",
                stacklevel=2,
            )
        cfg = replace_strict(cfg, synthetic_seed=seed or 0)
    out = Path(cfg.out_dir)
    identity = _identity(cfg)  # also checks that cfg.init exists before anything else happens
    done = {}
    for seed in cfg.seeds:
        path = _seed_path(out, seed)
        if path.is_file():
            saved = json.loads(path.read_text())
            _check_same(path, "configuration", saved["identity"], identity)
            done[seed] = saved
    data_record = next(iter(done.values()))["data"] if done else None
    if data_record is not None and set(task.splits) - set(data_record):
        raise ValueError(
            f"{out / 'seeds'} holds seeds fine-tuned on the splits {sorted(data_record)}, not {list(task.splits)} "
            "(made before validation and test splits were separate); move that folder away to fine-tune again"
        )

    if len(done) < len(cfg.seeds):
        # Data and checkpoint errors surface before any training starts.
        encoder, tokenizer = load_encoder(cfg.init)
        max_len = min(cfg.max_seq_len, encoder.cfg.max_seq_len)
        train_data, validation, tests, record = load_data(cfg, task, tokenizer, max_len)
        if data_record is not None:
            _check_same(out / "seeds", "data", data_record, json.loads(json.dumps(record)))
        data_record = record
        device = pick_device(cfg.device)
        train_data, validation = train_data.to(device), validation.to(device)
        tests = {split: d.to(device) for split, d in tests.items()}
        atomic_write_json(out / "config.json", dataclasses.asdict(cfg))
        if done:
            print(
                f"{task.name}: seed(s) {sorted(done)} already fine-tuned in {out / 'seeds'}; running the rest"
            )
        for seed in cfg.seeds:
            if seed in done:
                continue
            _, metrics, history = finetune_seed(
                cfg, seed, task, encoder, train_data, validation, tests, device
            )
            done[seed] = {
                "seed": seed,
                "identity": identity,
                "data": data_record,
                "metrics": {"seed": seed, **metrics},
                "history": history,
            }
            atomic_write_json(_seed_path(out, seed), done[seed])
            _write_history(out, [done[s] for s in cfg.seeds if s in done])

    per_seed = [done[s]["metrics"] for s in cfg.seeds]
    _write_history(out, [done[s] for s in cfg.seeds])
    mean, median, std = _summary(per_seed)
    tests = [data_record[split] for split in task.test_splits]
    official = [d["official"] for d in tests]
    results = {
        "task": task.name,
        "init": cfg.init,
        "main_metric": task.main_key,
        "selection": SELECTION,
        "metrics_per_seed": per_seed,
        "mean": mean,
        "median": median,
        "std": std,
        "splits": data_record,
        "n_train_examples": data_record["train"]["used"],
        "n_validation_examples": data_record[VALIDATION]["used"],
        "n_test_examples": sum(d["used"] for d in tests),
        "official_test_examples": None if None in official else sum(official),
        "test_complete": all(d["official"] in (None, d["loaded"]) for d in tests),
        "config": dataclasses.asdict(cfg),
    }
    atomic_write_json(out / "results.json", results)
    return results


def _write_history(out: Path, finished: list[dict]) -> None:
    """metrics.jsonl: every finished seed's per-epoch rows, in seed order."""
    rows = [row for saved in finished for row in saved["history"]]
    atomic_write_bytes(
        out / "metrics.jsonl", "".join(json.dumps(r, default=float) + "\n" for r in rows).encode()
    )


# ---------------------------------------------------------------------------------------------- several tasks and checkpoints


def run_table(tasks, inits, seeds=(1, 2, 3), out_dir="runs/glue", out_stem=None, **overrides):
    """Fine-tune every init on every task (results in out_dir/<checkpoint>/<task>/), then `results_table`
    (written to out_stem, by default out_dir/glue_results: a run's outputs stay in its directory)."""
    for init in inits:
        for task in tasks:
            name = get_task(task).name
            run_out = Path(out_dir) / checkpoint_label(init) / name
            train(
                FinetuneConfig(
                    task=name, init=str(init), seeds=tuple(seeds), out_dir=str(run_out), **overrides
                )
            )
    return results_table(out_dir, Path(out_dir) / "glue_results" if out_stem is None else out_stem)


# ---------------------------------------------------------------------------------------------- CLI


def cli(argv: list[str]) -> int:
    """`python -m lab finetune`: FinetuneConfig's flags; a comma list in --task or --init fine-tunes every
    init on every task (under --out-dir/<checkpoint>/<task>/) and writes their table."""
    parser = config_parser(FinetuneConfig, "python -m lab finetune", __doc__.split("\n")[0])
    values = parse_values(parser, argv)
    tasks = [t for t in str(values.pop("task", "")).split(",") if t.strip()]
    inits = [i for i in str(values.pop("init", "")).split(",") if i.strip()]
    if not tasks or not inits or "out_dir" not in values:
        parser.error("--task, --init and --out-dir are required (`python -m lab table` builds a table)")

    def action() -> None:
        cfg = replace_strict(FinetuneConfig(task=tasks[0], init=inits[0]), **values)
        keep_freed_memory()  # the same large tensors every step: reuse their pages (lab/util.py)
        if len(tasks) == 1 and len(inits) == 1:
            results = train(cfg)
            key, seeds = results["main_metric"], len(cfg.seeds)
            mean, median, std = (results[k][key] for k in ("mean", "median", "std"))
            print(
                f"{results['task']} {key}: mean {mean:.4f} median {median:.4f} std {std:.4f} over {seeds} seed(s)"
            )
            print(f"-> {cfg.out_dir}/results.json")
        else:
            stem = Path(cfg.out_dir) / "glue_results"
            common = {k: getattr(cfg, k) for k in values if k not in ("out_dir", "seeds")}
            run_table(tasks, inits, cfg.seeds, out_dir=cfg.out_dir, out_stem=stem, **common)
            print(f"wrote {stem}.csv and .png")

    return run_verb(action)
