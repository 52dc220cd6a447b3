"""HuggingFace interoperability: read and write DeBERTa-v3 checkpoints in `transformers` format.

A checkpoint directory holds `config.json` (DebertaV2Config), `model.safetensors` or
`pytorch_model.bin`, and usually `spm.model`. Released checkpoints prefix the encoder with
`deberta.` and carry pre-training heads; both are handled. `transformers` itself is not needed
here — only its file format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lab.model import Encoder, ModelConfig
from lab.util import atomic_write_json

# (our name, HF name) patterns; {i} is a layer number
_NAMES = [
    ("word_embeddings.weight", "embeddings.word_embeddings.weight"),
    ("embedding_norm.{p}", "embeddings.LayerNorm.{p}"),
    ("rel_embeddings.weight", "encoder.rel_embeddings.weight"),
    ("rel_norm.{p}", "encoder.LayerNorm.{p}"),
    ("layers.{i}.attention.query.{p}", "encoder.layer.{i}.attention.self.query_proj.{p}"),
    ("layers.{i}.attention.key.{p}", "encoder.layer.{i}.attention.self.key_proj.{p}"),
    ("layers.{i}.attention.value.{p}", "encoder.layer.{i}.attention.self.value_proj.{p}"),
    ("layers.{i}.attention_out.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("layers.{i}.attention_norm.{p}", "encoder.layer.{i}.attention.output.LayerNorm.{p}"),
    ("layers.{i}.ffn_in.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("layers.{i}.ffn_out.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("layers.{i}.ffn_norm.{p}", "encoder.layer.{i}.output.LayerNorm.{p}"),
]


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{regex}$")


_OURS_TO_HF = [(_compile(ours), hf) for ours, hf in _NAMES]
_HF_TO_OURS = [(_compile(hf), ours) for ours, hf in _NAMES]


def _rename(name: str, table) -> str | None:
    for regex, template in table:
        match = regex.match(name)
        if match:
            return template.format(**match.groupdict())
    return None


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Encoder state dict -> DebertaV2Model names."""
    out = {}
    for name, tensor in state.items():
        hf_name = _rename(name, _OURS_TO_HF)
        if hf_name is None:
            raise ValueError(f"parameter {name!r} has no DebertaV2Model counterpart")
        out[hf_name] = tensor
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """DebertaV2Model (or released pre-training) names -> ours; returns (state, ignored HF keys)."""
    out, ignored = {}, []
    for name, tensor in state.items():
        ours = _rename(name.removeprefix("deberta."), _HF_TO_OURS)
        if ours is None:
            ignored.append(name)  # heads (lm_predictions, mask_predictions, ...) and buffers
        else:
            out[ours] = tensor
    return out, ignored


# ----------------------------------------------------------------------------------------------
# Config


def to_hf_config(cfg: ModelConfig) -> dict:
    """A DebertaV2Config dict with the v3 settings spelled out (the class defaults are not v3)."""
    return {
        "model_type": "deberta-v2",
        "architectures": ["DebertaV2Model"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.hidden_dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": 0,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps,
        "relative_attention": True,
        "max_relative_positions": cfg.max_relative_positions,
        "position_buckets": cfg.position_buckets,
        "norm_rel_ebd": "layer_norm",
        "share_att_key": True,
        "pos_att_type": ["p2c", "c2p"],
        "position_biased_input": False,
        "pad_token_id": cfg.pad_token_id,
    }


def from_hf_config(hf: dict, source: str = "config.json", attention_impl: str = "sdpa") -> ModelConfig:
    """Read a DebertaV2Config dict, refusing anything that is not the v3 architecture. The attention
    implementation is a runtime choice, not part of the checkpoint: `attention_impl` sets it."""
    pos_att = hf.get("pos_att_type", [])
    if isinstance(pos_att, str):
        pos_att = [p.strip() for p in pos_att.lower().split("|")]
    required = {
        "relative_attention": (hf.get("relative_attention", False), True),
        "share_att_key": (hf.get("share_att_key", False), True),
        "position_biased_input": (hf.get("position_biased_input", True), False),
        "norm_rel_ebd": ("layer_norm" in str(hf.get("norm_rel_ebd", "none")), True),
        "pos_att_type": (sorted(pos_att) == ["c2p", "p2c"], True),
        "conv_kernel_size": (hf.get("conv_kernel_size", 0) == 0, True),
        "type_vocab_size": (hf.get("type_vocab_size", 0) == 0, True),
        "embedding_size": (hf.get("embedding_size", hf["hidden_size"]) in (None, hf["hidden_size"]), True),
        "hidden_act": (hf.get("hidden_act", "gelu") == "gelu", True),
    }
    wrong = [name for name, (got, want) in required.items() if got != want]
    if wrong:
        raise ValueError(
            f"{source} is not a DeBERTa-v3 configuration (fields {wrong} differ from v3); "
            "this workbench implements the v3 architecture only"
        )
    max_rel = hf.get("max_relative_positions", -1)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 512),
        position_buckets=hf.get("position_buckets", 256),
        max_relative_positions=max_rel if max_rel > 0 else hf.get("max_position_embeddings", 512),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-7),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf.get("initializer_range", 0.02),
        pad_token_id=hf.get("pad_token_id", 0) or 0,
        attention_impl=attention_impl,
    )


# ----------------------------------------------------------------------------------------------
# Loading and saving


def resolve(path_or_name: str | Path) -> Path:
    """A local checkpoint directory, downloading a hub name (e.g. microsoft/deberta-v3-xsmall) if needed."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; expected a HuggingFace-format DeBERTa-v3 directory")
        return path
    if path.exists() or str(path_or_name).startswith((".", "/", "~")):
        raise ValueError(f"checkpoint {path_or_name!r} is not a directory; pass a folder with config.json")
    try:
        from huggingface_hub import snapshot_download  # optional: only a hub download needs it
    except ImportError as err:
        raise ValueError(
            f"{path_or_name!r} is not a local directory, and huggingface_hub is not installed to fetch it "
            "from the hub; pip install huggingface_hub, or download the checkpoint and pass its folder"
        ) from err
    try:
        patterns = ["config.json", "*.safetensors", "pytorch_model.bin", "spm.model", "tokenizer_config.json"]
        return Path(snapshot_download(str(path_or_name), allow_patterns=patterns))
    except Exception as err:  # network errors, unknown repo, ...
        detail = " ".join(str(err).split())  # one line: hub errors span several
        raise ValueError(
            f"could not download {path_or_name!r} from the hub ({type(err).__name__}: {detail}); "
            "check the name and your connection (HF_HUB_OFFLINE unset), or pass a local checkpoint folder"
        ) from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").is_file():
        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def read_config(directory: Path, attention_impl: str = "sdpa") -> ModelConfig:
    """The ModelConfig of a checkpoint folder's config.json, refusing anything but DeBERTa-v2 with the v3
    settings (a BERT or DeBERTa-v1 folder, a damaged file) with one message naming the file."""
    config_file = directory / "config.json"
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{config_file} is not a readable JSON config ({err}); pass a DeBERTa-v3 checkpoint"
        ) from None
    model_type = hf.get("model_type", "deberta-v2") if isinstance(hf, dict) else None
    if model_type != "deberta-v2":
        raise ValueError(
            f"{config_file} describes a {model_type!r} model, not DeBERTa-v2/v3 (model_type 'deberta-v2'); "
            "pass a DeBERTa-v3 checkpoint folder"
        )
    try:
        return from_hf_config(hf, str(config_file), attention_impl)
    except KeyError as err:
        raise ValueError(
            f"{config_file} lacks the field {err}; pass a complete DeBERTa-v3 config.json"
        ) from None


# The pre-training heads, by our names (lab.rtd.MLMHead / RTDHead) and the names checkpoints use for them:
# transformers' DebertaV2ForMaskedLM (legacy `cls.predictions`, newer `lm_predictions.lm_head`, which is
# also the official code's), the official RTD head `mask_predictions`, and this workbench's own exports
# (mlm_head.safetensors / rtd_head.safetensors beside model.safetensors).
HEAD_NAMES = {
    "mlm_head": {
        "dense.weight": ("cls.predictions.transform.dense.weight", "lm_predictions.lm_head.dense.weight"),
        "dense.bias": ("cls.predictions.transform.dense.bias", "lm_predictions.lm_head.dense.bias"),
        "norm.weight": (
            "cls.predictions.transform.LayerNorm.weight",
            "lm_predictions.lm_head.LayerNorm.weight",
        ),
        "norm.bias": ("cls.predictions.transform.LayerNorm.bias", "lm_predictions.lm_head.LayerNorm.bias"),
        "bias": ("cls.predictions.bias", "cls.predictions.decoder.bias", "lm_predictions.lm_head.bias"),
    },
    "rtd_head": {
        "norm.weight": ("mask_predictions.LayerNorm.weight",),
        "norm.bias": ("mask_predictions.LayerNorm.bias",),
        "dense.weight": ("mask_predictions.dense.weight",),
        "dense.bias": ("mask_predictions.dense.bias",),
        "classifier.weight": ("mask_predictions.classifier.weight",),
        "classifier.bias": ("mask_predictions.classifier.bias",),
    },
}


def read_heads(directory: Path, weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The pre-training heads a checkpoint carries ({"mlm_head": state, "rtd_head": state}, each only where
    all its tensors are present), from its weights or the head files beside them."""
    heads = {}
    for head, names in HEAD_NAMES.items():
        side = directory / f"{head}.safetensors"
        pool = {**weights, **(load_file(side) if side.is_file() else {})}
        found = {}
        for ours, theirs in names.items():
            hit = next((n for n in (f"{head}.{ours}", *theirs) if n in pool), None)
            if hit is not None:
                found[ours] = pool[hit].float()
        if len(found) == len(names):
            heads[head] = found
    return heads


@dataclass
class Checkpoint:
    """What an HF-format DeBERTa-v3 folder holds, in this workbench's names and in fp32."""

    directory: Path
    cfg: ModelConfig
    encoder: dict[str, torch.Tensor]  # an Encoder state dict
    heads: dict[str, dict[str, torch.Tensor]]  # "mlm_head" / "rtd_head" -> state dict, where present


def load_checkpoint(path_or_name: str | Path, attention_impl: str = "sdpa", heads: bool = True) -> Checkpoint:
    """Read a DeBERTa-v3 checkpoint (a folder or a hub name), checking that its weights match its config;
    its pre-training heads too unless `heads` is False."""
    directory = resolve(path_or_name)
    cfg = read_config(directory, attention_impl)
    weights = read_weights(directory)
    state, _ignored = from_hf_state_dict(weights)
    with torch.device("meta"):  # the expected shapes, without allocating a model
        expected = {k: v.shape for k, v in Encoder(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(
            f"{directory} lacks encoder weights {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name]:
            raise ValueError(
                f"{directory}: weight {name} has shape {tuple(tensor.shape)}, config implies {tuple(expected[name])}"
            )
    encoder = {k: v.float() for k, v in state.items()}
    return Checkpoint(directory, cfg, encoder, read_heads(directory, weights) if heads else {})


def from_pretrained(path_or_name: str | Path, attention_impl: str = "sdpa") -> Encoder:
    """Load a DeBERTa-v3 encoder from an HF-format directory or hub name (weights in fp32, eval mode),
    computing attention with `attention_impl` (see lab.model.available_attention_impls)."""
    checkpoint = load_checkpoint(path_or_name, attention_impl, heads=False)
    model = Encoder(checkpoint.cfg)
    model.load_state_dict(checkpoint.encoder)
    return model.eval()


def save_pretrained(model: Encoder, path: str | Path, tokenizer=None, state: dict | None = None) -> Path:
    """Write `model` (or `state`, an Encoder state dict such as a merged GDES discriminator) so that
    `transformers.DebertaV2Model.from_pretrained(path)` and `lab.from_pretrained(path)` both load it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(state if state is not None else model.state_dict())
    tmp = path / ".model.safetensors.tmp"
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, tmp)
    tmp.replace(path / "model.safetensors")
    atomic_write_json(path / "config.json", to_hf_config(model.cfg))
    if tokenizer is not None:
        tokenizer.save(path)
        atomic_write_json(
            path / "tokenizer_config.json",
            {"tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": False, "vocab_type": "spm"},
        )
    return path
