"""What the notebooks call: running them with parameters (runner.py) and the tour's pictures (tour.py).
The top floor: it may import any package but lab.bench."""
