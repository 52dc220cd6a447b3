"""Fine-tuning's config, `FinetuneConfig`, and the per-task defaults its None fields resolve to.

Defaults per task (`TASK_DEFAULTS`) start from the official DeBERTaV3-large recipe and are scaled
for the small models this workbench trains:
  * learning rate x6: the official small/xsmall MNLI rate is 4.5e-5 against 7e-6 for large;
  * at least 3 epochs (the small-model MNLI recipe uses 3 where large uses 2);
  * warmup as a fraction of all steps (10%) instead of the paper's step counts, which assume the full
    training sets and would swallow a whole run on a `max_train_examples` slice;
  * batch size, head dropout and max length as in the paper (max length is capped by the model's).
"""

from __future__ import annotations

from dataclasses import dataclass

from lab.cli import check_choices, param
from lab.finetune import tasks as downstream
from lab.training import COMPILE, DTYPES
from lab.util import replace_strict

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
# a table, one entry per line, easier to read across than reflowed (so the formatter skips it)
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
    task: str = param(
        "mrpc", "GLUE: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli; synthetic: synth_tag, synth_gram"
    )
    glue_dir: str = param("", "GLUE root with <TASK>/train.tsv ...; '' = $LAB_DATA_DIR/glue")
    init: str = param("", "pre-training run dir (uses export/discriminator/), HF-format dir, or hub name")
    out_dir: str = param("runs/finetune", "where config.json, seeds/, metrics.jsonl and results.json go")
    synthetic_seed: int | None = param(
        None, "synthetic tasks' language; None = the init run's corpus seed, else 0"
    )
    epochs: int | None = param(None, "passes over the training set; None = task default (TASK_DEFAULTS)")
    lr: float | None = param(None, "peak learning rate; None = task default")
    batch_size: int | None = param(None, "examples per step; None = task default")
    warmup_steps: int | None = param(None, "linear warmup steps; None = warmup_ratio of all steps")
    warmup_ratio: float = param(0.1, "used when warmup_steps is None")
    weight_decay: float = param(0.01, "AdamW decay, not applied to biases and LayerNorm")
    head_dropout: float | None = param(None, "dropout before the output layer; None = task default")
    max_seq_len: int | None = param(
        None, "tokens incl. [CLS]/[SEP]; None = task default, capped by the model"
    )
    seeds: tuple[int, ...] = param((1,), "one fine-tuning run per seed (head init + batch order)")
    max_train_examples: int | None = param(None, "a fixed random slice (same for every seed); None = all")
    max_eval_examples: int | None = param(None, "dev examples scored per split; None = all")
    eval_batch_size: int = param(128, "examples per evaluation batch")
    grad_clip: float = param(1.0, "global grad-norm clip")
    length_bucket: int = param(
        0, "batch widths rounded up to a multiple of this; 0 = 16 on CUDA, 1 (exact) on CPU"
    )
    # off by default, unlike pre-training: each seed pays its own compile, worth it on long CUDA runs only
    compile: str = param("off", "torch.compile the model; auto: on for CUDA, off for the CPU", COMPILE)
    device: str = param("auto", "'auto' = cuda if available, else cpu")
    dtype: str = param("auto", "autocast dtype (losses in fp32); auto: bf16 on CUDA, fp32 on the CPU", DTYPES)
    group_by_length: bool = param(
        True,
        "batches of similar lengths (sorted within shuffled mega-batches of 50 batches; "
        "lab.finetune.data.length_grouped_order): far less padding; off = plain shuffled batches",
    )

    def __post_init__(self) -> None:
        check_choices(self)
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
