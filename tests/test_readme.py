"""The README's promises: its usage example runs, and CI runs its test command verbatim."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_usage_example_runs(capsys):
    example = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    exec(compile(example, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("loss ") for line in lines)


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n# the tests.*?\n(.*?)\n```", README, re.S)
    assert len(commands) == 1
    assert commands[0] in (ROOT / ".ci" / "run").read_text()


def test_readme_has_exactly_one_main_job_command():
    commands = re.findall(r"```bash\n# the main job.*?\n(.*?)\n```", README, re.S)
    assert len(commands) == 1 and commands[0].endswith("python benchmarks/reproduce.py")
