"""Parity with an independent implementation: transformers.DebertaV2Model.

`transformers` is a dev dependency: without it this module fails to import, loudly, on purpose.
"""

import json

import pytest
import torch
from transformers import DebertaV2Config, DebertaV2Model

import lab
from lab.hf import from_hf_state_dict, to_hf_config, to_hf_state_dict
from lab.model import Encoder, preset

CONFIGS = {"tiny": preset("tiny"), "xsmall-shaped": preset("xsmall", vocab_size=1000, num_layers=3)}
# a long-input config: distances past max_relative_positions fall into buckets beyond B - 1, whose
# table index saturates (transformers and the official code do not clamp the distance itself)
LONG = preset("tiny", max_seq_len=2048, max_relative_positions=512)


def batch(cfg, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.vocab_size, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, T - T // 4 :] = 0  # one row 25% padding
    return ids, mask


def hf_model(cfg) -> DebertaV2Model:
    return DebertaV2Model(DebertaV2Config(**to_hf_config(cfg))).eval()


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("T", [7, 128, 512])
def test_ours_equals_hf_on_non_pad_rows(name, T):
    cfg = CONFIGS[name]
    torch.manual_seed(1)
    ours = Encoder(cfg).eval()
    hf = hf_model(cfg)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)  # ours -> HF names
    ids, mask = batch(cfg, T)
    with torch.no_grad():
        a = ours(ids, mask)
        b = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() < 1e-5


@pytest.mark.parametrize("T", [700, 1024])
def test_ours_equals_hf_past_max_relative_positions(T):
    torch.manual_seed(3)
    ours = Encoder(LONG).eval()
    hf = hf_model(LONG)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    ids, mask = batch(LONG, T)
    with torch.no_grad():
        a = ours(ids, mask)
        b = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    err = (a[keep] - b[keep]).abs().max().item()
    print(f"T={T}: max abs difference to transformers {err:.2e}")  # shown with pytest -s
    assert err < 1e-5


def test_hf_weights_convert_back_into_ours():
    cfg = CONFIGS["tiny"]
    torch.manual_seed(2)
    hf = hf_model(cfg)
    state, ignored = from_hf_state_dict(hf.state_dict())  # HF -> ours names
    ours = Encoder(cfg).eval()
    ours.load_state_dict(state, strict=True)
    ids, mask = batch(cfg, 64)
    with torch.no_grad():
        diff = ours(ids, mask) - hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert diff[mask.bool()].abs().max() < 1e-5


def test_released_layout_with_prefix_and_heads_loads(tmp_path):
    """Released pre-training checkpoints prefix `deberta.` and carry heads; from_pretrained reads them."""
    cfg = CONFIGS["tiny"]
    hf = hf_model(cfg)
    state = {f"deberta.{k}": v for k, v in hf.state_dict().items()}
    state["lm_predictions.lm_head.bias"] = torch.zeros(cfg.vocab_size)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    ours = lab.from_pretrained(tmp_path)
    ids, mask = batch(cfg, 32)
    with torch.no_grad():
        diff = ours(ids, mask) - hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert diff[mask.bool()].abs().max() < 1e-5


def test_save_pretrained_round_trips_through_transformers(tmp_path):
    cfg = CONFIGS["xsmall-shaped"]
    ours = Encoder(cfg).eval()
    lab.save_pretrained(ours, tmp_path)
    hf = DebertaV2Model.from_pretrained(tmp_path).eval()
    again = lab.from_pretrained(tmp_path)
    ids, mask = batch(cfg, 40)
    with torch.no_grad():
        a = ours(ids, mask)
        b = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        c = again(ids, mask)
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() < 1e-5
    assert torch.equal(a, c)


def test_non_v3_config_is_refused(tmp_path):
    cfg = to_hf_config(CONFIGS["tiny"])
    cfg["position_biased_input"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="position_biased_input"):
        lab.from_pretrained(tmp_path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        lab.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        lab.from_pretrained(tmp_path / "nope")
