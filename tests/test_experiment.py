"""The sharing experiment on tiny sizes: end to end, interrupted and resumed, planned, refused."""

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from lab import sharing
from lab.analysis import claims, experiment
from lab.analysis import runs as experiment_runs
from lab.util import replace_strict

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("synth_tag", "synth_gram")
GLUE_FIXTURE = str(ROOT / "tests" / "fixtures" / "glue")


def tiny(out_dir, **changes) -> experiment.ExperimentConfig:
    """The smoke recipe: tiny preset, 8 steps, 2 pre-training x 2 fine-tuning seeds, 2 tasks."""
    fields = {"out_dir": str(out_dir), "tasks": TASKS, "finetune.glue_dir": GLUE_FIXTURE, "progress": "none"}
    return experiment.recipe("smoke", **{**fields, **changes})


def log_rows(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.out_dir) / "experiment.jsonl").read_text().splitlines()]


def invocations(cfg) -> list[list[dict]]:
    """The run log split at each invocation."""
    groups = []
    for row in log_rows(cfg):
        if row["event"] == "invocation":
            groups.append([])
        groups[-1].append(row)
    return groups


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """An experiment interrupted in the middle of a pre-training run (after seed 0's runs all finished),
    then rerun with the same settings."""
    cfg = tiny(tmp_path_factory.mktemp("experiment") / "exp")
    real = experiment.execute

    def interrupted(run, cfg):
        if run == experiment_runs.PlannedRun("pretrain", "es", 1):
            from lab.pretrain import loop as pretrain

            pretrain.train(dataclasses.replace(experiment_runs.pretrain_config(cfg, run), stop_after=4))
            raise KeyboardInterrupt  # as if Ctrl-C came right after the step-4 checkpoint
        real(run, cfg)

    experiment.execute = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            experiment.run(cfg)
    finally:
        experiment.execute = real
    finished = {
        p: p.stat().st_mtime_ns
        for p in Path(cfg.out_dir).rglob("*-s0/**/*")
        if p.name in ("summary.json", "results.json")
    }
    summary = experiment.run(cfg)
    return cfg, summary, finished


def test_interrupted_experiment_resumes_without_redoing_finished_runs(resumed):
    cfg, _, finished = resumed
    first, second = invocations(cfg)
    seed0 = [r.name for r in experiment_runs.planned_runs(cfg) if r.pretrain_seed == 0]
    assert [r["run"] for r in first if r["event"] == "finished"] == seed0
    assert [r["run"] for r in first if r["event"] == "interrupted"] == ["pretrain es s1"]
    # the rerun reuses every finished run, resumes the interrupted one from its checkpoint, runs the rest
    assert sorted(r["run"] for r in second if r["event"] == "reused") == sorted(seed0)
    assert [r["run"] for r in second if r["event"] == "resumed"] == ["pretrain es s1"]
    started = [r["run"] for r in second if r["event"] == "started"]
    assert (
        not set(started) & set(seed0)
        and len(started) == len(experiment_runs.planned_runs(cfg)) - len(seed0) - 1
    )
    # their files were not rewritten
    # seed 0: 3 pre-training summaries and the untrained control's, 16 fine-tuning results (4 arms x 2 x 2)
    assert len(finished) == 4 + 4 * 2 * 2
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in finished.items())
    # the resumed run continued at step 4 instead of starting over: one train row per step, in order
    rows = [json.loads(line) for line in (Path(cfg.out_dir) / "pretrain" / "es-s1" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, cfg.pretrain.steps + 1))


def test_experiment_writes_the_report_end_to_end(resumed):
    cfg, summary, _ = resumed
    report = Path(cfg.out_dir) / "report"
    for name in ("tug_of_war_summary", "tug_of_war_differences", "downstream", "downstream_differences"):
        assert (report / f"{name}.csv").stat().st_size > 0 and (report / f"{name}.md").is_file()
    for name in ("mlm_loss_train", "mlm_loss_heldout", "similarity_pull_mlm", "downstream"):
        assert (report / f"{name}.csv").is_file() and (report / f"{name}.png").is_file()
    assert (report / "seed-0" / "embedding_cosine.csv").is_file()
    assert json.loads((report / "summary.json").read_text())["experiment"] == cfg.out_dir
    # every mode x task x metric has 2 x 2 paired seeds; every comparison is listed with its verdict
    table = summary["downstream"]["table"]
    arms = (*cfg.modes, experiment_runs.CONTROL)  # the untrained control beside the modes
    assert {(r["task"], r["mode"]) for r in table} == {(t, m) for t in TASKS for m in arms}
    # per-mode intervals over the 2 pre-training seeds, each the mean of its 2 fine-tuning seeds
    assert all(r["n"] == 2 and r["finetune_seeds"] == 2 for r in table)
    diffs = summary["downstream"]["differences"]
    gains = {f"{m} - {experiment_runs.CONTROL}" for m in cfg.modes}
    assert {r["comparison"] for r in diffs} == {"gdes - es", "gdes - nes", "es - nes"} | gains
    assert all(r["family"] == "exploratory" for r in diffs if r["comparison"] in gains)
    assert all(r["n"] == 2 and r["finetune_seeds"] == 2 for r in diffs)  # n: pre-training seeds
    primary = {(r["task"], r["comparison"]) for r in diffs if r["family"] == experiment.DOWNSTREAM_FAMILY}
    assert primary == {(t, c.comparison) for t in TASKS for c in claims.ORDERING}
    # the tug-of-war quantities of every pre-training run, two seeds per mode
    rows = summary["tug_of_war"]["summary"]
    cos = {r["mode"]: r for r in rows if r["quantity"] == "cos_E_G"}
    assert set(cos) == set(cfg.modes) and all(r["n"] == 2 for r in cos.values())
    assert {r["quantity"] for r in rows} >= {
        "final_mlm_loss",
        "mlm_area",
        "final_fixed_auc",
        "cos_E_D",
        "class_gap_E_G",
        "similarity_pull_rtd",
    }
    # claims (a) and (b) as fixed in lab/analysis/claims.py, (b)'s equivalence by TOST at its margin
    tested = {(r["quantity"], r["comparison"]): r for r in summary["tug_of_war"]["differences"]}
    for c in claims.TUG_OF_WAR_CLAIMS:
        assert tested[(c.quantity, c.comparison)]["family"] == c.family
    assert tested[("class_gap_E_G", "gdes - nes")]["kind"] == "equivalence"
    # every fine-tuning run's chosen epoch counted, by task and arm
    selection = summary["downstream"]["selection"]
    *groups, every = selection
    assert (
        every["task"] == "all"
        and every["runs"] == sum(r["runs"] for r in groups) == len(TASKS) * len(arms) * 4
    )
    assert every["chose_last_epoch"] == sum(r["chose_last_epoch"] for r in groups)


def test_downstream_intervals_recompute_from_the_per_run_rows(resumed):
    # the held-out check: mean over fine-tuning seeds per pre-training seed, then scipy's one-sample t
    # interval of the paired differences, from downstream_runs.csv alone
    import csv

    from scipy import stats as sps

    cfg, _, _ = resumed
    report = Path(cfg.out_dir) / "report"
    rows = list(csv.DictReader((report / "downstream_runs.csv").open()))
    assert set(rows[0]) >= {"mode", "pretrain_seed", "finetune_seed", "task", "metric", "value"}
    committed = {(r["task"], r["metric"], r["comparison"]): r
                 for r in csv.DictReader((report / "downstream_differences.csv").open())}  # fmt: skip
    checked = 0
    for (task, metric, comparison), row in committed.items():
        first, second = comparison.split(" - ")
        seeds = sorted({r["pretrain_seed"] for r in rows})
        d = np.array([seed_mean(rows, first, task, metric, p) - seed_mean(rows, second, task, metric, p)
                      for p in seeds])  # fmt: skip
        assert float(row["difference"]) == pytest.approx(d.mean(), abs=1e-4)
        if np.ptp(d) > 0:
            ci = sps.ttest_1samp(d, 0.0).confidence_interval()
            assert (float(row["t_low"]), float(row["t_high"])) == pytest.approx((ci.low, ci.high), abs=1e-4)
            checked += 1
    assert checked >= 2


def seed_mean(rows: list[dict], mode: str, task: str, metric: str, pretrain_seed: str) -> float:
    """The mean over fine-tuning seeds of one pre-training seed's runs."""
    key = (mode, task, metric, pretrain_seed)
    return float(np.mean([float(r["value"]) for r in rows
                          if (r["mode"], r["task"], r["metric"], r["pretrain_seed"]) == key]))  # fmt: skip


NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+(?:\.\d+)?(?![\w.])")


def numbers_missing_from_csvs(markdown: str, folder: Path, fractional_only: bool = False) -> list[str]:
    """Every number written in `markdown` that no CSV cell under `folder` rounds to (at the number's
    own decimals; a number followed by % is read as its fraction too). Inline code (commands, file
    names) is not a result and is skipped. `fractional_only`: check only numbers with decimals, the
    measured values of a hand-written page (its integers are design: steps, seeds, sizes)."""
    values = []
    for path in folder.rglob("*.csv"):
        for row in csv_rows(path):
            for cell in row:
                try:
                    values.append(float(cell))
                except ValueError:
                    pass
    values = np.array(values)
    missing = []
    prose = re.sub(r"`[^`]*`", "", markdown)
    for match in NUMBER.finditer(prose):
        text = match.group()
        if fractional_only and "." not in text:
            continue
        number = float(text.replace("−", "-"))
        decimals = len(text.split(".")[1]) if "." in text else 0
        scales = (1.0, 0.01) if prose[match.end() :].lstrip().startswith("%") else (1.0,)
        if not any(
            np.any(
                np.abs(values - s * number)
                <= s * (0.5 * 10**-decimals * 1.001) + 1e-9 + 1e-5 * np.abs(values)
            )
            for s in scales
        ):
            missing.append(text)
    return missing


def csv_rows(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_every_number_on_the_results_page_is_in_the_rows_it_was_generated_from(resumed):
    cfg, _, _ = resumed
    report = Path(cfg.out_dir) / "report"
    page = (report / "README.md").read_text()
    assert "(c) downstream" in page and "synth_tag accuracy" in page
    assert len(NUMBER.findall(page)) > 40 and numbers_missing_from_csvs(page, report) == []
    # the check bites: a number that is in no CSV is found
    assert numbers_missing_from_csvs(page + "\nGDES − ES = +0.1234567", report) == ["+0.1234567"]
    # --report-only rebuilds the same page from the rows alone
    (report / "README.md").unlink()
    assert experiment.cli(["--recipe", "smoke", "--out-dir", cfg.out_dir, "--report-only"]) == 0
    assert (report / "README.md").read_text() == page


def test_design_table_counts_the_examples_the_runs_used(resumed):
    # the caps are not the counts: design.csv says what each fine-tuning run's results.json recorded
    import csv

    cfg, _, _ = resumed
    design = {
        r["setting"]: r["value"] for r in csv.DictReader((Path(cfg.out_dir) / "report" / "design.csv").open())
    }
    for task in TASKS:
        run = experiment_runs.PlannedRun("finetune", "gdes", 0, task, 1)
        results = json.loads((run.path(cfg) / "results.json").read_text())
        assert int(design[f"train_examples {task}"]) == results["n_train_examples"]
        assert int(design[f"validation_examples {task}"]) == results["n_validation_examples"]
        assert int(design[f"test_examples {task}"]) == results["n_test_examples"]
    assert design["analysis_fixed"] == "before the runs"
    # a cap above the task's size is not what a run trains on: synth_tag has 300 training sentences
    from lab.finetune.tasks import get_task

    splits = get_task("synth_tag").load()
    generous = replace_strict(cfg, **{"finetune.max_train_examples": 500, "finetune.max_eval_examples": 300})
    rows = {r["setting"]: r["value"] for r in experiment.design_rows(generous, ("synth_tag",))}
    assert rows["train_examples synth_tag"] == len(splits["train"]) < 500
    assert rows["validation_examples synth_tag"] == min(300, len(splits["validation"]))
    assert rows["test_examples synth_tag"] == min(300, len(splits["test"]))


def planted_downstream_rows(es_offset: float) -> list[dict]:
    """Hand-made downstream_runs.csv rows: 6 pre-training x 2 fine-tuning seeds per mode, a seed baseline
    far above the effects, GDES 0.02 above NES and ES `es_offset` from NES (plus small noise)."""
    rng = np.random.default_rng(0)
    offsets = {"es": es_offset, "nes": 0.0, "gdes": 0.02}
    return [
        {"mode": mode, "task": "synth_tag", "metric": "accuracy", "main": "accuracy", "pretrain_seed": p,
         "finetune_seed": f, "value": 0.8 + 0.01 * p + offsets[mode] + 0.001 * rng.standard_normal(),
         "best_epoch": 3, "epochs": 5}
        for p in range(6) for f in (1, 2) for mode in offsets
    ]  # fmt: skip


def ordering_rows(page: str) -> dict[str, list[str]]:
    """The rows of the page's (c) table: comparison -> its cells."""
    section = page.split("### (c) downstream ordering")[1].split("Secondary views")[0]
    cells = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("|")
    ]
    return {row[1]: row for row in cells[2:]}


@pytest.mark.parametrize(
    "es_offset, reads",
    [(-0.01, "against the paper"), (0.01, "agrees with the paper"), (-0.0005, "not resolved")],
)
def test_claim_c_is_the_papers_ordering_read_whatever_the_direction(tmp_path, es_offset, reads):
    from lab.util import write_csv

    write_csv(tmp_path / "downstream_runs.csv", planted_downstream_rows(es_offset), digits=None)
    write_csv(tmp_path / "design.csv", experiment.design_rows(tiny(tmp_path / "exp"), ("synth_tag",)))
    experiment.tables_from_rows(tmp_path)
    page = (tmp_path / "README.md").read_text()
    rows = ordering_rows(page)
    assert list(rows) == ["gdes - es", "gdes - nes", "es - nes"]  # all three, the paper's Table 6 order
    assert rows["es - nes"][-1] == reads and rows["gdes - nes"][-1] == "agrees with the paper"
    assert all(row[2] == "6" for row in rows.values())  # n: pre-training seeds, not fine-tuning runs
    assert numbers_missing_from_csvs(page, tmp_path) == []


def results_pages() -> list[tuple[str, Path]]:
    """The committed results pages, and README.md's section whose heading names results (if any)."""
    pages = [(p.read_text(), p.parent) for p in sorted((ROOT / "figures").glob("*/README.md"))]
    lines = (ROOT / "README.md").read_text().splitlines()
    level = lambda line: len(line) - len(line.lstrip("#")) if line.startswith("#") else 0  # noqa: E731
    for i, line in enumerate(lines):
        if level(line) and "results" in line.lower():  # the section runs to the next heading as high
            end = next(
                (j for j in range(i + 1, len(lines)) if 0 < level(lines[j]) <= level(line)), len(lines)
            )
            pages.append(("\n".join(lines[i:end]), ROOT / "figures"))
            break
    return pages


@pytest.mark.parametrize("index", range(len(results_pages())))
def test_every_committed_results_number_is_in_a_committed_csv(index):
    """Generated pages (those that say so) and README's results section: every number; hand-written
    figure pages: every number with decimals."""
    text, folder = results_pages()[index]
    generated = text.startswith("# Sharing experiment: results") or folder == ROOT / "figures"
    assert numbers_missing_from_csvs(text, folder, fractional_only=not generated) == []


def test_cpu_results_pins_the_kernels_before_torch(tmp_path, monkeypatch):
    for key in experiment.KERNEL_PIN:
        monkeypatch.delenv(key, raising=False)
    calls = []

    def execve(path, args, env):
        calls.append((args, env))
        raise SystemExit(0)

    monkeypatch.setattr(experiment.os, "execve", execve)
    with pytest.raises(SystemExit):
        experiment.cli(["--recipe", "smoke", "--cpu-kernels", "avx2", "--out-dir", str(tmp_path), "--plan"])
    ((args, env),) = calls
    assert args[1:] == ["-m", "lab", "experiment", "--recipe", "smoke", "--cpu-kernels", "avx2",
                        "--out-dir", str(tmp_path), "--plan"]  # fmt: skip
    assert all(env[k] == v for k, v in experiment.KERNEL_PIN.items())
    # in-process (a notebook), the pin cannot act any more: refused unless torch already runs AVX2
    cfg = tiny(tmp_path, cpu_kernels="avx2")
    monkeypatch.setattr("torch.backends.cpu.get_cpu_capability", lambda: "AVX512")
    with pytest.raises(ValueError, match="ATEN_CPU_CAPABILITY=avx2"):
        experiment.kernel_path(cfg)
    monkeypatch.setattr("torch.backends.cpu.get_cpu_capability", lambda: "AVX2")
    assert experiment.kernel_path(cfg) == "AVX2"
    assert experiment.recipe("cpu-results").cpu_kernels == "avx2"


def test_cpu_results_is_powered_and_controlled_by_its_design():
    cfg = experiment.recipe("cpu-results")
    assert len(cfg.pretrain_seeds) >= 10 and cfg.control and cfg.primary_tasks == ("synth_gram",)
    assert cfg.threads == 1  # the digits do not depend on the machine's cores
    lang1 = experiment.recipe("cpu-results-lang1")
    assert lang1.pretrain.corpus == "synthetic:1" and lang1.compare_with == cfg.report_dir
    # the same recipe but for the language, where its report goes and what it is compared with
    differ = ("pretrain", "out_dir", "report_dir", "compare_with")
    assert {k: v for k, v in dataclasses.asdict(lang1).items() if k not in differ} == {
        k: v for k, v in dataclasses.asdict(cfg).items() if k not in differ
    }
    assert dataclasses.replace(lang1.pretrain, corpus="synthetic") == cfg.pretrain
    for name in ("gpu", "cpu-wikitext"):
        assert len(experiment.recipe(name).pretrain_seeds) >= 3


def test_a_rerun_of_a_finished_experiment_trains_nothing(resumed):
    cfg, _, _ = resumed
    result = experiment.plan(cfg)
    assert {r["status"] for r in result["runs"]} == {"done"} and result["total_estimate_s"] == 0


def test_other_settings_in_the_same_directory_are_refused(resumed):
    cfg, _, _ = resumed
    with pytest.raises(ValueError, match="pretrain.steps: 8 -> 9"):
        experiment.run(replace_strict(cfg, **{"pretrain.steps": 9}))


def test_report_without_matplotlib_writes_the_numbers(resumed, tmp_path, monkeypatch):
    cfg, _, _ = resumed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "seaborn", None)
    summary = experiment.report(dataclasses.replace(cfg, report_dir=str(tmp_path)), TASKS)
    assert (tmp_path / "downstream.csv").is_file() and (tmp_path / "tug_of_war_differences.csv").is_file()
    assert not list(tmp_path.rglob("*.png"))
    assert any("figures skipped" in note for note in summary["notes"])


def test_plan_lists_every_run_with_an_estimate_and_trains_nothing(tmp_path, capsys):
    cfg = tiny(tmp_path / "exp", pretrain_seeds=(0,), finetune_seeds=(1,))
    result = experiment.plan(cfg)
    names = [r["run"] for r in result["runs"]]
    assert names[:4] == ["pretrain es s0", "pretrain nes s0", "pretrain gdes s0", "pretrain untrained s0"]
    assert len(names) == 4 + 4 * len(TASKS)
    assert all(r["status"] == "todo" and r["estimate_s"] > 0 for r in result["runs"])
    assert result["total_estimate_s"] == pytest.approx(sum(r["estimate_s"] for r in result["runs"]))
    # only the calibration ran, and it left nothing but its measurements
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["calibration.json"]
    experiment.print_plan(result)
    out = capsys.readouterr().out
    assert "finetune gdes s0 synth_gram f1" in out and "estimated" in out


def test_missing_glue_data_is_reported_and_skipped(tmp_path):
    cfg = tiny(tmp_path / "exp", tasks=("sst2", "rte"))
    reason = experiment_runs.missing_data("rte", cfg)
    assert "RTE" in reason and "train.tsv" in reason
    assert experiment_runs.missing_data("sst2", cfg) == ""


def test_unknown_recipe_task_and_bad_lists_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="synth_tagg"):
        experiment.plan(tiny(tmp_path, tasks=("synth_tagg",)), calibrate_now=False)
    with pytest.raises(ValueError, match="unknown recipe 'cpu'"):
        experiment.recipe("cpu")
    with pytest.raises(ValueError, match="modes has \\['bert'\\]"):
        experiment.ExperimentConfig(modes=("es", "bert"))
    with pytest.raises(ValueError, match="repeats"):
        experiment.ExperimentConfig(pretrain_seeds=(0, 0))


def test_the_experiment_imports_without_plotting_or_notebook_packages():
    # a bare GPU box has CUDA torch, transformers, sentencepiece, safetensors, scikit-learn, scipy, tqdm
    import subprocess

    absent = ("matplotlib", "seaborn", "pandas", "papermill", "datasets", "IPython")
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({absent!r}))\n"
        "import lab.analysis.experiment, lab.pretrain.loop, lab.finetune.loop, lab.analysis.tug_of_war, lab.analysis.stats\n"
        "from lab.analysis import stats; assert stats.plotting_available() is False\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_gpu_recipe_reads_the_data_folder_it_is_given(tmp_path):
    cfg = experiment.recipe("gpu", tmp_path)
    assert cfg.pretrain.corpus == f"{tmp_path}/wikitext-2/wiki.train.tokens"
    assert (
        cfg.finetune.glue_dir == f"{tmp_path}/glue" and cfg.pretrain.device == cfg.finetune.device == "cuda"
    )
    assert (
        cfg.pretrain.preset == "xsmall"
        and cfg.modes == (sharing.ES.name, sharing.NES.name, sharing.GDES.name)
        and cfg.finetune_seeds == (1, 2, 3)
    )
    assert set(cfg.tasks) == {"cola", "sst2", "stsb"} and len(cfg.pretrain_seeds) >= 3
    assert "MRPC" in experiment_runs.missing_data("mrpc", cfg)


def test_a_finished_run_with_other_settings_is_refused_not_reused(tmp_path):
    # a fine-tuning result saved under an older task default (lr) must not enter the statistics
    cfg = tiny(tmp_path / "exp")
    run = experiment_runs.PlannedRun("finetune", "es", 0, "synth_tag", 1)
    saved = dataclasses.asdict(experiment_runs.finetune_config(cfg, run).resolved())
    saved["lr"] = saved["lr"] / 10
    run.path(cfg).mkdir(parents=True)
    (run.path(cfg) / "results.json").write_text(
        json.dumps({"metrics_per_seed": [{"seed": 1}], "config": saved})
    )
    with pytest.raises(ValueError, match=r"finetune es s0 synth_tag f1 .* \(lr: "):
        experiment_runs.status(run, cfg)
    saved["lr"] *= 10
    saved["device"] = "cuda"  # where it ran does not matter
    (run.path(cfg) / "results.json").write_text(
        json.dumps({"metrics_per_seed": [{"seed": 1}], "config": saved})
    )
    assert experiment_runs.status(run, cfg) == "done"


def test_workers_train_the_same_runs_as_one_process(resumed, tmp_path):
    # two runs at once, each in its own spawned process: the same numbers as one after another
    cfg, _, _ = resumed
    two = replace_strict(cfg, out_dir=str(tmp_path / "exp"), workers=2, tasks=(), pretrain_seeds=(0,))
    experiment.run(two)
    log = [r for r in log_rows(two) if r["event"] == "finished"]
    assert sorted(r["run"] for r in log) == sorted(f"pretrain {m} s0" for m in cfg.modes)
    for mode in cfg.modes:
        run = experiment_runs.PlannedRun("pretrain", mode, 0)
        alone, shared = (json.loads((run.path(c) / "summary.json").read_text()) for c in (cfg, two))
        assert shared["final_eval"] == alone["final_eval"]


@pytest.mark.slow  # one 1,500-step `tiny` pre-training run in a fresh process: about a minute on one thread
def test_a_committed_pretraining_run_reproduces_to_the_digit(tmp_path):
    """cpu-results' ES run of pre-training seed 3, retrained by the current code as the experiment runs it
    (its PretrainConfig, the recipe's kernel pin, one thread): the final held-out MLM loss, RTD AUC and
    fixed-corruption AUC equal, to the last digit, the committed row of figures/experiment_synthetic,
    made by the code of its time. Changes to the step since then (lab/tied.py) had to keep its arithmetic."""
    import csv
    import os
    import subprocess

    cfg = experiment.recipe("cpu-results")
    run = experiment_runs.PlannedRun("pretrain", "es", 3)
    config = replace_strict(experiment_runs.pretrain_config(cfg, run), out_dir=str(tmp_path / "es-s3"))
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(dataclasses.asdict(config)))
    env = {**os.environ, **experiment.KERNEL_PIN, "OMP_NUM_THREADS": str(cfg.threads)}
    command = [sys.executable, "-m", "lab", "pretrain", "--config", str(config_file)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    final = json.loads((tmp_path / "es-s3" / "summary.json").read_text())["final_eval"]
    with open(ROOT / "figures" / "experiment_synthetic" / "tug_of_war_runs.csv", newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r["mode"] == "es" and r["pretrain_seed"] == "3"]
    assert float(row["final_mlm_loss"]) == final["mlm_loss"]
    assert float(row["final_rtd_auc"]) == final["rtd_auc"]
    assert float(row["final_fixed_auc"]) == final["fixed_auc"]
