"""RTD pre-training: the loop with its config (loop.py), corpora and batches (data.py), the embedded
synthetic language (synthetic.py), checkpoints, the step meter and the gradient-conflict probe's measures.
Imports the core (lab/*.py) only."""
