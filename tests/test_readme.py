"""The README's promises: its first screen holds the set-up commands and a usage example that runs and
trains, and CI runs its test command verbatim."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
USAGE = re.findall(r"```python\n(.*?)```", README, re.S)[0]


def run_usage_example(source: str, capsys) -> tuple[dict, list[float], list[float]]:
    """Execute ``source``; return its namespace and the losses and micro-batch ‖g‖² it printed, per step."""
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("loss ") for line in lines), lines
    return namespace, [float(line.split()[1]) for line in lines], [float(line.split()[-1]) for line in lines]


def test_usage_example_trains_with_the_penalty(capsys):
    namespace, losses, grad_sq_norms = run_usage_example(USAGE, capsys)
    opt = namespace["opt"]
    assert isinstance(opt, namespace["regopt"].GradNormSGD)
    assert int(opt.stats.num_micro_batches) == 4  # B = 512 in micro-batches of 128, as the comment says
    assert losses[0] > losses[1] > losses[2]  # three steps on one batch lower its loss
    assert grad_sq_norms[-1] > 0 and abs(grad_sq_norms[-1] - float(opt.stats.micro_grad_sq_norm)) <= 5e-4
    # The penalty changes the step: the same example with λ = 0 ends at different parameters.
    unpenalized, _, _ = run_usage_example(USAGE.replace("penalty=0.01", "penalty=0.0"), capsys)
    ends = [torch.cat([p.detach().flatten() for p in ns["model"].parameters()]) for ns in (namespace, unpenalized)]
    assert not torch.allclose(ends[0], ends[1], rtol=0, atol=1e-7)


def test_first_screen_holds_the_setup_commands_and_the_example():
    lines = README.splitlines()
    assert len(lines) <= 250
    first_screen = "\n".join(lines[:80])
    assert "# the tests" in first_screen and "# the main job" in first_screen
    assert USAGE in first_screen


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n# the tests.*?\n(.*?)\n```", README, re.S)
    assert len(commands) == 1
    assert commands[0] in (ROOT / ".ci" / "run").read_text()


def test_readme_has_exactly_one_main_job_command():
    commands = re.findall(r"```bash\n# the main job.*?\n(.*?)\n```", README, re.S)
    assert len(commands) == 1 and commands[0].endswith("python benchmarks/reproduce.py")


def test_wrapper_example_runs_adamw_on_the_penalized_gradient(capsys):
    namespace, _, _ = run_usage_example(USAGE, capsys)
    wrapper_example = re.findall(r"```python\n(.*?)```", README, re.S)[1]
    before = [p.detach().clone() for p in namespace["model"].parameters()]
    exec(compile(wrapper_example, "README.md", "exec"), namespace)
    opt, regopt = namespace["opt"], namespace["regopt"]
    assert isinstance(opt, regopt.GradNorm) and isinstance(opt.base, torch.optim.AdamW)
    assert opt.param_groups is opt.base.param_groups and opt.step_count == 1
    assert all("exp_avg" in opt.state[p] for p in namespace["model"].parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, namespace["model"].parameters()))
