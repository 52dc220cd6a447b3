"""Analysis: the tug-of-war report and figures (tug_of_war.py), the sharing experiment (experiment.py) and
its runs (runs.py), and statistics over seeds (stats.py). Imports the core, lab.pretrain and lab.finetune."""
