"""Hugging Face transformers: :class:`RegoptTrainer`, a ``transformers.Trainer`` whose backward is regopt's.

The Trainer keeps everything but the gradient: gradient accumulation, ``max_grad_norm`` clipping, the
scheduler, logging, bf16 autocast, checkpoints. For each batch B_i of an accumulation of n batches its
training step calls the regopt optimizer given in ``optimizers=(optimizer, scheduler)`` as

    optimizer.backward(loss_fn, B_i, weight=1/n),   .grad += (1/n) Σ_j w_j ∇_θ[L_j + λ R_j]

with ``loss_fn(**micro_batch) = model(**micro_batch).loss`` (and the logits, for the penalties that need them),
and the Trainer's ``optimizer.step()`` is the base optimizer's update from ``.grad``. Each micro-batch's L_j is
the model's own loss on it, a mean over its labelled tokens; HF's ``num_items_in_batch`` token count is not used.

Importing this module imports transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import transformers
from torch import Tensor

from ..base_optimizer import RegoptOptimizer
from ..grafting import Grafted
from ..hvp import NoDoubleBackwardError

IGNORE_INDEX = -100  # the label transformers' losses leave out

ATTENTION_ADVICE = (
    "{error}\nIn a transformers model, build it with eager attention, which has a double backward: "
    "`AutoModel...from_pretrained(..., attn_implementation=\"eager\")`, `Model(config)` after "
    "`config._attn_implementation = \"eager\"`, or `model.set_attn_implementation(\"eager\")`"
)


def regopt_optimizer_of(optimizer: Any) -> RegoptOptimizer | None:
    """The regopt optimizer inside ``optimizer`` (itself, or inside Accelerate's ``AcceleratedOptimizer``)."""
    while optimizer is not None and not isinstance(optimizer, RegoptOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def penalty_positions(logits: Tensor, labels: Tensor | None, shifted: bool) -> tuple[Tensor, Tensor | None]:
    """The logits the penalty sees and which of their positions it keeps: those whose label is not -100.

    ``shifted`` (a causal LM): the logits at position t predict the label at t + 1, so the last position,
    which predicts nothing, is dropped and position t is kept where ``labels[:, t + 1]`` is. The mask is None
    (every position kept) without labels of the logits' leading shape (e.g. multi-label float targets)."""
    if labels is None or labels.dim() != logits.dim() - 1 or labels.shape != logits.shape[:-1]:
        return logits, None
    if shifted:
        return logits[:, :-1], labels[:, 1:] != IGNORE_INDEX
    return logits, labels != IGNORE_INDEX


def predicts_next_token(model: torch.nn.Module) -> bool:
    """Whether the model's loss compares the logits at position t with the label at t + 1 (a causal LM): its
    class is in transformers' causal-LM auto mapping, or its ``loss_type`` is ``"ForCausalLM"``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {name for entry in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
             for name in ((entry,) if isinstance(entry, str) else entry)}
    return type(model).__name__ in names or getattr(model, "loss_type", None) == "ForCausalLM"


class RegoptTrainer(transformers.Trainer):
    """``transformers.Trainer`` for a regopt optimizer: pass ``optimizers=(optimizer, scheduler)``, e.g.
    ``regopt.GradNorm(torch.optim.AdamW(model.parameters(), lr=...), micro_batch_size=..., penalty=...)``.

    Each training step is ``optimizer.backward(loss_fn, batch, weight=1/n)`` over the Trainer's n
    accumulated batches (so every batch weighs the same, as in the Trainer without token-count
    normalization); the Trainer then clips, steps and schedules as usual. The optimizer's ``stats`` of the
    last batch are added to each training log as ``regopt/<name>`` (read at logging time only: one host sync).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_regopt_setup()

    def _check_regopt_setup(self) -> None:
        """Refuse what cannot drive a regopt backward: no regopt optimizer, or a backward the Trainer owns."""
        if regopt_optimizer_of(self.optimizer) is None:
            given = "no optimizer" if self.optimizer is None else type(self.optimizer).__name__
            raise TypeError(
                f"RegoptTrainer needs a regopt optimizer in optimizers=(optimizer, scheduler), got {given}: e.g. "
                "optimizers=(regopt.GradNorm(torch.optim.AdamW(model.parameters(), lr=5e-5), micro_batch_size=8, "
                "penalty=0.01), None) (the Trainer builds the scheduler when it is None)"
            )
        if isinstance(regopt_optimizer_of(self.optimizer), Grafted) and self.args.gradient_accumulation_steps > 1:
            raise ValueError(
                f"RegoptTrainer cannot accumulate a grafted optimizer's gradient over gradient_accumulation_steps="
                f"{self.args.gradient_accumulation_steps} batches: grafting rescales a whole step's gradient "
                "(s · G/‖G‖ of a sum is not the sum of the rescaled parts). Use gradient_accumulation_steps=1 and a "
                "larger per_device_train_batch_size (micro_batch_size bounds the memory)"
            )
        if self.args.fp16 or getattr(self.args, "half_precision_backend", None) == "apex":
            raise ValueError(
                "RegoptTrainer cannot use fp16=True: the Trainer's GradScaler unscales .grad before the update, "
                "but regopt's backward does not scale its gradient by the GradScaler's scale, so the update would "
                "be divided by it. Use bf16=True, or float16 with the optimizer's loss_scale=\"dynamic\""
            )
        if self.is_deepspeed_enabled or getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                "RegoptTrainer cannot run under DeepSpeed or FSDP: they own the backward and shard the gradients, "
                "and regopt's backward differentiates each micro-batch itself. Use DDP (torchrun) or one device"
            )

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> Tensor:
        """``optimizer.backward(loss_fn, inputs, weight=1/n)`` for the n batches of this accumulation; returns
        the batch's mean loss times 1/n (the Trainer sums it over the accumulation for its logged loss)."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = dict(self._prepare_inputs(inputs))
        weight = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        optimizer = regopt_optimizer_of(self.optimizer)
        loss_fn = self._loss_fn(self.accelerator.unwrap_model(model), optimizer)
        with self.compute_loss_context_manager():
            try:
                loss = optimizer.backward(loss_fn, inputs, weight=weight)
            except NoDoubleBackwardError as error:
                if error.op is None or "attention" in error.op:  # a fused attention kernel: name HF's switch
                    error.args = (ATTENTION_ADVICE.format(error=error),)
                raise
        return loss.detach() * weight

    def _loss_fn(self, model: torch.nn.Module, optimizer: RegoptOptimizer) -> Callable[..., Any]:
        """``model(**micro_batch).loss``, with the logits and the kept positions when the penalty needs them.

        The model itself, not a DDP wrapper: regopt all-reduces the step's gradient once."""
        needs_logits = optimizer._penalty is not None and optimizer._penalty.needs_logits
        shifted = predicts_next_token(model)

        def loss_fn(**micro_batch: Any) -> Any:
            outputs = model(**micro_batch)
            loss = outputs["loss"] if isinstance(outputs, Mapping) and "loss" in outputs else None
            if loss is None:
                raise ValueError(
                    f"{type(model).__name__} returned no loss: RegoptTrainer differentiates the model's own loss, "
                    "so the batches must hold the labels (e.g. a data collator that adds `labels`)"
                )
            if not needs_logits:
                return loss
            return (loss, *penalty_positions(outputs["logits"], micro_batch.get("labels"), shifted))

        return loss_fn

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, plus the optimizer's last ``stats`` as ``regopt/...`` in the training logs."""
        optimizer = regopt_optimizer_of(self.optimizer)
        if "loss" in logs and optimizer is not None and optimizer.stats is not None:
            logs = {**logs, **optimizer.stats.as_dict(prefix="regopt/")}
        super().log(logs, *args, **kwargs)
