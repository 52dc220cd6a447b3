"""Pre-training's config, `PretrainConfig`: one field per setting, with its help, its allowed values and
whether a run may be resumed after it changed (`may_change_on_resume`, read by the resume checks of
lab/pretrain/setup.py and lab/analysis/runs.py). `scaled_to_steps` fits the intervals and the warmup to
the number of steps, for the drivers that pick the steps (the experiment, the sweep, the notebooks).
"""

from __future__ import annotations

from dataclasses import dataclass

import lab.sharing
from lab.cli import check_choices, param
from lab.model import preset
from lab.pretrain import init as continued
from lab.pretrain import tensorboard
from lab.pretrain.meter import PROGRESS
from lab.rtd import MASK_STRATEGIES, RTD_WEIGHT
from lab.training import COMPILE, COMPILE_MODES, COMPILE_SCOPES, DTYPES
from lab.util import replace_strict

OPTIMIZATIONS = ("joint", "decoupled")
# compile_mode="auto": the mode measured fastest per preset on a GPU (bf16, one process). xsmall
# (T=128, batch 128): reduce-overhead 39.3 ms/step against 68.7 eager, the step launch-bound, CUDA graphs
# win; base (T=512, bf16): default 176 ms against 215 eager (GPU-bound, reduce-overhead not timed).
# Presets not listed use "default"; `python -m lab gpucheck` times the modes (compile:* parts) to extend this.
AUTO_COMPILE_MODE = {"xsmall": "reduce-overhead", "base": "default"}


def compile_mode(cfg, world: int) -> str:
    """The torch.compile mode a run uses: cfg.compile_mode, with "auto" resolved (AUTO_COMPILE_MODE)."""
    if cfg.compile_mode != "auto":
        return cfg.compile_mode
    return AUTO_COMPILE_MODE.get(cfg.preset, "default") if world == 1 else "default"


@dataclass(frozen=True)
class PretrainConfig:
    out_dir: str = param(
        "runs/pretrain", "run directory; an existing checkpoint there is resumed", may_change_on_resume=True
    )
    # model
    preset: str = param("mini", "tiny | mini | xsmall | small | base | large (discriminator size)")
    seq_len: int = param(128, "tokens per example, [CLS] and [SEP] included (official: 512)")
    dropout: float = param(0.1, "hidden and attention dropout")
    gen_depth_ratio: float = param(0.5, "generator layers / discriminator layers")
    gen_width_ratio: float = param(1.0, "generator width / discriminator width (< 1 only with sharing=nes)")
    emd: bool = param(False, "generator's enhanced mask decoder; off: HF's DebertaV2ForMaskedLM has none")
    # the implementations agree to float rounding (tests/test_reference.py): a run may switch on resume
    attention_impl: str = param(
        "sdpa",
        "sdpa | flex (CUDA: FlexAttention, no [B,H,T,T] bias; CPU: forward only)",
        may_change_on_resume=True,
    )
    # data
    corpus: str = param(
        "synthetic", "synthetic[:SEED] | .txt/.jsonl/wiki.*.tokens file, folder or glob | hf:NAME"
    )
    tokenizer: str = param("", "spm.model path; empty: train one on the corpus")
    vocab_size: int = param(4000, "SentencePiece size when a tokenizer is trained")
    heldout_fraction: float = param(0.02, "share of packed examples kept for evaluation")
    # RTD
    sharing: str = param(
        "gdes", "embedding sharing between generator and discriminator (lab/sharing.py)", lab.sharing.NAMES
    )
    mask_prob: float = param(0.15, "share of tokens masked for the generator")
    mask_strategy: str = param("mask", "mask: all [MASK], as released; bert: 80/10/10", MASK_STRATEGIES)
    rtd_weight: float = param(
        RTD_WEIGHT, "lambda in L_MLM + lambda * L_RTD (ELECTRA 50; official DeBERTa code 10)"
    )
    temperature: float = param(1.0, "generator sampling temperature")
    optimization: str = param(
        "joint",
        "joint: one backward (ES needs it); decoupled: the official two-optimizer loop",
        OPTIMIZATIONS,
    )
    # optimisation
    # 0: the untrained control (lab/pretrain/loop.py): the step-0 evaluation and the export of the
    # freshly initialised model, same architecture and tokenizer
    steps: int = param(2000, "optimizer steps (0 = export the untrained model)", may_change_on_resume=True)
    batch_size: int = param(32, "global examples per optimizer step (across processes and accumulation)")
    grad_accum: int = param(1, "micro-batches per optimizer step")
    lr: float = param(5e-4, "peak learning rate")
    warmup_steps: int = param(100, "linear warmup steps (0 = none), then linear decay to 0")
    weight_decay: float = param(0.01, "AdamW decoupled decay; none on biases and LayerNorm weights")
    beta1: float = param(0.9, "AdamW beta1")
    beta2: float = param(0.999, "AdamW beta2")
    adam_eps: float = param(1e-6, "AdamW epsilon (official DeBERTa: 1e-6)")
    grad_clip: float = param(1.0, "global gradient-norm clip")
    # runtime
    seed: int = param(0, "seed of initialisation, dropout, masking and sampling")
    device: str = param("auto", "auto | cpu | cuda | cuda:N", may_change_on_resume=True)
    dtype: str = param("auto", "autocast dtype; auto: bf16 on CUDA, fp32 on the CPU", DTYPES)
    compile: str = param(
        "auto",
        "torch.compile the RTD model; auto: on for CUDA, off for the CPU",
        COMPILE,
        may_change_on_resume=True,
    )
    # auto: the mode measured fastest for the preset (AUTO_COMPILE_MODE), "default" for unmeasured
    # presets and for multi-process runs (CUDA graphs untested with DDP's hooks)
    compile_mode: str = param(
        "auto",
        "torch.compile mode; auto: the one measured fastest for the preset",
        ("auto", *COMPILE_MODES),
        may_change_on_resume=True,
    )
    # layers compiles ~5x faster than model on a CPU, and its step ran 3-10 % slower there
    # (figures/bench/README.md, "Compile time"): model pays off past 200-1,200 CPU steps
    compile_scope: str = param(
        "auto",
        "what torch.compile covers: layers (the encoder layer, once) | model; auto: layers, "
        "model under CUDA graphs",
        COMPILE_SCOPES,
        may_change_on_resume=True,
    )
    log_every: int = param(20, "steps between log lines", may_change_on_resume=True)
    eval_every: int = param(200, "steps between held-out evaluations", may_change_on_resume=True)
    eval_batches: int = param(
        8, "held-out batches of batch_size rows per evaluation", may_change_on_resume=True
    )
    probe_every: int = param(50, "gradient-conflict probe (0 = off)", may_change_on_resume=True)
    ckpt_every: int = param(200, "steps between checkpoints", may_change_on_resume=True)
    keep_checkpoints: int = param(
        2,
        "checkpoints kept in checkpoints/ (the newest; a damaged one falls back)",
        may_change_on_resume=True,
    )
    discard_bad_checkpoints: bool = param(
        False,
        "if no checkpoint is usable: move them to checkpoints/bad/ and start over",
        may_change_on_resume=True,
    )
    stop_after: int = param(
        0,
        "end this invocation after this step (0 = run to `steps`); a rerun resumes",
        may_change_on_resume=True,
    )
    progress: str = param(
        "line",
        "line: a log line per interval; bar: tqdm, for notebooks; none",
        PROGRESS,
        may_change_on_resume=True,
    )
    # word-table snapshots in embeddings/ (lab/pretrain/snapshots.py): step 0, every snapshot_every steps, the
    # last; they only read the tables, their rows fixed by embeddings/ids.json, so they may change on resume
    snapshot_every: int = param(
        0, "steps between word-table snapshots (0 = at the probe steps)", may_change_on_resume=True
    )
    snapshot_rows: int = param(
        1024,
        "at most this many token ids snapshotted, the most frequent (chosen once per run)",
        may_change_on_resume=True,
    )
    snapshot_mb: float = param(
        8.0,
        "bound on embeddings/: fewer rows when the planned snapshots need it; 0 = off",
        may_change_on_resume=True,
    )
    tensorboard: bool = param(
        False,
        "also write metrics.jsonl's rows as TensorBoard events in tensorboard/",
        may_change_on_resume=True,
    )
    # continued pre-training (lab/pretrain/init.py): the architecture and tokenizer come from the checkpoint
    init_discriminator: str = param(
        "",
        "HF folder, hub name or run to continue ('' = from scratch); lr and warmup_steps left at their "
        "defaults become 1e-4 and 10",
    )
    init_generator: str = param(
        "half",
        "with init_discriminator: a generator checkpoint, half (D's embeddings + bottom layers) or new (random)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # config.json files written before compile took auto/on/off
            object.__setattr__(self, "compile", "on" if self.compile else "off")
        check_choices(self)
        for name, value in continued.continuing_defaults(self).items():
            object.__setattr__(self, name, value)
        if self.tensorboard:
            tensorboard.require()
        preset(self.preset, attention_impl=self.attention_impl)  # raises on an unknown preset / impl
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"PretrainConfig.mask_prob={self.mask_prob} must be in (0, 1)")
        positive = ("batch_size", "grad_accum", "seq_len", "log_every", "eval_every", "ckpt_every")
        for name in (*positive, "keep_checkpoints", "snapshot_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PretrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"PretrainConfig.seed={self.seed} must be >= 0")
        for name in ("steps", "snapshot_every", "snapshot_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 8:
            raise ValueError(f"PretrainConfig.seq_len={self.seq_len} is too short; use at least 8")
        mode = lab.sharing.get(self.sharing)
        if self.compile == "on" and self.optimization == "decoupled" and mode.shares_generator_table:
            raise ValueError(
                f"PretrainConfig(compile='on', optimization='decoupled', sharing={self.sharing!r}): decoupled "
                f"{mode.label} differentiates each step's graph twice, which a compiled backward refuses; "
                "use compile='off' (or 'auto', which keeps this combination eager)"
            )


# The intervals and the warmup as functions of the steps: about 50 train rows, 8 evaluations, 16 probes,
# 4 checkpoints and a tenth of the steps (at most 100) of warmup, so a 30-step notebook run and a
# 3000-step experiment both get curves with a useful number of points.
STEP_SCALED = {
    "log_every": lambda steps: max(1, steps // 50),
    "eval_every": lambda steps: max(5, steps // 8),
    "probe_every": lambda steps: max(2, steps // 16),
    "ckpt_every": lambda steps: max(10, steps // 4),
    "warmup_steps": lambda steps: min(100, max(1, steps // 10)),
}


def scaled_to_steps(cfg: PretrainConfig) -> PretrainConfig:
    """`cfg` with each STEP_SCALED field that still has PretrainConfig's default set from `cfg.steps`;
    a value chosen on purpose (any other) stays."""
    default = PretrainConfig()
    return replace_strict(
        cfg,
        **{k: scale(cfg.steps) for k, scale in STEP_SCALED.items() if getattr(cfg, k) == getattr(default, k)},
    )
