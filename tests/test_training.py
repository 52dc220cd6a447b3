import pytest
import torch
from torch import nn

from lab.model import preset
from lab.rtd import RTDModel
from lab.training import adamw, autocast, decay_groups, linear_schedule


def test_linear_schedule_hand_values():
    # warmup 4 steps to the peak, then linear decay to 0 at step 10
    assert [linear_schedule(s, 4, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert linear_schedule(4, 4, 10) == 1.0
    assert linear_schedule(7, 4, 10) == pytest.approx(0.5)
    assert linear_schedule(10, 4, 10) == 0.0
    assert linear_schedule(12, 4, 10) == 0.0  # never negative past the end


def test_decay_groups_exclude_biases_and_layernorm():
    model = RTDModel(preset("tiny"), sharing="gdes")
    decay, no_decay = (set(map(id, g["params"])) for g in decay_groups(model, 0.01))
    names = {id(p): n for n, p in model.named_parameters()}
    assert not decay & no_decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    for pid in no_decay:  # every bias and LayerNorm parameter, nothing else
        assert names[pid].endswith("bias") or "norm" in names[pid], names[pid]
    assert id(model.embedding_delta) in decay  # GDES's residual table decays like a weight matrix
    assert id(model.mlm_head.bias) in no_decay


def test_adamw_decays_only_matrices():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    opt = adamw(model, lr=0.1, weight_decay=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no gradients: only the decoupled decay can move a parameter (and it skips p.grad None)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = list(model.parameters())
    assert not torch.equal(before[0], after[0].detach())  # Linear weight shrinks by lr * wd
    assert torch.allclose(after[0].detach(), before[0] * (1 - 0.1 * 0.5))
    for b, a in zip(before[1:], after[1:]):  # Linear bias, LayerNorm weight and bias untouched
        assert torch.equal(b, a.detach())


def test_autocast_takes_a_dtype_or_its_command_line_name():
    x = torch.randn(4, 4)
    for dtype in ("bf16", torch.bfloat16):
        with autocast("cpu", dtype):
            assert (x @ x).dtype == torch.bfloat16
    for dtype in ("fp32", torch.float32, None):
        with autocast("cpu", dtype):
            assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError, match="'fp16'.*bf16"):
        autocast("cpu", "fp16")
