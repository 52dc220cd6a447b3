"""RTD pre-training: `train(cfg) -> summary`, callable from notebooks, the CLI and torchrun alike.

`train` reads top to bottom in nanoGPT order: setup, then per step lr -> eval -> forward / backward
(with the gradient-conflict probe when due) -> clip -> step -> log -> checkpoint, then the final
evaluation and export. Each phase is one call, in the module of its own: the config in
lab/pretrain/config.py, `setup` (device, data, model, resume) in lab/pretrain/setup.py, `train_step` /
`clip` / `NonFiniteGuard` in lab/pretrain/step.py (the RTD forward itself is lab/rtd.py), `evaluate`
in lab/pretrain/evaluate.py, the probe in lab/pretrain/probe.py, `finish` (final evaluation, export,
summary) in lab/pretrain/export.py; the checkpoint ring is lab/pretrain/checkpoint.py, the log
lab/pretrain/meter.py, the command line lab/pretrain/cli.py. `save_checkpoint` and `log_window` stay
here, beside the loop that calls them.

A steady-state step never waits for the device: losses and the non-finite flag are summed on the
device (`Meter`) and read at log steps only; batches go to the GPU from pinned memory without
blocking. Evaluation, the probe and checkpoints read values back, so they are timed apart from
training: the log's ms/step and tokens/s are training alone, their cost is the row's `overhead_s`.

One global batch, however it is split. A step's `batch_size` examples are split into processes x
micro-batches (micro-batch m of rank r holds rows (m * world + r) * micro ... of the step's batch, the
order BatchIterator hands them out in). The step's masking and sampling noise is drawn once for the
whole global batch and each part takes its rows; the MLM loss is divided by the global batch's
masked count and the RTD loss by its non-pad count (counted on the device before the first forward,
one all-reduce under torchrun, no host sync), so the parts' losses add up to the global means, and
each part's backward is scaled by the number of processes to undo DDP's average. With dropout off,
any split of the same global batch computes the same losses and updates (tests/test_pretrain.py).

Randomness is a function of (seed, step): `stream_seed` derives every stream (the step's noise,
each micro-batch's dropout on each rank) from the tuple (seed, purpose, step, micro-batch, rank) with
numpy's SeedSequence, so a resumed run repeats an uninterrupted one exactly and no two streams share
a seed.

Non-finite steps are skipped, never applied (`NonFiniteGuard`): the total gradient norm the clip
computes and the step's loss are checked on the device, and a step where either is not finite
reaches AdamW (fused) as `found_inf`, which leaves weights and optimizer state untouched. Skipped
steps are counted in the log rows (`skipped_steps`) and left out of their mean losses; after
`MAX_SKIPPED_IN_A_ROW` consecutive skips the run stops with an error at the next log or checkpoint
step (the weights have not moved since the last good step, so nothing is lost by waiting for it).
Every checkpoint is checked to hold only finite tensors before it is written (lab/pretrain/checkpoint.py).

Run directory (cfg.out_dir): config.json, metrics.jsonl, summary.json, checkpoints/ (a ring of
checksummed checkpoints, see lab/pretrain/checkpoint.py), tokenizer/spm.model, token_counts.npy,
token_classes.json (synthetic corpus), embeddings.safetensors (generator / discriminator / delta
tables), embeddings/ (the same tables over training: lab/pretrain/snapshots.py), export/discriminator and
export/generator (HF format).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from lab.pretrain import checkpoint, tensorboard
from lab.pretrain.config import PretrainConfig, compile_mode
from lab.pretrain.evaluate import evaluate_run
from lab.pretrain.export import finish
from lab.pretrain.meter import Meter, Progress
from lab.pretrain.setup import Run, setup
from lab.pretrain.snapshots import Recorder
from lab.pretrain.step import NonFiniteGuard, clip, train_step
from lab.training import compile_scope, linear_schedule, set_lr
from lab.util import append_jsonl

__all__ = ["PretrainConfig", "compile_mode", "train"]  # the config and its one function, for the callers


def train(cfg: PretrainConfig) -> dict:
    """Pre-train a generator + discriminator with the chosen sharing mode; returns summary.json."""
    launched = "RANK" in os.environ and not dist.is_initialized()  # under torchrun setup() makes the group
    try:
        return _train(cfg)
    finally:
        if launched and dist.is_initialized():
            # the group this call made ends with it (its backend's threads and sockets), so that a
            # caller can go on or run again; how a torchrun worker then exits is cli()'s concern
            dist.destroy_process_group()


def _train(cfg: PretrainConfig) -> dict:
    run = setup(cfg)
    model, optimizer = run.model, run.optimizer
    step, end = run.start, min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    # the first steps (compilation, CUDA-graph capture, first allocations) are timed as overhead
    meter = Meter(run.device, step, warmup=3 if run.compiled else 1)
    guard = NonFiniteGuard(run.device)
    progress = Progress(cfg.steps, step, f"pretrain {cfg.sharing}", cfg.progress, run.ddp.main)
    snapshots = Recorder(run)  # drops the snapshots past a resumed step; writes on the main process only
    if run.ddp.main and step:
        progress.message(f"resuming {run.out_dir} at step {step} from {run.resumed_from}")
    try:
        while step < end:
            set_lr(optimizer, cfg.lr * linear_schedule(step, cfg.warmup_steps, cfg.steps))
            # eval (before the step, so step 0 records the untrained model)
            if run.ddp.main and step % cfg.eval_every == 0 and run.eval_batches:
                with meter.overhead("eval"):
                    row = evaluate_run(run)
                    append_jsonl(run.metrics, {"split": "eval", "step": step, **row})
            if snapshots.due(step):  # the word tables before the step, as eval sees them
                with meter.overhead("probe"):
                    snapshots.write(step)
            # forward / backward over the micro-batches, the probe on the first when due
            probe = cfg.probe_every > 0 and step % cfg.probe_every == 0
            losses = train_step(run, step, meter, probe)
            # clip, then step unless the loss or the gradient is not finite (checked on the device)
            skip = guard.check(clip(model, cfg), losses)
            meter.add({k: torch.where(skip, 0.0, v) for k, v in losses.items()})
            optimizer.found_inf = skip.float()  # fused AdamW leaves everything as it was when it is 1
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            meter.step_done(step)
            # log (the only place a steady-state step reads values from the device)
            if step % cfg.log_every == 0 or step == end:
                log_window(run, meter, guard, step, end, progress)
            if step % cfg.ckpt_every == 0 or step == end:
                with meter.overhead("checkpoint"):
                    guard.stop_if_stuck(run, step)
                    save_checkpoint(run, step)
    except KeyboardInterrupt:
        save_checkpoint(run, step)
        progress.message(f"interrupted at step {step}; checkpoint saved in {run.ckpt_dir}; rerun to resume")
        progress.close()
        raise
    if snapshots.due(step):  # the final tables (or those of a stop_after step that is due)
        snapshots.write(step)
    if cfg.steps == 0 and run.start == 0:
        # the untrained control: its checkpoint, so that a rerun resumes it like a finished run
        save_checkpoint(run, 0)
    progress.close()
    return finish(run, step, meter, guard)


def save_checkpoint(run: Run, step: int) -> None:
    """The main process writes the checkpoint of `step` into the ring (see lab/pretrain/checkpoint.py, which
    refuses a state with a non-finite tensor before writing anything)."""
    if run.ddp.main:
        # the data position of the completed steps (an interrupted step may have drawn a batch already)
        state = {
            "step": step,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "data": {**run.batches.state(), "position": step * run.cfg.grad_accum},
            "config": asdict(run.cfg),
        }
        checkpoint.save(state, run.ckpt_dir, step, keep=run.cfg.keep_checkpoints)


def log_window(
    run: Run, meter: Meter, guard: NonFiniteGuard, step: int, end: int, progress: Progress
) -> None:
    """Sum the window's losses across processes (each holds its share of the global means), stop
    after too many non-finite steps in a row, write the train row (means over the applied steps)."""
    cfg, ddp = run.cfg, run.ddp
    guard.stop_if_stuck(run, step)
    if ddp.world > 1:
        for value in meter.sums.values():
            dist.all_reduce(value)
    skipped = int(guard.skipped)
    guard.skipped.zero_()
    guard.longest.copy_(guard.in_a_row)
    guard.skipped_total += skipped
    n = meter.steps - skipped
    losses = {k: v.item() / n if n else float("nan") for k, v in meter.sums.items()}
    first_compile = meter.compile_s is None
    timing = meter.window(time.perf_counter())
    tokens_per_step = cfg.batch_size * cfg.seq_len
    ms = timing["ms_per_step"]
    row = {
        "split": "train",
        "step": step,
        **losses,
        "lr": run.optimizer.param_groups[0]["lr"],
        "skipped_steps": skipped,  # non-finite loss or gradient: not applied, not in the mean losses
        "tokens": step * tokens_per_step,
        # training throughput alone; the window's evaluation / probe / checkpoint / warm-up time is
        # in overhead_s and its parts
        "tokens_per_s": None if ms is None else 1000 * tokens_per_step / ms,
        **timing,
    }
    meter.reset_sums()
    if not ddp.main:
        return
    append_jsonl(run.metrics, row)
    if cfg.tensorboard:
        tensorboard.mirror(run)
    if first_compile and meter.compile_s is not None and run.compiled:
        progress.message(
            f"compiled in {meter.compile_s:.1f} s (torch.compile mode {compile_mode(cfg, ddp.world)}, "
            f"{compile_scope(cfg.compile_scope, compile_mode(cfg, ddp.world))}: the extra time of "
            f"the first {meter.warmup} steps)"
        )
    done = step - meter.start
    spent = timing["elapsed_s"] - meter.total_overhead["warmup"]
    eta = (end - step) * spent / (done - meter.warmup) if done > meter.warmup else None
    progress.update(row, eta, n)
