"""Tasks are plug-ins: no stage branches on a task's name or fields (an AST walk of stages/), a user's task loads
from `data.task: package.module:Name` and a task lacking a method is refused in one line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from alignpipe.core.errors import ConfigError
from alignpipe.tasks import get_task, load_task
from alignpipe.tasks.base import builtin_tasks

STAGES = Path(__file__).resolve().parents[1] / "src" / "alignpipe" / "stages"
TASK_NAMES = set(builtin_tasks())
# Names a stage binds a task object to (task_of / get_task results and parameters).
TASK_VARS = {"task"}


def _is_task(node: ast.AST) -> bool:
    """`task`, or a call that returns one (`task_of(...)`, `get_task(...)`)."""
    if isinstance(node, ast.Name):
        return node.id in TASK_VARS
    return (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
            and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("task_of", "get_task"))


def offences(source: str, filename: str = "<snippet>") -> list[str]:
    """Where `source` tests a task's name or reads a task's field: a comparison with a task name (a string literal
    of a built-in task, `cfg.task` or `X.task`), a task attribute that is not called (`task.name`, `task.prompt_form`),
    or a per-task table (`TASKS`)."""
    tree = ast.parse(source, filename)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            for side in sides:
                if isinstance(side, ast.Constant) and side.value in TASK_NAMES:
                    found.append(f"{where}: compares with the task name {side.value!r}")
                elif isinstance(side, ast.Attribute) and side.attr == "task":
                    found.append(f"{where}: compares {ast.unparse(side)} (a task name)")
                elif isinstance(side, (ast.Tuple, ast.List, ast.Set)) and any(
                        isinstance(e, ast.Constant) and e.value in TASK_NAMES for e in side.elts):
                    found.append(f"{where}: tests membership in task names")
        elif isinstance(node, ast.Attribute) and _is_task(node.value) and id(node) not in called:
            found.append(f"{where}: reads the task's field {ast.unparse(node)} (call a method instead)")
        elif isinstance(node, ast.Name) and node.id == "TASKS":
            found.append(f"{where}: a per-task table TASKS")
        elif isinstance(node, ast.Dict) and any(
                isinstance(k, ast.Constant) and k.value in TASK_NAMES for k in node.keys):
            found.append(f"{where}: a table keyed by task name")
    return found


def test_no_stage_branches_on_a_task():
    files = sorted(STAGES.glob("*.py"))
    assert len(files) >= 10  # the walk sees the stages
    found = [o for f in files for o in offences(f.read_text(encoding="utf-8"), f.name)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("snippet", [
    'if task.name == "chat":\n    pass',
    'chat = task.prompt_form == "messages"',
    'x = task_of(d).gate_metric',
    'if cfg.task == "pep8":\n    pass',
    'if name in ("pep8", "chat"):\n    pass',
    'metrics = TASKS[cfg.task].gate_metric',
    'METRICS = {"chat": ("a",)}',
    'if "chat" != data.task:\n    pass',
])
def test_the_walk_catches_a_branch_on_a_task(snippet):
    assert offences(snippet)


def test_the_walk_lets_method_calls_through():
    assert not offences('oracle = task.oracle()\nmetric, higher = task.gate()\nif task.conversational():\n    pass\n'
                        'print(f"task {task}")')


def test_builtin_tasks_load_and_keep_their_gates():
    assert (str(get_task("pep8")), get_task("pep8").gate()) == ("pep8", ("violations_per_char", False))
    assert (str(get_task("chat")), get_task("chat").gate()) == ("chat", ("judge_win_rate_vs_ref", True))
    assert get_task("pep8").oracle() is not None and get_task("chat").oracle() is None


def test_a_task_lacking_a_method_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "half_task.py").write_text(
        "from alignpipe.tasks import Task\n\n"
        "class Half(Task):\n"
        "    def conversational(self):\n        return False\n\n"
        "    def format_prompt(self, prompt, tok, meta=None):\n        return prompt\n\n"
        "    def oracle(self):\n        return None\n\n"
        "    def describe(self):\n        return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        load_task("half_task:Half")
    assert str(e.value) == ("data.task: task 'half_task:Half' lacks method gate() of alignpipe.tasks.Task "
                            "(missing: gate)")
    assert "\n" not in str(e.value)
    for spec, reason in (("nope", "unknown task 'nope'"), ("no_such_module:X", "cannot load task"),
                         ("half_task:Task", "lacks method")):
        with pytest.raises(ConfigError, match=reason):
            load_task(spec)
