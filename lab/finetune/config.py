"""Fine-tuning's config, `FinetuneConfig`. Its None fields resolve to the task's defaults
(`Task.defaults`: GLUE's are the official DeBERTaV3-large recipe scaled for small models,
lab/finetune/glue.py; the synthetic tasks' are lab/finetune/synthetic_tasks.py's)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lab.cli import check_choices, param
from lab.finetune.tasks import get_task
from lab.training import COMPILE, DTYPES
from lab.util import replace_strict


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = param(
        "mrpc", "GLUE: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli; synthetic: synth_tag, synth_gram"
    )
    glue_dir: str = param("", "GLUE root with <TASK>/train.tsv ...; '' = $LAB_DATA_DIR/glue")
    # the init's weights themselves are checked on resume (a digest), not the path they are read from
    init: str = param(
        "",
        "pre-training run dir (uses export/discriminator/), HF-format dir, or hub name",
        may_change_on_resume=True,
    )
    out_dir: str = param(
        "runs/finetune",
        "where config.json, seeds/, metrics.jsonl and results.json go",
        may_change_on_resume=True,
    )
    synthetic_seed: int | None = param(
        None, "synthetic tasks' language; None = the init run's corpus seed, else 0"
    )
    epochs: int | None = param(
        None, "passes over the training set; None = the task's default (Task.defaults)"
    )
    lr: float | None = param(None, "peak learning rate; None = task default")
    batch_size: int | None = param(None, "examples per step; None = task default")
    warmup_steps: int | None = param(None, "linear warmup steps; None = warmup_ratio of all steps")
    warmup_ratio: float = param(0.1, "used when warmup_steps is None")
    weight_decay: float = param(0.01, "AdamW decay, not applied to biases and LayerNorm")
    head_dropout: float | None = param(None, "dropout before the output layer; None = task default")
    max_seq_len: int | None = param(
        None, "tokens incl. [CLS]/[SEP]; None = task default, capped by the model"
    )
    seeds: tuple[int, ...] = param(
        (1,), "one fine-tuning run per seed (head init + batch order)", may_change_on_resume=True
    )
    max_train_examples: int | None = param(None, "a fixed random slice (same for every seed); None = all")
    max_eval_examples: int | None = param(
        None, "examples scored of validation and of each test split; None = all"
    )
    eval_batch_size: int = param(128, "examples per evaluation batch")
    grad_clip: float = param(1.0, "global grad-norm clip")
    # padding to a bucket does not change a batch's loss (tests/test_finetune.py)
    length_bucket: int = param(
        0,
        "batch widths rounded up to a multiple of this; 0 = 16 on CUDA, 1 (exact) on CPU",
        may_change_on_resume=True,
    )
    # off by default, unlike pre-training: each seed pays its own compile, worth it on long CUDA runs only
    compile: str = param(
        "off",
        "torch.compile the model; auto: on for CUDA, off for the CPU",
        COMPILE,
        may_change_on_resume=True,
    )
    device: str = param("auto", "'auto' = cuda if available, else cpu", may_change_on_resume=True)
    dtype: str = param("auto", "autocast dtype (losses in fp32); auto: bf16 on CUDA, fp32 on the CPU", DTYPES)
    group_by_length: bool = param(
        True,
        "batches of similar lengths (sorted within shuffled mega-batches of 50 batches; "
        "lab.finetune.data.length_grouped_order): far less padding; off = plain shuffled batches",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        get_task(self.task)  # raises on unknown tasks, listing the known ones
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
        task = get_task(self.task)
        defaults = {k: v for k, v in dataclasses.asdict(task.defaults).items() if getattr(self, k) is None}
        return replace_strict(self, task=task.name, **defaults)
