"""`python -m lab pretrain` (and `torchrun ... -m lab pretrain`): PretrainConfig's flags, then `train`."""

from __future__ import annotations

import os
import sys

from lab.cli import config_parser, parse_config
from lab.pretrain.checkpoint import CheckpointError
from lab.pretrain.config import PretrainConfig
from lab.pretrain.loop import train
from lab.util import keep_freed_memory


def cli(argv: list[str] | None = None) -> int:
    parser = config_parser(
        PretrainConfig, "python -m lab pretrain", "ELECTRA-style RTD pre-training of DeBERTa-v3."
    )
    try:
        cfg = parse_config(PretrainConfig, parser, sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        parser.error(str(err))
    keep_freed_memory()  # the same large tensors every step: reuse their pages (lab/util.py)
    try:
        train(cfg)
        code = 0
    except KeyboardInterrupt:
        code = 130
    except (ValueError, FloatingPointError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    if "RANK" in os.environ:
        # A torchrun worker leaves here, its files written and its process group destroyed, without
        # the interpreter's teardown: there, a C++ thread of torch.distributed that still touches a
        # Python object at finalisation aborts the finished process now and then ("terminate called
        # without an active exception", SIGABRT; about 1 run in 30 of tests/test_pretrain.py's
        # two-process run on a loaded 2-core machine, with destroy_process_group already called).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    raise SystemExit(cli())
