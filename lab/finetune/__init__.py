"""Fine-tuning a pre-trained discriminator: the config (config.py), the loop (loop.py), tokenised task data
(data.py), GLUE (glue.py), the synthetic-language tasks (tasks.py) and the results table (table.py).
Imports the core and lab.pretrain."""
