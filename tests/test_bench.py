"""The benchmark runs end to end at tiny sizes and writes the rows it promises."""

import csv
import json

from lab import bench


def test_quick_benchmark_writes_every_row(tmp_path):
    json_path, csv_path = tmp_path / "bench.json", tmp_path / "bench.csv"
    assert bench.cli(["--quick", "--json", str(json_path), "--csv", str(csv_path)]) == 0

    result = json.loads(json_path.read_text())
    rows = result["rows"]
    assert all(result["matmul_peak_gflops"][d] > 0 for d in ("fp32", "bf16"))
    keys = {(r["kind"], r["dtype"], r["T"], r["impl"]) for r in rows}
    T, long_T = bench.QUICK.step_seq_lens[0], max(bench.QUICK.layer_seq_lens)
    for dtype in ("fp32", "bf16"):
        for impl in ("lab-es", "lab-gdes", "hf"):
            assert ("step", dtype, T, impl) in keys
        for kind in ("encoder", "attention"):
            assert (kind, dtype, long_T, "lab") in keys and (kind, dtype, T, "hf") in keys
    assert all(r["tokens_per_s"] > 0 and r["ms"] > 0 for r in rows)
    for r in rows:
        if r["kind"] == "step":
            assert r["gflop"] > 0 and 0 < r["mfu"] < 1.5, r
            assert r["peak_mb"] > r["step_mb"] > 0, r
        if r["impl"] != "hf" and r["speedup_vs_hf"] is not None:
            assert r["speedup_vs_hf"] > 0
    # the peer computes logits at every position, so it must count more FLOPs than lab at equal shape
    step = {(r["dtype"], r["impl"]): r for r in rows if r["kind"] == "step"}
    assert step["fp32", "hf"]["gflop"] > step["fp32", "lab-es"]["gflop"]

    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
