"""Tasks as plug-ins: one module per task (`pep8`, `chat`), the `Task` base they implement and the loader of
`data.task` (a built-in name or `package.module:Name`). See docs/tasks.md."""

from alignpipe.tasks.base import DEFAULT_TASK, MANIFEST_FILE, Task, get_task, load_task, task_of, write_manifest

__all__ = ["DEFAULT_TASK", "MANIFEST_FILE", "Task", "get_task", "load_task", "task_of", "write_manifest"]
