"""Fine-tuning of a pre-trained discriminator on GLUE and the synthetic-language tasks (lab/tasks.py),
over seeds; the data side is lab/finetune_data.py, the table that compares checkpoints
lab/results_table.py.

    train(FinetuneConfig(task="mrpc", init="runs/gdes", out_dir="runs/ft/gdes/mrpc"))  -> results dict
    python -m lab finetune --task mrpc --init runs/gdes --out runs/ft/gdes/mrpc --seeds 1,2,3
    python -m lab finetune --task synth_tag,synth_gram --init runs/gdes --out runs/ft --seeds 1,2,3
    python -m lab finetune --table runs/ft --table-out figures/glue_results

Sentence heads are the official GLUE head (microsoft/DeBERTa `DeBERTa/apps/models/sequence_classification.py`,
`transformers` `DebertaV2ForSequenceClassification`): pooled = gelu(Dense(h_CLS)), logits =
Linear(dropout(pooled)); cross-entropy, or MSE on a single output for STS-B. Token tasks use
`transformers`' `DebertaV2ForTokenClassification` head, logits = Linear(dropout(h)) at every token, the
label on the first piece of each word. Inputs are `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, pairs
truncated as `transformers`' fast tokenizers do with `truncation="longest_first"` (lab/finetune_data.py).
AdamW (no decay on biases and LayerNorm), linear warmup then linear decay, grad-norm clip 1.0, dev
evaluation after every epoch. Each seed reports the epoch with the best main dev metric (the paper's
convention; that state is the one kept) and, labelled `last_<metric>`, the last epoch's, so the
selection effect shows.

Speed: every split is tokenised and padded once into tensors that live on the training device; a
step slices its batch from them (batch width rounded up to a multiple of `length_bucket`, so a
compiled model sees few shapes), keeps its loss on the device and makes no host sync; evaluation
collects logits on the device and copies them once per split.

Defaults per task (`TASK_DEFAULTS`) start from the official DeBERTaV3-large recipe and are scaled
for the small models this workbench trains:
  * learning rate x6: the official small/xsmall MNLI rate is 4.5e-5 against 7e-6 for large;
  * at least 3 epochs (the small-model MNLI recipe uses 3 where large uses 2);
  * warmup as a fraction of all steps (10%) instead of the paper's step counts, which assume the full
    training sets and would swallow a whole run on a `max_train_examples` slice;
  * batch size, head dropout and max length as in the paper (max length is capped by the model's).
Every default can be overridden in `FinetuneConfig`; `results.json` records the values used.

Outputs in `out_dir`: config.json, seeds/seed_<n>.json (one per finished seed, written atomically: a
rerun of an interrupted run trains only the missing seeds), metrics.jsonl (one row per seed and
epoch), results.json ({task, init, metrics_per_seed, mean, median, std, n_dev_examples,
official_dev_examples, dev_splits, config}).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lab import tasks as downstream
from lab.finetune_data import IGNORE, Encoded, length_grouped_order, load_data
from lab.model import Encoder, init_weights
from lab.results_table import checkpoint_label, results_table
from lab.tokenizer import Tokenizer
from lab.training import adamw, autocast, linear_schedule, set_lr
from lab.util import atomic_write_bytes, atomic_write_json, pick_device, replace_strict, to_device

# Official DeBERTaV3-large recipe: epochs, warmup steps, lr, batch, head dropout, max len, from the
# fine-tuning scripts of microsoft/DeBERTa (`experiments/glue/*.sh`) and the paper's appendix (He, Gao,
# Chen, "DeBERTaV3", ICLR 2023, arXiv 2111.09543).
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
# The synthetic tasks are small (300 / 2,000 training sentences of ~8 words), so they get more epochs
# and higher rates than GLUE. Chosen on a `tiny` discriminator pre-trained 600 steps on synthetic:0
# against the same model untrained (accuracy 0.83 vs 0.79 on synth_tag, MCC 0.60-0.65 vs 0.0 on
# synth_gram); synth_tag at 1e-4 or 3e-4 does not converge in its ~100 steps.
TASK_DEFAULTS["synth_tag"] = {
    "epochs": 10,
    "lr": 1e-3,
    "batch_size": 32,
    "head_dropout": 0.1,
    "max_seq_len": 128,
}
TASK_DEFAULTS["synth_gram"] = {
    "epochs": 5,
    "lr": 1e-4,
    "batch_size": 32,
    "head_dropout": 0.1,
    "max_seq_len": 128,
}


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = (
        "mrpc"  # GLUE: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli; synthetic: synth_tag, synth_gram
    )
    glue_dir: str = ""  # GLUE root with <TASK>/train.tsv ...; "" = $LAB_DATA_DIR/glue
    init: str = ""  # pre-training run dir (uses export/discriminator/), HF-format dir, or hub name
    out_dir: str = "runs/finetune"  # where config.json, seeds/, metrics.jsonl and results.json go
    synthetic_seed: int | None = None  # synthetic tasks' language; None = the init run's corpus seed, else 0
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
    length_bucket: int = 0  # batch widths rounded up to a multiple of this; 0 = 16 on CUDA, 1 (exact) on CPU
    compile: bool = False  # torch.compile the model (pays a compile per seed; worth it on long CUDA runs)
    device: str = "auto"  # "auto" = cuda if available, else cpu
    bf16: bool = True  # bf16 autocast on CUDA (losses in fp32); ignored on CPU
    # batches of similar lengths (finetune_data.length_grouped_order: sorted within shuffled mega-batches
    # of 50 batches): far less padding; off = plain shuffled batches
    group_by_length: bool = True

    def __post_init__(self) -> None:
        downstream.get_task(self.task)  # raises on unknown tasks, listing the known ones
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds:
            raise ValueError("FinetuneConfig.seeds is empty; give at least one seed, e.g. (1,)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"FinetuneConfig.seeds has duplicates: {self.seeds}")
        positive = ("epochs", "lr", "batch_size", "max_seq_len", "max_train_examples", "max_eval_examples")
        for name in (*positive, "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(
                    f"FinetuneConfig.{name} must be positive (or None for the default), got {value}"
                )
        for name in ("warmup_steps", "length_bucket"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"FinetuneConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("warmup_ratio", "head_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"FinetuneConfig.{name} must be in [0, 1), got {value}")

    def resolved(self) -> FinetuneConfig:
        """The config with the task's canonical name and every None default replaced by its value
        (synthetic_seed is resolved by `train`, which reads the init run)."""
        task = downstream.get_task(self.task).name
        defaults = {k: v for k, v in TASK_DEFAULTS[task].items() if getattr(self, k) is None}
        return replace_strict(self, task=task, **defaults)


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


def corpus_seed(init: str) -> int | None:
    """The synthetic-language seed of a lab pre-training run's corpus (`synthetic:SEED`), else None."""
    from lab.data import _parse_synthetic

    config = Path(init).expanduser() / "config.json"
    if not config.is_file():
        return None
    corpus = str(json.loads(config.read_text()).get("corpus", ""))
    if corpus == "synthetic" or corpus.startswith("synthetic:"):
        return _parse_synthetic(corpus)[0]
    return None


# ---------------------------------------------------------------------------------------------- evaluation


def _bucket(cfg: FinetuneConfig, device: torch.device) -> int:
    return cfg.length_bucket or (16 if device.type == "cuda" else 1)


def _dtype(cfg: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if cfg.bf16 and device.type == "cuda" else None


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


def _score(task, model, dev: dict[str, Encoded], cfg, device) -> dict:
    """Dev metrics of every dev split."""
    per_split = {}
    for split, data in dev.items():
        out = predict(model, data, cfg, device)
        gold = data.labels_host
        if downstream.is_token_level(task):  # score the labelled positions: one per word
            scored = gold != IGNORE
            per_split[split] = (out[scored], gold[scored])
        else:
            per_split[split] = (out[:, 0] if task.is_regression else out.argmax(1), gold)
    return downstream.dev_metrics(task.name, per_split)


# ---------------------------------------------------------------------------------------------- training


def _loss(task, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()  # losses in fp32 under bf16 autocast
    if task.is_regression:
        return F.mse_loss(logits[:, 0], labels)
    if logits.dim() == 3:  # token task: [B, W, C] against [B, W], unscored positions ignored
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    return F.cross_entropy(logits, labels)


def finetune_seed(cfg, seed, task, encoder, train_data: Encoded, dev: dict[str, Encoded], device):
    """One fine-tuning run from a copy of `encoder`: (model in its best-dev state, per-seed metrics
    {best metrics, best_epoch, last_<metric>...}, history of per-epoch rows)."""
    torch.manual_seed(seed)
    head = TokenClassifier if downstream.is_token_level(task) else Classifier
    model = head(copy.deepcopy(encoder), task.num_labels, cfg.head_dropout).to(device)
    step_model = torch.compile(model) if cfg.compile else model
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    bucket = _bucket(cfg, device)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total)
    key = downstream.main_metric(task.name)
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
        metrics = _score(task, step_model, dev, cfg, device)
        row = {"seed": seed, "epoch": epoch, "step": step, "train_loss": train_loss,
               "elapsed_s": time.time() - t0, "train_s": train_s,
               "train_examples_per_s": len(train_data) / train_s, **metrics}  # fmt: skip
        history.append(row)
        score = metrics[key] if math.isfinite(metrics[key]) else -math.inf  # constant predictions give nan
        if best is None or score > best_score:
            best_score = score
            best = {**metrics, "best_epoch": epoch}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        bar.write(f"{task.name} seed {seed} epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} {shown} "
                  f"(best {key} {best[key]:.4f} @ {best['best_epoch']}) {row['elapsed_s']:.1f}s")  # fmt: skip
    bar.close()
    model.load_state_dict(best_state)
    return model, {**best, **{f"last_{k}": v for k, v in metrics.items()}}, history


def _summary(per_seed: list[dict]) -> tuple[dict, dict, dict]:
    """mean, median and std (sample std, 0 for one seed) of every metric across seeds."""
    keys = [k for k in per_seed[0] if k not in ("seed", "best_epoch")]
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
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("seeds", "out_dir")}
    return json.loads(json.dumps({"config": config, "init_weights": _weights_digest(cfg.init)}))


def _check_same(path: Path, what: str, stored, current) -> None:
    if stored == current:
        return
    if isinstance(stored, dict) and isinstance(current, dict):
        flat = lambda d, p="": {f"{p}{k}": v for k, v in d.items()}  # noqa: E731
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
    task = downstream.get_task(cfg.task)
    if isinstance(task, downstream.SyntheticTask) and cfg.synthetic_seed is None:
        seed = corpus_seed(cfg.init)
        if seed is None:
            warnings.warn(f"{cfg.init} was not pre-trained on the synthetic language (no synthetic corpus in "
                          f"its config.json); {task.name} uses SyntheticLanguage(0)", stacklevel=2)  # fmt: skip
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

    if len(done) < len(cfg.seeds):
        # Data and checkpoint errors surface before any training starts.
        encoder, tokenizer = load_encoder(cfg.init)
        max_len = min(cfg.max_seq_len, encoder.cfg.max_seq_len)
        train_data, dev, record = load_data(cfg, task, tokenizer, max_len)
        if data_record is not None:
            _check_same(out / "seeds", "data", data_record, json.loads(json.dumps(record)))
        data_record = record
        device = pick_device(cfg.device)
        train_data, dev = train_data.to(device), {split: d.to(device) for split, d in dev.items()}
        atomic_write_json(out / "config.json", dataclasses.asdict(cfg))
        if done:
            print(
                f"{task.name}: seed(s) {sorted(done)} already fine-tuned in {out / 'seeds'}; running the rest"
            )
        for seed in cfg.seeds:
            if seed in done:
                continue
            _, metrics, history = finetune_seed(cfg, seed, task, encoder, train_data, dev, device)
            done[seed] = {"seed": seed, "identity": identity, "data": data_record,
                          "metrics": {"seed": seed, **metrics}, "history": history}  # fmt: skip
            atomic_write_json(_seed_path(out, seed), done[seed])
            _write_history(out, [done[s] for s in cfg.seeds if s in done])

    per_seed = [done[s]["metrics"] for s in cfg.seeds]
    _write_history(out, [done[s] for s in cfg.seeds])
    mean, median, std = _summary(per_seed)
    dev_splits = data_record["dev"]
    official = [d["official"] for d in dev_splits.values()]
    results = {
        "task": task.name,
        "init": cfg.init,
        "main_metric": downstream.main_metric(task.name),
        "selection": "metrics at each seed's best dev epoch (best_epoch); last_<metric>: at the last epoch",
        "metrics_per_seed": per_seed,
        "mean": mean,
        "median": median,
        "std": std,
        "n_train_examples": data_record["train"]["used"],
        "n_dev_examples": sum(d["used"] for d in dev_splits.values()),
        "official_dev_examples": None if None in official else sum(official),
        "dev_complete": all(d["official"] in (None, d["loaded"]) for d in dev_splits.values()),
        "dev_splits": dev_splits,
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
            name = downstream.get_task(task).name
            run_out = Path(out_dir) / checkpoint_label(init) / name
            train(
                FinetuneConfig(
                    task=name, init=str(init), seeds=tuple(seeds), out_dir=str(run_out), **overrides
                )
            )
    return results_table(out_dir, Path(out_dir) / "glue_results" if out_stem is None else out_stem)


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab finetune", description=__doc__.split("\n")[0])
    p.add_argument("--task", help="task (GLUE or synth_tag / synth_gram), or a comma list to fine-tune each")
    p.add_argument(
        "--init", action="append", help="run dir / HF dir / hub name; repeat to compare checkpoints"
    )
    p.add_argument("--out", help="output dir (with several tasks or inits: the root of <checkpoint>/<task>/)")
    p.add_argument("--glue-dir", default="", help="GLUE root (default $LAB_DATA_DIR/glue)")
    p.add_argument("--seeds", default="1", help="comma list, e.g. 1,2,3")
    for flag, kind in [("epochs", int), ("lr", float), ("batch-size", int), ("warmup-steps", int),
                       ("warmup-ratio", float), ("weight-decay", float), ("head-dropout", float),
                       ("max-seq-len", int), ("max-train-examples", int), ("max-eval-examples", int),
                       ("eval-batch-size", int), ("synthetic-seed", int), ("length-bucket", int)]:  # fmt: skip
        p.add_argument(f"--{flag}", type=kind)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-bf16", action="store_true", help="run in fp32 on CUDA too")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--table", nargs="+", metavar="DIR", help="only collect results.json under DIR(s) into a table"
    )
    p.add_argument(
        "--table-out",
        help="stem of the table's .csv and .png (default: OUT/glue_results; with --table, runs/glue_results)",
    )
    return p


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)  # unknown flags exit with status 2 and a usage message
    if args.table:
        stem = args.table_out or "runs/glue_results"
        rows = results_table(args.table, stem)
        print(f"wrote {stem}.csv and .png ({len(rows)} rows)")
        return 0
    if not args.task or not args.init or not args.out:
        _parser().error("--task, --init and --out are required (or --table DIR to build a table)")
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("task", "init", "out", "glue_dir", "seeds", "device", "no_bf16", "table", "table_out", "compile")
                 and v is not None}  # fmt: skip
    common = dict(
        glue_dir=args.glue_dir, device=args.device, bf16=not args.no_bf16, compile=args.compile, **overrides
    )
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
            stem = args.table_out or Path(args.out) / "glue_results"
            run_table(tasks, args.init, seeds, out_dir=args.out, out_stem=stem, **common)
            print(f"wrote {stem}.csv and .png")
    except ValueError as err:
        print(f"error: {err}")
        return 1
    return 0
