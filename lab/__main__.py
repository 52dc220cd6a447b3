"""`python -m lab <command> ...`: each command's module builds its flags from its config dataclass (lab/cli.py)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "pretrain": ("lab.pretrain.cli", "cli", "RTD pre-training (ES / NES / GDES)"),
    "finetune": ("lab.finetune.loop", "cli", "fine-tuning on GLUE or the synthetic tasks, over seeds"),
    "table": ("lab.finetune.table", "cli", "fine-tuning results of several checkpoints in one table"),
    "run": ("lab.notebook.runner", "cli_run", "run a notebook with papermill parameters"),
    "sweep": ("lab.notebook.runner", "cli_sweep", "pre-train ES, NES and GDES, then the tug-of-war analysis"),
    "bench": ("lab.bench.benchmark", "cli", "speed and memory against a transformers-built peer"),
    "experiment": (
        "lab.analysis.experiment",
        "cli",
        "ES / NES / GDES over seeds, fine-tuned, with paired statistics",
    ),
    "gpucheck": (
        "lab.bench.gpucheck",
        "cli",
        "the prepared GPU run: benchmark, CUDA checks, syncs, torchrun, GLUE",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("usage: python -m lab <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module, function, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
