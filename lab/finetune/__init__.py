"""Fine-tuning a pre-trained discriminator: the config (config.py), the loop (loop.py), tokenised task data
(data.py), what a task is (task.py) and the one registry of tasks (tasks.py): GLUE (glue.py) and the
synthetic language's tasks (synthetic_tasks.py); the results table (table.py). Imports the core only."""
