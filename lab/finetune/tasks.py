"""The one registry of fine-tuning tasks: the GLUE tasks (lab/finetune/glue.py) and the synthetic
language's tasks (lab/finetune/synthetic_tasks.py), each a `Task` (lab/finetune/task.py).

    get_task("CoLA") / get_task("synth_tag")      -> the task, any common spelling
    get_task("sst2").load(glue_dir)               -> {"train", "validation", "test": LabelledSplit}
    register(GlueTask(name="sst2_copy", ...))     -> a new task, from any file (a test's, a notebook's)
"""

from __future__ import annotations

from lab.finetune.glue import GLUE_TASKS
from lab.finetune.synthetic_tasks import SYNTHETIC_TASKS
from lab.finetune.task import Task

TASKS: dict[str, Task] = {}  # canonical name -> task, in registration order


def _key(name: str) -> str:
    return str(name).lower().replace("-", "").replace("_", "")


def register(task: Task) -> Task:
    """Add `task` to the registry (refused when its name, in any spelling, is taken) and return it."""
    taken = {_key(name): name for name in TASKS}
    if _key(task.name) in taken:
        raise ValueError(f"task {task.name!r} is already registered as {taken[_key(task.name)]!r}")
    TASKS[task.name] = task
    return task


def get_task(task: str | Task) -> Task:
    """A task by any common spelling ("SST-2", "stsb", "synth_tag", "Synth-Gram"); a Task is returned as is."""
    if isinstance(task, Task):
        return task
    found = {_key(name): t for name, t in TASKS.items()}.get(_key(task))
    if found is None:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return found


for _task in (*GLUE_TASKS, *SYNTHETIC_TASKS):
    register(_task)
