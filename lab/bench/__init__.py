"""The benchmark (benchmark.py, with builders.py, measure.py, loops.py) and the prepared GPU check
(gpucheck.py, with budget.py, devicecheck.py, syncs.py, gpureport.py). Nothing in lab imports this package."""
