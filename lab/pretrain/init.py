"""Continued pre-training: an RTDModel built from a released (or exported) DeBERTa-v3 checkpoint.

`PretrainConfig.init_discriminator` names the discriminator: an HF-format folder, a hub name, or a
pre-training run of this workbench (its export/discriminator/). From it come the model configuration,
the discriminator's encoder, its RTD head where the checkpoint carries one (the official code's
`mask_predictions`), and the tokenizer (its spm.model: the corpus is tokenised with it, never with a
retrained one, whose ids would not match the embedding rows). `init_generator` chooses the generator:

    PATH_OR_NAME   its own checkpoint (a DebertaV2ForMaskedLM folder: encoder and MLM head)
    half           the discriminator's embedding layer and its bottom layers (gen_depth_ratio of them,
                   half by default), a new MLM head: the usual start when no generator was released
    new            random layers and MLM head at gen_depth_ratio depth

The loaded word table then goes where the sharing mode says: ES shares it, NES gives the discriminator
and (unless it brings its own) the generator a copy each, GDES makes it E_G with E_delta = 0. Under
every mode the discriminator of step 0 computes exactly what the checkpoint does; under ES and GDES a
generator checkpoint's own word table is not used (the one table must be the discriminator's).

Everything is opened and checked by `open_checkpoints`, before the run writes anything: a folder that
is not a DeBERTa-v3 checkpoint, a missing spm.model, a generator of another vocabulary or width, a
hub name that cannot be fetched, and flags that contradict the checkpoint each raise one ValueError.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from lab import hf
from lab.model import ModelConfig, preset
from lab.rtd import RTDModel
from lab.tokenizer import MODEL_FILENAME, Tokenizer
from lab.util import replace_strict

GENERATOR_CHOICES = ("half", "new")  # besides a checkpoint's path or hub name
# Continuing from trained weights: the from-scratch defaults (lr 5e-4, 100 warm-up steps) would move
# them far in the first steps; a run with init_discriminator whose lr / warmup_steps are left at their
# defaults uses these instead (the official recipe's peak for base/large models, a short warm-up).
CONTINUE_LR = 1e-4
CONTINUE_WARMUP_STEPS = 10
# the ModelConfig fields a checkpoint fixes (dropout, max_seq_len and the attention implementation are
# the run's choices)
ARCHITECTURE = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "position_buckets",
    "max_relative_positions",
    "layer_norm_eps",
)


def continuing_defaults(cfg) -> dict[str, object]:
    """The {field: value} changes a PretrainConfig with init_discriminator set makes to its lr and
    warmup_steps left at the class defaults (CONTINUE_LR, CONTINUE_WARMUP_STEPS); {} otherwise."""
    if not cfg.init_discriminator:
        if cfg.init_generator != _default(cfg, "init_generator"):
            raise ValueError(
                f"init_generator={cfg.init_generator!r} needs init_discriminator (the checkpoint to continue); "
                "set --init-discriminator, or drop --init-generator"
            )
        return {}
    wanted = {"lr": CONTINUE_LR, "warmup_steps": CONTINUE_WARMUP_STEPS}
    return {name: value for name, value in wanted.items() if getattr(cfg, name) == _default(cfg, name)}


def _default(cfg, name: str):
    return next(f.default for f in dataclasses.fields(cfg) if f.name == name)


def _open(path_or_name: str, role: str, attention_impl: str) -> hf.Checkpoint:
    """The checkpoint of `role` (init_discriminator / init_generator); a pre-training run of this
    workbench stands for its export/discriminator or export/generator."""
    exported = Path(path_or_name).expanduser() / "export" / role.removeprefix("init_")
    try:
        return hf.load_checkpoint(
            exported if (exported / "config.json").is_file() else path_or_name, attention_impl
        )
    except ValueError as err:
        raise ValueError(f"{role} {path_or_name!r}: {err}") from None


@dataclass
class Pretrained:
    """The checkpoints a continued run starts from, opened and checked against each other and the run."""

    discriminator: hf.Checkpoint
    generator: hf.Checkpoint | None  # None: init_generator is half or new
    init_generator: str
    tokenizer: Tokenizer
    model_cfg: ModelConfig  # the discriminator's, with the run's dropout and attention implementation

    def model(self, cfg) -> RTDModel:
        """The RTDModel of step 0 (built after torch.manual_seed(cfg.seed): `new` parts are seeded)."""
        depth_ratio = cfg.gen_depth_ratio
        if self.generator is not None:
            depth_ratio = self.generator.cfg.num_layers / self.model_cfg.num_layers
        model = RTDModel(self.model_cfg, cfg.sharing, depth_ratio, 1.0, cfg.emd)
        if self.generator is not None:
            _check_generator_shape(model, self.generator, self.model_cfg)
        disc = self.discriminator
        table = disc.encoder["word_embeddings.weight"]
        with torch.no_grad():
            _load_encoder(model.discriminator, disc.encoder)
            if "rtd_head" in disc.heads:
                model.rtd_head.load_state_dict(disc.heads["rtd_head"])
            if self.generator is not None:
                _load_encoder(model.generator, self.generator.encoder)
                model.mlm_head.load_state_dict(self.generator.heads["mlm_head"])
            elif self.init_generator == "half":
                bottom = {k: v for k, v in disc.encoder.items() if not _layer_at_or_above(k, model)}
                _load_encoder(model.generator, bottom)
            own = None if self.generator is None else self.generator.encoder["word_embeddings.weight"]
            place_table(model, table, generator_table=own)
        return model


def place_table(model: RTDModel, table: torch.Tensor, generator_table: torch.Tensor | None = None) -> None:
    """Put the discriminator's loaded word table where the sharing mode reads it: ES's one table; NES's
    discriminator table and the generator's (`generator_table`, a generator checkpoint's own, else a
    copy of `table`); GDES's E_G with E_delta = 0, so that E_D = E_G + E_delta is the loaded table."""
    gen_table = model.generator.word_embeddings.weight
    own = model.discriminator.word_embeddings  # None under GDES, the generator's module under ES
    if own is not None and own.weight is not gen_table:  # NES: separate tables
        own.weight.copy_(table)
        gen_table.copy_(table if generator_table is None else generator_table)
    else:
        gen_table.copy_(table)
    delta = getattr(model, "embedding_delta", None)
    if delta is not None:
        delta.zero_()


def _load_encoder(encoder, state: dict[str, torch.Tensor]) -> None:
    """Load `state` into an encoder of the RTDModel, the word table aside (place_table sets it)."""
    state = {k: v for k, v in state.items() if not k.startswith("word_embeddings.")}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("word_embeddings.")]
    if missing or unexpected:  # the shapes were checked: this is a bug, not a user's error
        raise RuntimeError(f"loading an encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _layer_at_or_above(name: str, model: RTDModel) -> bool:
    """True for a discriminator layer's weight that the `half` generator has no layer for."""
    parts = name.split(".")
    return parts[0] == "layers" and int(parts[1]) >= len(model.generator.layers)


def _check_generator_shape(model: RTDModel, generator: hf.Checkpoint, disc_cfg: ModelConfig) -> None:
    built = {k: getattr(model.generator.cfg, k) for k in ARCHITECTURE}
    given = {k: getattr(generator.cfg, k) for k in ARCHITECTURE}
    if built != given:
        differ = ", ".join(f"{k} {given[k]}" for k in ARCHITECTURE if built[k] != given[k])
        raise ValueError(
            f"generator {generator.directory} ({differ}) is not a shallower copy of the discriminator's "
            f"architecture (the generator must share its width, heads, FFN and relative positions); "
            "pass a matching generator, or --init-generator half"
        )


def open_checkpoints(cfg) -> Pretrained | None:
    """The checkpoints of a run with `cfg.init_discriminator` set (None without), checked before the
    run writes anything; every problem is one ValueError naming the input and the fix."""
    if not cfg.init_discriminator:
        return None
    _check_flags(cfg)
    disc = _open(cfg.init_discriminator, "init_discriminator", cfg.attention_impl)
    tokenizer = _tokenizer(disc.directory, cfg.init_discriminator)
    if tokenizer.vocab_size > disc.cfg.vocab_size:
        raise ValueError(
            f"init_discriminator {cfg.init_discriminator!r}: its spm.model has {tokenizer.vocab_size} ids but the "
            f"model only {disc.cfg.vocab_size} embedding rows; the tokenizer is not the checkpoint's own"
        )
    model_cfg = _model_config(cfg, disc.cfg)
    generator = None
    if cfg.init_generator not in GENERATOR_CHOICES:
        generator = _open(cfg.init_generator, "init_generator", cfg.attention_impl)
        _check_generator(generator, disc, tokenizer, cfg.init_generator)
    return Pretrained(disc, generator, cfg.init_generator, tokenizer, model_cfg)


def _check_flags(cfg) -> None:
    """Flags a continued run cannot honour: its tokenizer and width come from the checkpoint."""
    if cfg.tokenizer:
        raise ValueError(
            f"tokenizer={cfg.tokenizer!r} with init_discriminator: the corpus is tokenised with the "
            "checkpoint's own spm.model; drop --tokenizer"
        )
    if cfg.vocab_size != _default(cfg, "vocab_size"):
        raise ValueError(
            f"vocab_size={cfg.vocab_size} with init_discriminator: the vocabulary is the checkpoint's; "
            "drop --vocab-size"
        )
    if cfg.gen_width_ratio != 1.0:
        raise ValueError(
            f"gen_width_ratio={cfg.gen_width_ratio} with init_discriminator: the generator starts from the "
            "discriminator's tables, so it has its width; drop --gen-width-ratio"
        )


def _model_config(cfg, disc: ModelConfig) -> ModelConfig:
    """The checkpoint's architecture with the run's dropout and attention; a preset other than the
    default that names another architecture, or a seq_len past the checkpoint's, is an error."""
    if cfg.preset != _default(cfg, "preset"):
        named = preset(cfg.preset)
        differ = [k for k in ARCHITECTURE if k != "vocab_size" and getattr(named, k) != getattr(disc, k)]
        if differ:
            detail = ", ".join(f"{k} {getattr(disc, k)} (preset {getattr(named, k)})" for k in differ)
            raise ValueError(
                f"preset={cfg.preset!r} contradicts init_discriminator {cfg.init_discriminator!r}: {detail}; "
                "the architecture is the checkpoint's, drop --preset"
            )
    if cfg.seq_len > disc.max_seq_len:
        raise ValueError(
            f"seq_len={cfg.seq_len} exceeds the checkpoint's max_position_embeddings={disc.max_seq_len}; "
            f"use --seq-len {disc.max_seq_len} or less"
        )
    return replace_strict(
        disc, hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout, attention_impl=cfg.attention_impl
    )


def _tokenizer(directory: Path, name: str) -> Tokenizer:
    path = directory / MODEL_FILENAME
    if not path.is_file():
        raise ValueError(
            f"init_discriminator {name!r}: {directory} has no {MODEL_FILENAME}; continued pre-training "
            "tokenises the corpus with the checkpoint's own SentencePiece model, so copy it into that folder"
        )
    try:
        return Tokenizer.load(path)
    except ValueError as err:
        raise ValueError(f"init_discriminator {name!r}: {err}") from None


def _check_generator(generator: hf.Checkpoint, disc: hf.Checkpoint, tokenizer: Tokenizer, name: str) -> None:
    for field in ("vocab_size", "hidden_size"):
        g, d = getattr(generator.cfg, field), getattr(disc.cfg, field)
        if g != d:
            raise ValueError(
                f"init_generator {name!r} has {field}={g} but the discriminator {d}; pass the generator "
                "pre-trained with this discriminator, or --init-generator half"
            )
    if generator.cfg.num_layers > disc.cfg.num_layers:
        raise ValueError(
            f"init_generator {name!r} has {generator.cfg.num_layers} layers, more than the discriminator's "
            f"{disc.cfg.num_layers}; pass its generator, or --init-generator half"
        )
    if "mlm_head" not in generator.heads:
        raise ValueError(
            f"init_generator {name!r} has no complete MLM head (cls.predictions.* / lm_predictions.lm_head.*); pass a "
            "DebertaV2ForMaskedLM checkpoint, or --init-generator half"
        )
    spm = generator.directory / MODEL_FILENAME
    if spm.is_file() and Tokenizer.load(spm).fingerprint != tokenizer.fingerprint:
        raise ValueError(
            f"init_generator {name!r} has another tokenizer ({spm}) than the discriminator; pass the "
            "generator pre-trained with this discriminator, or --init-generator half"
        )
