"""One row of compile_cpu.csv: the lab-es RTD step (lab/bench/builders.py) compiled one way, in a fresh
process, so the inductor cache is whatever TORCHINDUCTOR_CACHE_DIR holds (an empty folder: cold).

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_COMPILE_THREADS=1 OMP_NUM_THREADS=1 \
        python figures/bench/compile_cpu.py xsmall layers 64 4

SCOPE is layers | model (lab.training.COMPILE_SCOPES) or eager; `alternate` builds all three in one
process and times them step by step in turn (compile_cpu_alternating.csv), away from the load's drift. Prints one JSON line: the wall and
CPU seconds of the first three steps (compilation, for the compiled scopes) and the median / minimum
CPU ms of the next `steps` steps. The CPU seconds are this process's, on one thread: dynamo, AOT
autograd, inductor's lowering and code generation and the steps, not the C++ compiler runs it starts
(the wall seconds hold those); on a machine shared with other jobs they are what load inflates least.
"""

import json
import statistics
import sys
import time

import torch

from lab.bench.builders import build_lab_step


def main(name: str, scope: str, T: int, B: int, steps: int = 6) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    compiled = {} if scope == "eager" else {"compile_mode": "default", "compile_scope": scope}
    step = build_lab_step(name, T, B, "fp32", torch.device("cpu"), "es", **compiled)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(3):
        step()
    first3_wall, first3_cpu = time.perf_counter() - wall, time.process_time() - cpu
    cpu_ms = []
    for _ in range(steps):
        start = time.process_time()
        step()
        cpu_ms.append(1e3 * (time.process_time() - start))
    return {
        "preset": name,
        "scope": scope,
        "T": T,
        "batch": B,
        "first3_wall_s": round(first3_wall, 1),
        "first3_cpu_s": round(first3_cpu, 1),
        "steady_cpu_ms_median": round(statistics.median(cpu_ms), 1),
        "steady_cpu_ms_min": round(min(cpu_ms), 1),
    }


def alternate(name: str, T: int, B: int, steps: int = 8) -> dict:
    torch.set_num_threads(1)
    compiled = {"compile_mode": "default"}
    builds = {
        scope: build_lab_step(name, T, B, "fp32", torch.device("cpu"), "es", compile_scope=scope, **compiled)
        for scope in ("model", "layers")
    }
    builds["eager"] = build_lab_step(name, T, B, "fp32", torch.device("cpu"), "es")
    for step in builds.values():
        for _ in range(3):
            step()
    cpu_ms = {scope: [] for scope in builds}
    for _ in range(steps):
        for scope, step in builds.items():
            start = time.process_time()
            step()
            cpu_ms[scope].append(1e3 * (time.process_time() - start))
    result = {"preset": name, "T": T, "batch": B, "alternating_steps": steps}
    for scope, values in cpu_ms.items():
        result[f"{scope}_cpu_ms_median"] = round(statistics.median(values), 1)
        result[f"{scope}_cpu_ms_min"] = round(min(values), 1)
    return result


if __name__ == "__main__":
    name, scope, T, B = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    run = alternate if scope == "alternate" else lambda *args: main(name, scope, *args[1:])
    print(json.dumps(run(name, T, B, *map(int, sys.argv[5:]))))
