"""The end of a pre-training run: the final evaluation, the exported tables and models
(`export_run`: embeddings.safetensors, export/discriminator and export/generator in HF format) and
summary.json (`finish`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lab.hf import save_pretrained
from lab.pretrain import checkpoint, tensorboard
from lab.pretrain.checkpoint import CheckpointError
from lab.pretrain.config import compile_mode
from lab.pretrain.evaluate import evaluate_run
from lab.pretrain.meter import Meter
from lab.pretrain.setup import Run
from lab.pretrain.step import NonFiniteGuard
from lab.rtd import RTDModel
from lab.training import compile_scope
from lab.util import append_jsonl, atomic_write_json


def export_run(model: RTDModel, out_dir: Path, tok) -> None:
    """Tables for the analysis, plus HF-format discriminator (merged E_D) and generator."""
    save_file(
        {k: v.detach().float().cpu().clone() for k, v in model.exported_tables().items()},
        out_dir / "embeddings.safetensors",
    )
    disc_dir = save_pretrained(
        model.discriminator, out_dir / "export" / "discriminator", tok, state=model.discriminator_state_dict()
    )
    # the RTD head beside it, which continued pre-training reads back (lab.hf.read_heads)
    rtd = {f"rtd_head.{k}": v.detach().cpu().contiguous() for k, v in model.rtd_head.state_dict().items()}
    save_file(rtd, disc_dir / "rtd_head.safetensors")
    gen_dir = save_pretrained(model.generator, out_dir / "export" / "generator", tok)
    head = {f"mlm_head.{k}": v.detach().cpu().contiguous() for k, v in model.mlm_head.state_dict().items()}
    save_file(head, gen_dir / "mlm_head.safetensors")


def finish(run: Run, step: int, meter: Meter, guard: NonFiniteGuard | None = None) -> dict:
    """Final evaluation, export and summary.json (main process); returns the summary."""
    cfg, summary = run.cfg, {}
    if run.ddp.main:
        final_eval = evaluate_run(run) if run.eval_batches else {}
        append_jsonl(run.metrics, {"split": "eval", "step": step, **final_eval})
        if cfg.tensorboard:
            tensorboard.mirror(run, close=True)
        wall = time.perf_counter() - meter.t_start
        train_s = wall - sum(meter.total_overhead.values())
        tokens_per_step = cfg.batch_size * cfg.seq_len
        summary = {
            "sharing": cfg.sharing,
            "preset": cfg.preset,
            "corpus": cfg.corpus,
            "rtd_weight": cfg.rtd_weight,
            "steps": step,
            "completed": step >= cfg.steps,
            "skipped_steps": None if guard is None else guard.skipped_total + int(guard.skipped),
            "tokens_seen": step * tokens_per_step,
            "wall_s_this_invocation": wall,
            # training alone: the warm-up (compilation) steps, evaluation, probe and checkpoints are
            # in overhead_s
            "tokens_per_s": meter.steady_steps_total * tokens_per_step / train_s
            if meter.steady_steps_total
            else None,
            "overhead_s": dict(meter.total_overhead),
            "compile_s": meter.compile_s if run.compiled else None,
            "world_size": run.ddp.world,
            "device": str(run.device),
            "dtype": str(run.amp or torch.float32),
            "compiled": run.compiled,
            "compile_mode": compile_mode(cfg, run.ddp.world) if run.compiled else None,
            "compile_scope": compile_scope(cfg.compile_scope, compile_mode(cfg, run.ddp.world))
            if run.compiled
            else None,
            "vocab_size": run.tok.vocab_size,
            "final_eval": final_eval,
            "corpus_info": run.corpus.describe(),
        }
        try:
            export_run(run.model, run.out_dir, run.tok)
            atomic_write_json(run.out_dir / "summary.json", summary)
        except OSError as err:
            newest = checkpoint.candidates(run.ckpt_dir)
            raise CheckpointError(
                f"could not write the export of {run.out_dir} ({type(err).__name__}: {err}); the checkpoint "
                f"{newest[0] if newest else '(none)'} is intact. Free disk space and rerun the same command: "
                "a finished run only re-evaluates and re-exports"
            ) from err
    if run.ddp.world > 1:
        dist.barrier()
    return summary
