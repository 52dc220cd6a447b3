"""The prepared GPU run: its smoke mode end to end on the CPU (every part, the files it writes), and the
pieces it is built from — the sync counter (lab.bench.syncs), the correctness checks (lab.bench.devicecheck, shown
to catch planted bugs), the budget (lab.bench.budget), the figures' names (lab.bench.gpureport), the data
preparation, and an import chain that needs nothing the GPU machine lacks."""

import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lab.bench import budget, devicecheck, gpucheck, gpureport, syncs
from lab.bench.builders import default_attention_impl
from lab.bench.loops import bench_corpus, random_words, write_sst2_like
from lab.bench.measure import COLUMNS

ROOT = Path(__file__).resolve().parent.parent


def fake_data(root: Path) -> Path:
    """A WikiText-shaped corpus of random words and an SST-2-shaped task: what --prepare-data copies."""
    words = random_words(400)
    rng = random.Random(0)
    lines = []
    for d in range(40):
        lines += [" ", f" = Title {d} = ", " "]
        lines += [" " + " ".join(rng.choices(words, k=60)) + " " for _ in range(5)]
    (root / "wikitext-2").mkdir(parents=True)
    (root / "wikitext-2" / "wiki.train.tokens").write_text("\n".join(lines) + "\n")
    write_sst2_like(root / "glue", words, 64, 32)
    return root


def test_smoke_run_writes_every_part_and_plausible_figures(tmp_path):
    data, out = fake_data(tmp_path / "data"), tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "lab",
        "gpucheck",
        "--smoke",
        "--out-dir",
        str(out),
        "--data-dir",
        str(data),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((out / "gpucheck.json").read_text())
    parts = result["parts"]
    assert result["part_order"] == [p.name for p in gpucheck.PARTS] and set(parts) == set(
        result["part_order"]
    )
    for part in gpucheck.PARTS:
        expected = "ok" if part.smoke else "skipped"
        assert parts[part.name]["status"] == expected, (part.name, parts[part.name].get("error"))
    env_info = parts["env"]["result"]
    assert env_info["matmul_peak_n"] == gpucheck.SMOKE.peak_n and env_info["matmul_peak_tflops"]["fp32"] > 0

    checks = parts["correctness"]["result"]["checks"]
    assert "rtd_loss/fp32" in checks and any(k.startswith("encoder[") for k in checks)
    for key, check in checks.items():
        assert check["ok"], (key, check)
    assert checks[f"encoder[{default_attention_impl() or 'default'}]/fp32"]["forward"]["max_abs"] < 1e-5
    assert checks["rtd_loss/fp32"]["loss"]["max_rel"] < 1e-5

    rows = result["rows"]
    kinds = {(r["kind"], r["impl"]) for r in rows}
    for kind, impl in [("step", "lab-es"), ("step", "lab-gdes"), ("step", "hf"), ("step", "lab-es+default"),
                       ("attention", "lab"), ("attention", "hf"), ("pretrain", "lab-gdes"), ("finetune", "lab")]:  # fmt: skip
        assert (kind, impl) in kinds, (kind, impl)
    for r in rows:
        assert r["ms"] > 0 and (r["tokens_per_s"] is None or r["tokens_per_s"] > 0), r
    compiled = next(r for r in rows if r["impl"] == "lab-es+default")
    assert compiled["compile_s"] > 0 and compiled["speedup_vs_hf"] > 0

    # the short run: a smoke-sized WikiText pre-training, syncs counted per step by the CPU stand-in
    syncs = parts["short_run"]["result"]["syncs"]
    size = gpucheck.SMOKE.short_run
    assert syncs["optimizer_steps"] == size.steps
    assert syncs["steady_steps"] == len(
        [k for k in range(syncs["warmup_buckets"], size.steps) if k % size.log_every]
    )
    assert syncs["steady_steps"] >= 2
    assert syncs["syncs_in_steady_steps"] == 0, syncs["steady_sites"]
    assert syncs["syncs_elsewhere"] > 0  # logging and evaluation do read values: the counter sees them

    run = parts["torchrun"]["result"]
    assert run["returncode"] == 0 and run["world_size"] == 1 and run["backend"] == "gloo"
    assert run["steps"] == gpucheck.SMOKE.torchrun.steps and run["ok"]
    finetune = parts["finetune"]["result"]
    assert finetune["task"] == "sst2" and 0.0 <= finetune["dev"]["accuracy"] <= 1.0

    assert result["optional_modules_imported"] == []  # nothing beyond what the GPU machine has
    with open(out / "gpucheck.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and list(table[0]) == list(COLUMNS)
    summary = (out / "summary.txt").read_text()
    assert summary == proc.stdout[-len(summary) :]  # the summary is also the end of stdout
    assert len(summary.splitlines()) <= 45
    for text in ("targets:", "correctness", "host syncs per steady-state step", "torchrun", "fine-tune sst2",
                 "compile sweep", "optional packages imported: none"):  # fmt: skip
        assert text in summary, text
    assert (out / "gpucheck.log").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == [
        "gpucheck.csv",
        "gpucheck.json",
        "gpucheck.log",
        "summary.txt",
    ]


def test_sync_counter_puts_each_sync_in_the_step_that_made_it():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    with syncs.SyncCounter(torch.device("cpu")) as counter:
        for step in range(6):
            loss = (weight * torch.arange(3.0)).sum()
            if step in (2, 4):
                loss.item()  # a sync inside steps 2 and 4
            loss.backward()
            optimizer.step()
            if step == 2:
                weight.detach().tolist()  # after step 2's update: counted with step 3 (bucket 3)
    assert [len(b) for b in counter.buckets] == [0, 0, 1, 1, 1, 0, 0]
    assert counter.buckets[2][0].startswith("test_gpucheck.py:") and "(item)" in counter.buckets[2][0]
    # steady = steps 2..5 without multiples of 3: 2, 4, 5
    report = counter.report(steps=6, log_every=3, eval_every=100, ckpt_every=100)
    assert (
        report["steady_steps"] == 3
        and report["syncs_in_steady_steps"] == 2
        and report["syncs_elsewhere"] == 1
    )
    assert all(getattr(torch.Tensor, name).__name__ != "counted" for name in counter.CPU_METHODS)  # restored


def test_correctness_checks_pass_on_the_code_and_catch_planted_bugs(monkeypatch):
    shape = gpucheck.SMOKE.correctness
    assert devicecheck.check_rtd_loss(torch.device("cpu"), shape, "fp32")["ok"]
    assert devicecheck.check_encoder(None, "fp32", torch.device("cpu"), shape)["ok"]

    import lab.model
    import lab.rtd

    # an RTD loss averaged over padding too, and an encoder that ignores the padding mask
    monkeypatch.setattr(lab.rtd, "_masked_mean", lambda values, mask: values.mean())
    assert not devicecheck.check_rtd_loss(torch.device("cpu"), shape, "fp32")["ok"]
    monkeypatch.setattr(
        lab.model, "key_padding_bias", lambda mask, dtype: torch.zeros(mask.shape[0], 1, 1, mask.shape[1])
    )
    assert not devicecheck.check_encoder(None, "fp32", torch.device("cpu"), shape)["ok"]


def test_parts_run_within_the_budget_and_failures_do_not_stop_the_rest():
    c = gpucheck.Check(
        torch.device("cpu"), gpucheck.SMOKE, Path("."), Path("."), smoke=False, log=lambda s: None
    )

    def broken(c):
        raise ValueError("planted")

    parts = [
        budget.Part("first", 1, lambda c: {"rows": []}),
        # a subprocess's timeout: what is left of the part's own limit (1.5 x 10 s), less the margin
        budget.Part("bounded", 10, lambda c: {"child_timeout": budget.remaining_s()}),
        budget.Part("broken", 1, broken),
        budget.Part("slow", 1, lambda c: time.sleep(10)),
        budget.Part("too_big", 1000, lambda c: {}),
        budget.Part("last", 1, lambda c: {"x": 1}),
    ]
    written = []
    records = budget.run_parts(c, parts, budget_s=60, write=lambda r: written.append(dict(r)))
    status = {name: r["status"] for name, r in records.items()}
    assert status == {"first": "ok", "bounded": "ok", "broken": "error", "slow": "timeout", "too_big": "skipped",
                      "last": "ok"}  # fmt: skip
    assert (
        15 - budget.CHILD_MARGIN_S - 1
        < records["bounded"]["result"]["child_timeout"]
        <= 15 - budget.CHILD_MARGIN_S
    )
    assert (
        "planted" in records["broken"]["error"] and records["slow"]["seconds"] < 5
    )  # stopped at 1.5x budget
    assert [len(w) for w in written] == [1, 2, 3, 4, 5, 6]  # results written after every part


def test_prepare_data_copies_what_the_device_needs_and_its_tokenizers(tmp_path, monkeypatch):
    import lab.pretrain.data

    source = fake_data(tmp_path / "source")
    monkeypatch.setenv("LAB_DATA_DIR", str(source))
    monkeypatch.setattr(gpucheck, "GPU", gpucheck.SMOKE)  # the GPU sizes' 32k-piece tokenizers take minutes
    assert gpucheck.cli(["--prepare-data", "--data-dir", str(tmp_path / "dest")]) == 0
    copied = sorted(
        str(p.relative_to(tmp_path / "dest")) for p in (tmp_path / "dest").rglob("*") if p.is_file()
    )
    tokenizers = [p for p in copied if p.startswith("tokenizers/")]
    assert sorted(set(copied) - set(tokenizers)) == [
        "glue/SST-2/dev.tsv",
        "glue/SST-2/train.tsv",
        "wikitext-2/wiki.train.tokens",
    ]
    # WikiText-2's (short_run and torchrun share a vocabulary size) and the random-word corpus's
    assert len(tokenizers) == 2 and all(p.endswith("/spm.model") for p in tokenizers)
    # on the device: the data's copy elsewhere, the tokenizers installed into the run's cache, and
    # the parts' corpora find them without training (the cache key is the files' content)
    device_data = tmp_path / "device" / ".gpudata"
    shutil.copytree(tmp_path / "dest", device_data)
    cache = tmp_path / "device" / "cache"
    assert gpucheck.install_tokenizers(device_data, cache) == 2
    monkeypatch.setenv("LAB_CACHE_DIR", str(cache))
    monkeypatch.setattr(
        lab.pretrain.data, "train_tokenizer", lambda *a, **k: pytest.fail("trained on the device")
    )
    corpus = str(device_data / "wikitext-2" / "wiki.train.tokens")
    lab.pretrain.data.corpus_tokenizer(lab.pretrain.data.open_corpus(corpus), gpucheck.SMOKE.short_run.vocab)
    random_corpus = bench_corpus(gpucheck.SMOKE.pretrain, tmp_path / "device" / "work")
    lab.pretrain.data.corpus_tokenizer(
        lab.pretrain.data.open_corpus(str(random_corpus)), gpucheck.SMOKE.pretrain.vocab
    )
    c = gpucheck.Check(torch.device("cpu"), gpucheck.SMOKE, device_data, tmp_path / "device", smoke=True)
    assert gpucheck.tokenizers_trained_here(c) == []
    assert (tmp_path / "dest" / "wikitext-2" / "wiki.train.tokens").read_bytes() == (
        source / "wikitext-2" / "wiki.train.tokens"
    ).read_bytes()
    with pytest.raises(FileNotFoundError, match="LAB_DATA_DIR"):
        gpucheck.prepare_data(tmp_path / "empty", tmp_path / "dest2")
    assert ".gpudata/" in (ROOT / ".gitignore").read_text().splitlines()


def test_device_slug_names_the_figures():
    assert gpureport.device_slug("NVIDIA H200") == "h200"
    assert gpureport.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert gpureport.device_slug("NVIDIA A100-SXM4-80GB") == "a100"


def test_without_a_gpu_the_check_says_to_use_smoke(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        gpucheck.cli(["--out-dir", str(tmp_path)])
    assert "--smoke" in capsys.readouterr().err


def test_finetune_part_needs_a_discriminator_and_says_so(tmp_path):
    c = gpucheck.Check(
        torch.device("cpu"), gpucheck.SMOKE, fake_data(tmp_path / "data"), tmp_path, smoke=True
    )
    c.state["short_run"] = tmp_path / "no-run"  # a short run that never exported
    with pytest.raises(RuntimeError, match="short_run or pretrain"):
        gpucheck.part_finetune(c)


def test_the_check_imports_nothing_the_gpu_machine_lacks():
    # a fresh interpreter: what importing the check (and the lab modules its parts import later) loads
    code = (
        "import sys, lab.bench.gpucheck, lab.pretrain.loop, lab.finetune.loop, lab.bench.benchmark\n"
        "from lab.bench.gpureport import OPTIONAL_MODULES\n"
        "print(','.join(sorted(m for m in OPTIONAL_MODULES if m in sys.modules)))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == ""


def test_compile_mode_auto_follows_the_measured_table():
    """auto: the mode measured fastest for the preset, "default" where nothing was measured and for
    multi-process runs; an explicit mode is kept."""
    from lab.pretrain.config import AUTO_COMPILE_MODE, PretrainConfig, compile_mode

    for name, mode in AUTO_COMPILE_MODE.items():
        assert compile_mode(PretrainConfig(preset=name), 1) == mode
        assert compile_mode(PretrainConfig(preset=name), 2) == "default"
    assert compile_mode(PretrainConfig(preset="xsmall"), 1) == "reduce-overhead"
    assert compile_mode(PretrainConfig(preset="large"), 1) == "default"
    assert compile_mode(PretrainConfig(preset="xsmall", compile_mode="max-autotune"), 4) == "max-autotune"
    assert [p.name for p in gpucheck.PARTS][-1] == "flex"  # a sticky CUDA error there fails nothing else


# a launcher that starts a process in its own group and then exits or waits: what torchrun leaves
# behind when its launcher dies before its workers (the worker is no longer this test's descendant)
PLANTED_LAUNCHER = """
import os, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()} {worker.pid}\\n")
if sys.argv[2] == "wait":
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed orphan may stay one under a non-reaping init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def planted_overrun(pids_file: Path):
    """A part that starts processes three ways and then never ends: a launcher in its own session that
    exits at once, its worker left in its group (through run_process_group); a plain child in this
    process's group (as inductor's compile workers are); a launcher in a session of its own that keeps
    running (started directly, as a part that forgot the helper would)."""

    def run(c):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        budget.run_process_group([sys.executable, "-c", PLANTED_LAUNCHER, str(pids_file), "exit"], env, 600)
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        launcher = subprocess.Popen(
            [sys.executable, "-c", PLANTED_LAUNCHER, str(pids_file), "wait"], env=env, start_new_session=True
        )
        with open(pids_file, "a") as f:
            f.write(f"{worker.pid}\n")
        c.partial["started"] = [worker.pid, launcher.pid]
        time.sleep(600)
        return {"unreachable": True}

    return run


def wait_until_dead(pids: list[int], seconds: float = 5.0) -> list[int]:
    """The pids still alive after up to `seconds` (SIGKILL is asynchronous)."""
    deadline = time.time() + seconds
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_rehearsal_a_part_is_stopped_the_rest_skipped_and_nothing_it_started_survives(tmp_path, monkeypatch):
    """gpucheck --smoke under a budget it cannot meet: env finishes, a planted part that overruns is
    stopped when the budget runs out, the parts after it are skipped, gpucheck.json says so, and no
    process the planted part started is left (killed by process group and by descent)."""
    pids_file = tmp_path / "pids.txt"
    parts = (gpucheck.PARTS[0], budget.Part("overrun", 5, planted_overrun(pids_file)), *gpucheck.PARTS[1:3])
    monkeypatch.setattr(gpucheck, "PARTS", parts)
    for name in ("LAB_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # cli sets them
        monkeypatch.setenv(name, str(tmp_path / name))
    out = tmp_path / "out"
    data = fake_data(tmp_path / "data")
    start = time.perf_counter()
    assert gpucheck.cli(["--smoke", "--budget-s", "20", "--out-dir", str(out), "--data-dir", str(data)]) == 0
    assert time.perf_counter() - start < 40

    result = json.loads((out / "gpucheck.json").read_text())
    records = result["parts"]
    assert [records[p.name]["status"] for p in parts] == ["ok", "timeout", "skipped", "skipped"]
    assert records["env"]["result"]["matmul_peak_tflops"]["fp32"] > 0  # what finished is kept
    stopped = records["overrun"]
    assert "stopped after" in stopped["error"] and "time limit" in stopped["error"]
    assert len(stopped["result"]["started"]) == 2 and stopped["killed"] >= 2
    assert all("left of 20 s" in records[p.name]["note"] for p in parts[2:])
    assert "timeout: overrun: stopped after" in (out / "summary.txt").read_text()

    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 5  # two launchers with a worker each, one plain child
    assert wait_until_dead(pids) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_subprocess_that_times_out_is_killed_with_its_group(tmp_path):
    pids_file = tmp_path / "pids.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", PLANTED_LAUNCHER, str(pids_file), "wait"]
    with pytest.raises(budget.PartTimeout, match="killed \\(process group\\) after 3 s"):
        budget.run_process_group(command, env, timeout=3)
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 2 and wait_until_dead(pids) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("ending", [ValueError, KeyboardInterrupt])
def test_a_part_that_fails_or_is_interrupted_leaves_no_process(tmp_path, ending):
    pids_file = tmp_path / "pids.txt"

    def run(c):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        budget.run_process_group([sys.executable, "-c", PLANTED_LAUNCHER, str(pids_file), "exit"], env, 600)
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pids_file.write_text(pids_file.read_text() + f"{worker.pid}\n")
        raise ending("planted")

    c = gpucheck.Check(
        torch.device("cpu"), gpucheck.SMOKE, tmp_path, tmp_path, smoke=False, log=lambda s: None
    )
    written = []
    parts = [budget.Part("ends", 5, run), budget.Part("after", 1, lambda c: {})]
    if ending is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            budget.run_parts(c, parts, budget_s=60, write=lambda r: written.append(dict(r)))
        assert [r["status"] for r in written[-1].values()] == ["interrupted"]  # recorded, then re-raised
    else:
        records = budget.run_parts(c, parts, budget_s=60, write=lambda r: written.append(dict(r)))
        assert [r["status"] for r in records.values()] == ["error", "ok"]
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 3 and wait_until_dead(pids) == []


def test_part_budgets_fit_the_total_in_the_order_a_first_run_needs():
    names = [p.name for p in gpucheck.PARTS]
    assert names[:5] == ["env", "correctness", "step", "pretrain", "finetune"]
    assert sum(p.budget_s for p in gpucheck.PARTS) <= gpucheck.GPU_BUDGET_S
    assert not set(gpucheck.SKIPPED_BY_DESIGN) & set(names)
