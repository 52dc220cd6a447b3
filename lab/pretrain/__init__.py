"""RTD pre-training: the loop with its config (loop.py), corpora and batches (data.py; the synthetic
language is the core's lab/synthetic.py), checkpoints, the step meter and the gradient-conflict probe's measures.
Imports the core (lab/*.py) only."""
