import copy
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from lab.model import Layer, preset
from lab.rtd import RTDModel
from lab.training import adamw, autocast, compile_model, compile_scope, decay_groups, linear_schedule


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


def rtd_loss_and_grads(model, forward, cfg):
    """One RTD training forward and backward (dropout off, the same sampling draw): loss and gradients."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, cfg.vocab_size - 1, (2, 24), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    torch.manual_seed(1)
    loss = forward(ids, mask, torch.tensor([0, 1, 2, 3]), cfg.vocab_size - 1).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def compiled_against_eager(backend, sharing="gdes", emd=False):
    cfg = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    eager = RTDModel(cfg, sharing=sharing, emd=emd)
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    forward = compile_model(model, backend=backend, scope="layers")
    assert forward is model and model.state_dict().keys() == eager.state_dict().keys()
    want, want_grads = rtd_loss_and_grads(eager, eager, cfg)
    got, got_grads = rtd_loss_and_grads(model, forward, cfg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)
    return model


def test_regional_compile_traces_the_layer_once_for_generator_and_discriminator():
    """Regional compilation: every Layer of both encoders runs one compiled graph (dynamo's aot_eager
    here, its tracing and autograd without code generation), with eager's loss and gradients."""
    counter = CompileCounterWithBackend("aot_eager")
    model = compiled_against_eager(counter)
    assert len(model.generator.layers) >= 1 and len(model.discriminator.layers) >= 2
    assert all(m._compiled_call_impl is not None for m in model.modules() if isinstance(m, Layer))
    assert counter.frame_count == 1  # one graph, however many layers (generator and discriminator)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_against_eager(counter, emd=True)  # the enhanced mask decoder calls its layer with a query
    assert counter.frame_count == 2


@pytest.mark.slow  # inductor's first CPU compile of the layer takes about a minute with a cold cache
def test_regional_compile_with_inductor_matches_eager():
    compiled_against_eager("inductor", sharing="es")


def test_compile_scope_auto_is_layers_except_under_cuda_graphs():
    assert compile_scope("auto", None) == "layers" and compile_scope("auto", "default") == "layers"
    assert compile_scope("auto", "reduce-overhead") == "model" and compile_scope("model", None) == "model"
    with pytest.raises(ValueError, match="compile scope 'everything'"):
        compile_scope("everything", None)
    with pytest.raises(ValueError, match="no encoder Layer"):
        compile_model(nn.Linear(2, 2), scope="layers")


KEEP_FREED_PROBE = """
import resource, statistics, torch
from lab.util import keep_freed_memory
applied = keep_freed_memory()
faults = []
for _ in range(25):  # 64 MB, above glibc's largest mmap threshold (32 MB), freed at once, as a step does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.zeros(16 * 2**20).add_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, statistics.median(faults[10:]))  # the heap settles over the first few requests
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; elsewhere it does nothing")
def test_keep_freed_memory_serves_a_repeated_large_tensor_from_pages_already_mapped():
    """By default every 64 MB request is mapped afresh and faulted in (16,384 pages of 4 KiB, or 32 huge
    pages); once keep_freed_memory applied, the repeats reuse pages already mapped (after the first few,
    while the freed blocks settle where the aligned request fits); the switch turns it off."""

    def probe(switch: str) -> tuple[str, float]:
        env = {**os.environ, "LAB_KEEP_FREED_MEMORY": switch, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, "-c", KEEP_FREED_PROBE], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        applied, faults = out.stdout.split()
        return applied, float(faults)

    (applied_on, faults_on), (applied_off, faults_off) = probe("1"), probe("0")
    assert (applied_on, applied_off) == ("True", "False")
    assert faults_on < 100 and faults_off > faults_on, (faults_on, faults_off)


@pytest.mark.parametrize("verb", ["pretrain", "finetune"])
def test_the_training_commands_keep_freed_memory(verb, monkeypatch, tmp_path):
    """`lab pretrain` and `lab finetune` apply keep_freed_memory before they train (not the test process:
    the training and the allocator call are both replaced here)."""
    import lab.finetune.loop as finetune
    import lab.pretrain.cli as pretrain

    calls = []
    module = pretrain if verb == "pretrain" else finetune
    monkeypatch.setattr(module, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(module, "train", lambda cfg: calls.append("train") or {})
    monkeypatch.setattr(finetune, "run_table", lambda *a, **k: calls.append("train"))
    if verb == "pretrain":
        assert pretrain.cli(["--out-dir", str(tmp_path)]) == 0
    else:
        argv = ["--task", "sst2,cola", "--init", "a", "--out-dir", str(tmp_path)]
        assert finetune.cli(argv) == 0
    assert calls == ["keep", "train"]
