"""regopt.integrations.huggingface.RegoptTrainer: a transformers Trainer whose backward is the regopt optimizer's.

Tiny GPT-2 and BERT built from config (no downloads), in float64 on the CPU, trained by the Trainer and
by an independent loop: per micro-batch the create_graph gradient, Σ_j w_j (L_j + λ R_j) times the
Trainer's weight 1/n over n accumulated batches, backward, the Trainer's clipping and linear schedule, the
base's step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import regopt

transformers = pytest.importorskip("transformers")
from regopt.integrations.huggingface import RegoptTrainer, penalty_positions, predicts_next_token  # noqa: E402

transformers.logging.set_verbosity_error()

SEQ, VOCAB, PENALTY, MICRO = 8, 64, 0.1, 2


def takes_token_level_logits() -> bool:
    """Whether a loss_fn may return (loss, logits [n, T, C], mask [n, T]), as RegoptTrainer's does for FT."""
    layer = torch.nn.Linear(3, 4)
    optimizer = regopt.FisherTrace(torch.optim.SGD(layer.parameters(), lr=0.1), micro_batch_size=2, penalty=0.1)
    x = torch.randn(2, 5, 3)

    def loss_fn(x):
        logits = layer(x)
        return logits.square().mean(), logits, torch.ones(x.shape[:2], dtype=torch.bool)

    try:
        optimizer.backward(loss_fn, (x,))
    except TypeError:
        return False
    return True


TOKEN_LEVEL_LOGITS = takes_token_level_logits()


def float64_causal_loss(logits, labels, vocab_size, **kwargs):
    """transformers' causal-LM loss without its cast of the logits to float32, so that a float64 model's loss is
    float64 (the references below are compared to ~1e-13)."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1), ignore_index=-100)


def gpt2(attn: str = "eager", dropout: float = 0.0) -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                     attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout,
                                     bos_token_id=0, eos_token_id=0)
    config._attn_implementation = attn
    model = transformers.GPT2LMHeadModel(config)
    model.loss_function = float64_causal_loss
    return model


def bert(attn: str = "eager", dropout: float = 0.0) -> torch.nn.Module:
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=VOCAB, max_position_embeddings=SEQ, pad_token_id=0,
                                     attention_probs_dropout_prob=dropout, hidden_dropout_prob=dropout)
    config._attn_implementation = attn
    return transformers.BertForMaskedLM(config)


def causal_examples(count: int) -> list[dict[str, torch.Tensor]]:
    """Token ids with their labels; the last two positions of every third example are padding (-100)."""
    ids = torch.randint(1, VOCAB, (count, SEQ), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[::3, -2:] = -100
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def masked_examples(count: int) -> list[dict[str, torch.Tensor]]:
    """Masked LM: positions 1 and 4 (and 6 in every other example) masked (id 1) and labelled, the rest -100."""
    ids = torch.randint(2, VOCAB, (count, SEQ), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(ids, -100)
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    chosen[:, [1, 4]] = True
    chosen[::2, 6] = True
    labels[chosen] = ids[chosen]
    ids = ids.masked_fill(chosen, 1)
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


class RecordingTrainer(RegoptTrainer):
    """Records the batches the Trainer hands its training step, in order, for the reference loop."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def arguments(tmp_path, accumulation: int, steps: int = 3, **overrides) -> transformers.TrainingArguments:
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
                    max_steps=steps, learning_rate=0.01, use_cpu=True, report_to=[], save_strategy="no",
                    logging_steps=1, disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(**{**settings, **overrides})


def train(model, optimizer, examples, tmp_path, accumulation: int, **overrides) -> RecordingTrainer:
    trainer = RecordingTrainer(model=model, args=arguments(tmp_path, accumulation, **overrides),
                               train_dataset=examples, optimizers=(optimizer, None))
    trainer.seen = []
    trainer.train()
    return trainer


def reference_penalized_loss(model, micro_batch: dict, penalty: str, generator) -> torch.Tensor:
    """L_j + λ R_j on one micro-batch, R_j = ‖∇_θ S_j‖² by create_graph, S_j = L_j (GN) or the mean CE of
    labels drawn from the model's own predictions over the labelled positions (FT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    outputs = model(**micro_batch)
    scalar = outputs.loss
    if penalty == "ft":
        logits, labels = outputs.logits, micro_batch["labels"]
        if isinstance(model, transformers.GPT2LMHeadModel):  # a causal LM: position t predicts label t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        logits, keep = logits.reshape(-1, VOCAB), (labels != -100).reshape(-1)
        drawn = torch.multinomial(torch.softmax(logits.detach().float(), dim=1), 1, generator=generator).squeeze(1)
        scalar = torch.nn.functional.cross_entropy(logits[keep], drawn[keep])
    grads = torch.autograd.grad(scalar, params, create_graph=True, allow_unused=True)
    return outputs.loss + PENALTY * sum(g.square().sum() for g in grads if g is not None)


def reference_run(model, base, batches, accumulation: int, steps: int, penalty: str = "gn", generator=None):
    """The Trainer's loop by hand: n batches each weighted 1/n, clip to 1.0, linear decay to 0 over the steps."""
    schedule = transformers.get_linear_schedule_with_warmup(base, 0, steps)
    model.train()
    for step in range(steps):
        base.zero_grad()
        for batch in batches[step * accumulation:(step + 1) * accumulation]:
            micro_batches = [{k: v[i:i + MICRO] for k, v in batch.items()} for i in range(0, 4, MICRO)]
            total = sum(reference_penalized_loss(model, m, penalty, generator) * (MICRO / 4) for m in micro_batches)
            (total / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        base.step()
        schedule.step()


def assert_same_parameters(a, b) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13, msg=name)


CASES = [(gpt2, causal_examples), (bert, masked_examples)]


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("build,examples", CASES, ids=["gpt2", "bert"])
def test_grad_norm_around_adamw_equals_the_float64_reference(build, examples, accumulation, tmp_path):
    torch.manual_seed(0)
    model = build().double()
    reference = build().double()
    reference.load_state_dict(model.state_dict())
    adamw = dict(lr=0.01, weight_decay=0.05)
    optimizer = regopt.GradNorm(torch.optim.AdamW(model.parameters(), **adamw), micro_batch_size=MICRO,
                                penalty=PENALTY)
    trainer = train(model, optimizer, examples(4 * 3 * accumulation), tmp_path, accumulation)
    assert trainer.state.global_step == 3
    reference_run(reference, torch.optim.AdamW(reference.parameters(), **adamw), trainer.seen, accumulation, 3)
    assert_same_parameters(model, reference)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all("regopt/micro_grad_sq_norm" in entry for entry in logged)
    assert logged[-1]["regopt/penalty"] > 0
    assert trainer.optimizer.optimizer is optimizer  # the documented way to the stats through Accelerate's wrapper


@pytest.mark.parametrize("accumulation", [1, 2])
def test_grad_norm_sgd_equals_the_float64_reference(accumulation, tmp_path):
    torch.manual_seed(0)
    model, reference = gpt2().double(), gpt2().double()
    reference.load_state_dict(model.state_dict())
    optimizer = regopt.GradNormSGD(model.parameters(), lr=0.1, momentum=0.9, micro_batch_size=MICRO, penalty=PENALTY)
    trainer = train(model, optimizer, causal_examples(4 * 2 * accumulation), tmp_path, accumulation, steps=2)
    reference_run(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), trainer.seen,
                  accumulation, 2)
    assert_same_parameters(model, reference)


@pytest.mark.skipif(not TOKEN_LEVEL_LOGITS, reason="FisherTrace on a language model's labelled tokens needs a "
                    "loss_fn output (loss, logits [n, T, V], mask [n, T]), which this regopt does not take yet")
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("build,examples", CASES, ids=["gpt2", "bert"])
def test_fisher_trace_on_token_logits_equals_the_float64_reference(build, examples, accumulation, tmp_path):
    torch.manual_seed(0)
    model, reference = build().double(), build().double()
    reference.load_state_dict(model.state_dict())
    optimizer = regopt.FisherTrace(torch.optim.AdamW(model.parameters(), lr=0.01), micro_batch_size=MICRO,
                                   penalty=PENALTY, generator=torch.Generator().manual_seed(5))
    trainer = train(model, optimizer, examples(4 * 2 * accumulation), tmp_path, accumulation, steps=2)
    reference_run(reference, torch.optim.AdamW(reference.parameters(), lr=0.01), trainer.seen, accumulation, 2,
                  penalty="ft", generator=torch.Generator().manual_seed(5))
    assert_same_parameters(model, reference)


def test_penalty_positions_are_the_labelled_ones_shifted_for_a_causal_model():
    labels = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, -100]])
    logits = torch.randn(2, 4, 3)
    same, kept = penalty_positions(logits, labels, shifted=False)
    assert same is logits and kept.tolist() == [[True, True, False, True], [False, True, True, False]]
    predicting, kept = penalty_positions(logits, labels, shifted=True)
    assert torch.equal(predicting, logits[:, :3]) and kept.tolist() == [[True, False, True], [True, True, False]]
    assert penalty_positions(torch.zeros(2, 3), torch.tensor([1, -100]), shifted=False)[1].tolist() == [True, False]
    assert penalty_positions(torch.zeros(2, 3), torch.zeros(2, 3), shifted=False)[1] is None  # multi-label targets
    assert predicts_next_token(gpt2()) and not predicts_next_token(bert())


def test_a_torch_optimizer_is_refused_with_the_recipe(tmp_path):
    model = gpt2()
    with pytest.raises(TypeError, match=r"RegoptTrainer needs a regopt optimizer.*got AdamW.*regopt.GradNorm"):
        RegoptTrainer(model=model, args=arguments(tmp_path, 1), train_dataset=causal_examples(4),
                      optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(TypeError, match="got no optimizer"):
        RegoptTrainer(model=model, args=arguments(tmp_path, 1), train_dataset=causal_examples(4))


def test_grafting_with_gradient_accumulation_is_refused(tmp_path):
    model = gpt2()
    optimizer = regopt.GraftedSGD(model.parameters(), lr=0.1, micro_batch_size=MICRO, norms=None)
    with pytest.raises(ValueError, match=r"grafted optimizer.*gradient_accumulation_steps=2"):
        RegoptTrainer(model=model, args=arguments(tmp_path, 2), train_dataset=causal_examples(8),
                      optimizers=(optimizer, None))


def test_fp16_grad_scaler_is_refused(tmp_path):
    model = gpt2()
    optimizer = regopt.GradNorm(torch.optim.AdamW(model.parameters()), micro_batch_size=MICRO, penalty=PENALTY)
    args = arguments(tmp_path, 1)
    args.fp16 = True  # set after construction: TrainingArguments itself refuses fp16 on a machine without CUDA
    with pytest.raises(ValueError, match=r"fp16=True.*GradScaler.*bf16=True"):
        RegoptTrainer(model=model, args=args, train_dataset=causal_examples(4), optimizers=(optimizer, None))


def test_sdpa_without_a_double_backward_names_eager_attention_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    model = gpt2(attn="sdpa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = regopt.GradNorm(torch.optim.AdamW(model.parameters()), micro_batch_size=MICRO, penalty=PENALTY)
    with pytest.raises(RuntimeError, match=r"double backward.*attn_implementation=\"eager\""):
        train(model, optimizer, causal_examples(4), tmp_path, 1, steps=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_bf16_trains_and_logs_finite_statistics(tmp_path):
    torch.manual_seed(0)
    model = gpt2()
    logits_dtypes = []
    model.lm_head.register_forward_hook(lambda module, args, output: logits_dtypes.append(output.dtype))
    optimizer = regopt.GradNorm(torch.optim.AdamW(model.parameters(), lr=0.01), micro_batch_size=MICRO,
                                penalty=PENALTY)
    trainer = train(model, optimizer, causal_examples(8), tmp_path, 1, steps=2, bf16=True)
    assert trainer.state.global_step == 2
    assert logits_dtypes == [torch.bfloat16] * 4  # the Trainer's autocast reaches every micro-batch's forward
    last = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    assert last["regopt/skipped"] == 0.0 and torch.isfinite(torch.tensor(last["regopt/penalty"]))


def test_importing_regopt_does_not_import_transformers():
    code = "import sys, regopt; assert 'transformers' not in sys.modules, 'transformers imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
