"""The benchmark: its FLOP counts against hand counts, its timing loop, and every figure of a quick run
recomputed from the times (and run files) it claims to come from."""

import csv
import json
import resource
import statistics
from types import SimpleNamespace

import pytest
import torch

from lab.bench import benchmark as bench
from lab.bench import measure
from lab.bench.builders import build_lab_step, rtd_step_flops
from lab.bench.measure import COLUMNS, count_flops, format_row, kernel_share, time_alternating
from lab.model import preset
from lab.util import read_jsonl

CPU = torch.device("cpu")


def test_flop_counter_gives_the_analytic_count_of_matmuls():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 8, 16)
    assert count_flops(lambda: q @ k) == 2 * (2 * 4) * 16 * 8 * 16


@pytest.mark.parametrize("sharing", ["es", "gdes"])
@pytest.mark.parametrize("T", [64, 300])
def test_rtd_step_flops_match_the_hand_count(sharing, T):
    # tolerance 1%: the hand count covers every matmul of the step; a change that drops or doubles
    # one (e.g. MLM logits at every position: +50% here) is far outside it. (On the CPU a training
    # step's attention runs decomposed, so the counter sees all of it; fused kernels it may not see,
    # which is why the benchmark reports the hand count for lab's rows.)
    B = 2
    counted = count_flops(build_lab_step("tiny", T, B, "fp32", CPU, sharing))
    expected = rtd_step_flops(preset("tiny", max_seq_len=512), B, T)
    assert abs(counted - expected) <= 0.01 * expected, (counted, expected)


def test_time_alternating_rotates_the_order_and_times_every_call():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_alternating(fns, warmup=1, repeats=3, device=CPU)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # each repeat starts one later
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_matmul_peak_is_flops_of_the_best_timing(monkeypatch):
    """A fake clock that advances 1 s per reading and then 0.25 s: the best timing of an n^3 product
    is 0.25 s, so the peak is 2 n^3 / 0.25 FLOP/s (a plausible slip: n^3, or the worst timing)."""
    ticks = iter([0.0, 1.0, 2.0, 2.25, 3.0, 4.0, 5.0, 5.5, 6.0, 7.0] + [10.0, 11.0] * 10)
    monkeypatch.setattr("lab.bench.measure.time.perf_counter", lambda: next(ticks))
    assert bench.matmul_peak("fp32", CPU, n=64) == 2 * 64**3 / 0.25


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_derived_columns_from_given_times(monkeypatch, one_at_a_time):
    """compare() with the timer replaced by fixed times (lab-es 0.1 s, lab-gdes 0.2 s, hf 0.4 s per step)
    and the FLOP counter by a constant: every derived column against numbers worked out by hand."""
    fixed = {"lab-es": [0.3, 0.1, 0.05], "lab-gdes": [0.2, 0.2, 0.2], "hf": [0.4, 0.5, 0.1]}
    monkeypatch.setattr(bench, "time_alternating", lambda fns, *a: {k: fixed[k] for k in fns})
    monkeypatch.setattr(bench, "count_flops", lambda fn: 3e9)
    monkeypatch.setattr(bench, "rtd_step_flops", lambda cfg, B, T: 2e9)
    bc = bench.BenchConfig(tokens_per_step=64, memory=False, one_at_a_time=one_at_a_time)
    rows = {
        r.impl: r for r in bench.compare("step", "tiny", "fp32", 32, bc, CPU, peak=1e11, log=lambda *a: None)
    }
    # batch 64 // 32 = 2, so 64 tokens per step; medians 0.1, 0.2 and 0.4 s
    assert [rows[i].batch for i in rows] == [2, 2, 2]
    assert rows["lab-es"].ms == pytest.approx(100.0) and rows["hf"].ms == pytest.approx(400.0)
    assert rows["lab-es"].tokens_per_s == pytest.approx(640.0)
    assert rows["lab-gdes"].tokens_per_s == pytest.approx(320.0)
    assert rows["hf"].tokens_per_s == pytest.approx(160.0)
    assert rows["lab-es"].speedup_vs_hf == pytest.approx(4.0)
    assert rows["lab-gdes"].speedup_vs_hf == pytest.approx(2.0)
    assert rows["hf"].speedup_vs_hf == pytest.approx(1.0)
    # lab's rows carry the hand count (2 GFLOP, noted as differing from the counter's 3), hf the counter's
    assert rows["lab-es"].gflop == pytest.approx(2.0) and rows["hf"].gflop == pytest.approx(3.0)
    assert "3.0 GFLOP" in rows["lab-es"].note and rows["hf"].note == ""
    assert rows["lab-es"].mfu == pytest.approx(0.2)  # 2e9 / 0.1 s / 1e11
    assert rows["hf"].mfu == pytest.approx(0.075)  # 3e9 / 0.4 s / 1e11


def test_the_alone_ratio_comes_from_each_candidates_own_process(monkeypatch):
    """With memory on, every step candidate's fresh process also times it alone: alone_ms is the probe's,
    and alone_speedup_vs_hf the peer's alone ms over the row's (by hand: 800 / 200 = 4, 800 / 400 = 2)."""
    monkeypatch.setattr(bench, "time_alternating", lambda fns, *a: {k: [0.1] for k in fns})
    monkeypatch.setattr(bench, "count_flops", lambda fn: 1e9)
    alone = {"lab-es": 200.0, "lab-gdes": 400.0, "hf": 800.0}
    asked = []

    def probe(spec, device):
        asked.append(spec)
        kernel = {"alone_sys_ms": alone[spec["impl"]] / 10, "alone_faults": 1000.0}
        return {"peak_mb": 10.0, "step_mb": 1.0, "alone_ms": alone[spec["impl"]], **kernel}

    monkeypatch.setattr(bench, "measure_memory", probe)
    bc = bench.BenchConfig(tokens_per_step=64, repeats=5)
    rows = {
        r.impl: r for r in bench.compare("step", "tiny", "fp32", 32, bc, CPU, peak=1e11, log=lambda *a: None)
    }
    assert [spec["alone_repeats"] for spec in asked] == [5, 5, 5]
    assert {impl: row.alone_ms for impl, row in rows.items()} == alone
    assert rows["lab-es"].alone_speedup_vs_hf == pytest.approx(4.0)
    assert rows["lab-gdes"].alone_speedup_vs_hf == pytest.approx(2.0)
    assert rows["lab-es"].speedup_vs_hf == pytest.approx(1.0)  # the alternating ratio stays its own
    assert rows["hf"].alone_sys_ms == 80.0 and rows["lab-es"].alone_faults == 1000.0
    assert "alone 200 ms (sys 20 ms, 1,000 faults), 4.00x vs hf alone" in format_row(rows["lab-es"])


def test_kernel_share_counts_the_fresh_pages_a_step_touches():
    """Per step, from two getrusage readings: by hand, 0.3 s of kernel time and 3,000 faults over 3 steps
    are 100 ms and 1,000; and a real step that zero-fills a fresh 64 MB tensor (above glibc's largest
    mmap threshold, 32 MB, so new pages every time) shows page faults, half as many per step over two."""
    before = SimpleNamespace(ru_stime=1.0, ru_minflt=500)
    after = SimpleNamespace(ru_stime=1.3, ru_minflt=3500)
    assert kernel_share(before, after, 3) == pytest.approx({"alone_sys_ms": 100.0, "alone_faults": 1000.0})

    def one_step():
        before = resource.getrusage(resource.RUSAGE_SELF)
        torch.zeros(16 * 2**20).add_(1.0)  # 64 MB, freed at once
        return before, resource.getrusage(resource.RUSAGE_SELF)

    before, after = one_step()
    faults = kernel_share(before, after, 1)["alone_faults"]
    assert faults > 0
    assert kernel_share(before, after, 2)["alone_faults"] == faults / 2


def test_the_results_record_the_allocator_settings_that_decide_page_faults(monkeypatch):
    for key in measure.ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    assert measure.allocator_env() == {} and measure.allocator_text() == "the defaults"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # not an allocator setting
    assert measure.allocator_env() == {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}
    assert measure.allocator_text() == "GLIBC_TUNABLES=glibc.malloc.mmap_max=0"


def test_default_kinds_per_device():
    assert bench.default_kinds(torch.device("cuda")) == bench.ALL_KINDS
    assert bench.default_kinds(CPU) == bench.CLASSIC_KINDS


def test_config_rejects_unknown_kinds_and_compile_modes():
    with pytest.raises(ValueError, match="kinds"):
        bench.BenchConfig(kinds=("steps",))
    with pytest.raises(ValueError, match="compile_modes"):
        bench.BenchConfig(compile_modes=("fast",))


def close(a, b, rel=1e-9):
    return abs(a - b) <= rel * abs(b)


def test_quick_benchmark_figures_follow_from_the_times_they_claim(tmp_path):
    json_path, csv_path, work = tmp_path / "bench.json", tmp_path / "bench.csv", tmp_path / "work"
    argv = ["--quick", "--dtypes", "fp32", "--out-dir", str(tmp_path), "--work-dir", str(work)]
    assert bench.cli(argv) == 0

    result = json.loads(json_path.read_text())
    rows = result["rows"]
    assert result["matmul_peak_gflops"]["fp32"] > 0
    assert result["allocator_env"] == measure.allocator_env()
    by = {(r["kind"], r["T"], r["impl"]): r for r in rows}
    T, long_T = bench.QUICK.step_seq_lens[0], max(bench.QUICK.layer_seq_lens)
    for impl in ("lab-es", "lab-gdes", "hf", "lab-es+default"):
        assert ("step", T, impl) in by
    for kind in ("encoder", "attention"):
        assert (kind, long_T, "lab") in by and (kind, T, "hf") in by
    assert {r["kind"] for r in rows} == {"step", "encoder", "attention", "pretrain", "finetune"}

    for r in rows:
        assert r["ms"] > 0, r
        if r["kind"] != "finetune":
            assert r["tokens_per_s"] > 0, r
    step = {r["impl"]: r for r in rows if r["kind"] == "step"}
    for impl in ("lab-es", "lab-gdes", "hf"):
        assert step[impl]["peak_mb"] > step[impl]["step_mb"] > 0, step[impl]
        assert step[impl]["alone_ms"] > 0, step[impl]  # timed alone in the memory probe's process
        assert step[impl]["alone_sys_ms"] >= 0 and step[impl]["alone_faults"] >= 0, step[impl]
    assert close(step["lab-es"]["alone_speedup_vs_hf"], step["hf"]["alone_ms"] / step["lab-es"]["alone_ms"])
    # the peer computes logits at every position, so it must count more FLOPs than lab at equal shape
    assert step["hf"]["gflop"] > step["lab-es"]["gflop"]
    compiled = step["lab-es+default"]
    assert compiled["compile_s"] > 0 and compiled["gflop"] == step["lab-es"]["gflop"]

    # pretrain: the median ms/step of train()'s logged windows after the first
    pre = next(r for r in rows if r["kind"] == "pretrain")
    windows = [w for w in read_jsonl(work / "pretrain" / "run" / "metrics.jsonl") if w["split"] == "train"]
    assert len(windows) == bench.QUICK.pretrain.steps // bench.QUICK.pretrain.log_every
    assert close(pre["ms"], statistics.median(w["ms_per_step"] for w in windows[1:]))
    assert pre["vocab"] == bench.QUICK.pretrain.vocab and pre["impl"] == "lab-gdes"
    assert close(
        pre["gflop"] * 1e9,
        rtd_step_flops(preset("tiny", vocab_size=pre["vocab"]), pre["batch"], pre["T"]),
    )

    # finetune: training examples of epochs 2.. over those epochs' training time (evaluation excluded)
    ft = next(r for r in rows if r["kind"] == "finetune")
    epochs = read_jsonl(work / "finetune" / "run" / "metrics.jsonl")
    n = json.loads((work / "finetune" / "run" / "results.json").read_text())["n_train_examples"]
    assert n == bench.QUICK.finetune.examples and len(epochs) == bench.QUICK.finetune.epochs
    train_s = sum(e["train_s"] for e in epochs[1:])
    assert 0 < train_s < epochs[-1]["elapsed_s"] - epochs[0]["elapsed_s"]
    assert close(ft["examples_per_s"], (len(epochs) - 1) * n / train_s)
    assert close(ft["ms"], 1e3 * ft["batch"] / ft["examples_per_s"])

    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and set(table[0]) == set(COLUMNS)
