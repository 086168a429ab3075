"""examples/: every example runs (as a user runs it, in its own process) and does what its docstring says.
The trainer examples skip cleanly without the `integrations` extra (lightning, accelerate, timm, transformers). The
wrapped-AdamW variants (``--base adamw``) run in this process, through the examples' own functions, to keep
the suite's time down."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import regopt

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"{package} is not installed (pip install -e '.[integrations]')")


def run_example(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{script} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_equal_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_equal_states(a, b, where: str = "state") -> None:
    """Nested dicts, lists and tensors equal, tensors bit for bit (an optimizer's state_dict)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_states(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_states(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture
def examples_path():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield
    finally:
        sys.path.remove(str(EXAMPLES))


def test_plain_loop_interrupted_and_resumed_equals_the_uninterrupted_run(tmp_path):
    out = run_example("plain_loop.py", "--steps", "10", "--checkpoint", "cut.pt", cwd=tmp_path)
    assert "final step 10" in out
    out = run_example("plain_loop.py", "--steps", "20", "--resume", "--checkpoint", "cut.pt", cwd=tmp_path)
    assert "step 20: loss" in out and "micro_grad_sq_norm" in out
    run_example("plain_loop.py", "--steps", "20", "--checkpoint", "whole.pt", cwd=tmp_path)
    cut, whole = load(tmp_path / "cut.pt"), load(tmp_path / "whole.pt")
    assert cut["step"] == whole["step"] == 20
    assert_equal_tensors(cut["model"], whole["model"])  # BatchNorm statistics included
    assert cut["optimizer"]["state"].keys() == whole["optimizer"]["state"].keys()
    for key, state in cut["optimizer"]["state"].items():
        if "momentum_buffer" in state:
            assert torch.equal(state["momentum_buffer"], whole["optimizer"]["state"][key]["momentum_buffer"])
    assert cut["scheduler"] == whole["scheduler"]


@needs("accelerate")
def test_accelerate_loop_in_bf16_matches_the_plain_loop_under_autocast(tmp_path):
    out = run_example("accelerate_loop.py", "--steps", "10", "--checkpoint", "accelerate.pt", cwd=tmp_path)
    assert "step 10: loss" in out and "final step 10" in out
    run_example("plain_loop.py", "--steps", "10", "--bf16", "--checkpoint", "plain.pt", cwd=tmp_path)
    prepared, plain = load(tmp_path / "accelerate.pt")["model"], load(tmp_path / "plain.pt")["model"]
    assert prepared.keys() == plain.keys()
    for key in prepared:
        torch.testing.assert_close(prepared[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)
    first = load(tmp_path / "plain.pt")["model"]  # and training moved the weights
    assert not torch.equal(first["0.weight"], _untrained_first_conv())


def _untrained_first_conv() -> torch.Tensor:
    sys.path.insert(0, str(EXAMPLES))
    try:
        from _common import small_cnn
    finally:
        sys.path.remove(str(EXAMPLES))
    return small_cnn()[0].weight.detach()


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons: reset them around an in-process Accelerator."""
    state = pytest.importorskip("accelerate.state",
                                reason="accelerate is not installed (pip install -e '.[integrations]')")
    state.AcceleratorState._reset_state(reset_partial_state=True)
    state.GradientState._reset_state()
    yield
    state.AcceleratorState._reset_state(reset_partial_state=True)
    state.GradientState._reset_state()


def test_accelerate_loop_with_a_wrapped_adamw_matches_the_plain_loop(fresh_accelerate_state, examples_path, tmp_path):
    import accelerate_loop
    import plain_loop
    steps = ["--steps", "2", "--base", "adamw"]
    accelerate_loop.main([*steps, "--checkpoint", str(tmp_path / "accelerate.pt")])
    plain_loop.main([*steps, "--bf16", "--checkpoint", str(tmp_path / "plain.pt")])
    prepared, plain = load(tmp_path / "accelerate.pt")["model"], load(tmp_path / "plain.pt")
    for key, value in prepared.items():
        torch.testing.assert_close(value, plain["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    adamw_state = [s for key, s in plain["optimizer"]["state"].items() if key != "regopt"]
    assert adamw_state and all({"exp_avg", "exp_avg_sq", "step"} <= s.keys() for s in adamw_state)
    assert not torch.equal(prepared["0.weight"], _untrained_first_conv())


@needs("timm")
def test_timm_example_shows_the_fused_attention_error_then_trains_exactly(tmp_path):
    out = run_example("timm_model.py", "--steps", "5", cwd=tmp_path)
    assert "fused attention" in out
    if "the exact step ran" not in out:  # a build without double backward for fused attention: regopt says so
        assert "method='exact' needs a double backward" in out
    assert "fused_attn=False, method='exact': 5 steps" in out


# -- Lightning -----------------------------------------------------------------------------------------------
@pytest.fixture
def lightning_example(examples_path):
    pytest.importorskip("lightning", reason="lightning is not installed (pip install -e '.[integrations]')")
    import lightning_module
    return lightning_module


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_lightning_counts_steps_logs_and_resumes_to_the_uninterrupted_run(lightning_example, tmp_path):
    trainer, _ = lightning_example.train(5, tmp_path / "cut")
    assert trainer.global_step == 5
    with open(tmp_path / "cut" / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("micro_grad_sq_norm")]
    assert len(rows) == 5 and all(float(r["micro_grad_sq_norm"]) > 0 for r in rows)
    assert [float(r["train/num_micro_batches"]) for r in rows] == [4.0] * 5
    trainer, resumed = lightning_example.train(10, tmp_path / "cut", resume=True)
    assert trainer.global_step == 10
    lr_after = trainer.optimizers[0].param_groups[0]["lr"]
    trainer, whole = lightning_example.train(10, tmp_path / "whole")
    assert trainer.global_step == 10 and trainer.optimizers[0].param_groups[0]["lr"] == lr_after == 0.1 * 0.5**3
    assert_equal_tensors(_state(resumed), _state(whole))
    assert not torch.equal(_state(whole)["model.0.weight"], _untrained_first_conv())


def test_lightning_steps_a_wrapped_adamw_logs_and_resumes_to_the_uninterrupted_run(lightning_example, tmp_path):
    small = {"base": "adamw", "batch_size": 128}  # 2 micro-batches a step, 5 steps an epoch (cut at its end)
    trainer, module = lightning_example.train(5, tmp_path / "cut", **small)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, regopt.GradNorm) and isinstance(optimizer.base, torch.optim.AdamW)
    assert module.optimizers().stats is optimizer.stats  # Lightning's wrapper reads through to regopt's
    with open(tmp_path / "cut" / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("micro_grad_sq_norm")]
    assert [float(r["train/num_micro_batches"]) for r in rows] == [2.0] * 5
    trainer, resumed = lightning_example.train(6, tmp_path / "cut", resume=True, **small)
    whole_trainer, whole = lightning_example.train(6, tmp_path / "whole", **small)
    for run in (trainer, whole_trainer):  # StepLR(step_size=3) on the wrapper moved the base's learning rate
        assert run.global_step == 6 and run.optimizers[0].base.param_groups[0]["lr"] == 1e-3 * 0.5**2
    assert_equal_tensors(_state(resumed), _state(whole))
    assert_equal_states(trainer.optimizers[0].state_dict(), whole_trainer.optimizers[0].state_dict())
    assert not torch.equal(_state(whole)["model.0.weight"], _untrained_first_conv())


def test_lightning_bf16_mixed_precision_runs_the_closure_under_autocast(lightning_example, tmp_path):
    seen = []

    class Probe(lightning_example.RegoptModule):
        def micro_batch_loss(self, x, y):
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            return super().micro_batch_loss(x, y)

    module = Probe()
    import lightning as L
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    train_set, _ = lightning_example.fashion_mnist(train_size=512)
    trainer.fit(module, torch.utils.data.DataLoader(train_set, batch_size=256))
    assert trainer.global_step == 2 and seen == [True] * 8  # 2 steps × 4 micro-batches, each under bf16
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())


def test_lightning_automatic_optimization_is_refused_with_the_recipe(lightning_example, tmp_path):
    class Automatic(lightning_example.RegoptModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = True

        def training_step(self, batch, batch_idx):
            return self.micro_batch_loss(*batch)

    import lightning as L
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    train_set, _ = lightning_example.fashion_mnist(train_size=256)
    with pytest.raises(TypeError, match=r"automatic_optimization = False") as info:
        trainer.fit(Automatic(), torch.utils.data.DataLoader(train_set, batch_size=256))
    assert "self.optimizers().step(batch=batch, loss_fn=" in str(info.value)


@needs("lightning")
def test_lightning_script_prints_global_step_5(tmp_path):
    out = run_example("lightning_module.py", "--max-steps", "5", "--root", "run", "--base", "adamw", cwd=tmp_path)
    assert out.strip().splitlines()[-1] == "global_step 5" and "logged: micro_grad_sq_norm" in out
    assert "optimizer: GradNorm around AdamW" in out


@needs("transformers")
def test_hf_trainer_prints_global_step_and_resumes_to_the_uninterrupted_run(tmp_path):
    out = run_example("hf_trainer.py", "--max-steps", "4", "--output-dir", "whole", cwd=tmp_path)
    assert out.strip().splitlines()[-1] == "global_step 4" and "regopt/micro_grad_sq_norm" in out
    (tmp_path / "cut").mkdir()
    (tmp_path / "whole" / "checkpoint-2").rename(tmp_path / "cut" / "checkpoint-2")
    out = run_example("hf_trainer.py", "--max-steps", "4", "--output-dir", "cut", "--resume", cwd=tmp_path)
    assert out.strip().splitlines()[-1] == "global_step 4"
    from safetensors.torch import load_file
    whole, cut = (load_file(tmp_path / run / "checkpoint-4" / "model.safetensors") for run in ("whole", "cut"))
    assert_equal_tensors(whole, cut)
