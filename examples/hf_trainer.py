"""regopt in a Hugging Face ``Trainer``: ``RegoptTrainer`` with the optimizer passed in ``optimizers=``.

    python examples/hf_trainer.py --max-steps 5                    # prints "global_step 5"
    python examples/hf_trainer.py --max-steps 6 --accumulation 2   # the Trainer's gradient accumulation
    python examples/hf_trainer.py --max-steps 6 --resume           # continues from the last checkpoint

A tiny GPT-2 built from its config (no download) learns a synthetic token sequence. The Trainer keeps its
loop, gradient accumulation, clipping (``max_grad_norm``), scheduler, logging and checkpoints; its training
step calls ``optimizer.backward(loss_fn, batch, weight=1/n)`` with ``loss_fn(**micro_batch) =
model(**micro_batch).loss``, and the Trainer's ``optimizer.step()`` is AdamW's update. The model uses eager
attention, which has the double backward the exact penalty needs (CPU SDPA's fused kernel has none).
"""

from __future__ import annotations

import argparse

import torch
import transformers

import regopt
from regopt.integrations.huggingface import RegoptTrainer

SEQ, VOCAB = 8, 64


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                     bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"  # a double backward, for the exact penalty
    return transformers.GPT2LMHeadModel(config)


def token_dataset(count: int) -> list[dict[str, torch.Tensor]]:
    """Sequences that count up from a random start (mod VOCAB): the next token is learnable."""
    starts = torch.randint(0, VOCAB, (count, 1), generator=torch.Generator().manual_seed(0))
    ids = (starts + torch.arange(SEQ)) % VOCAB
    return [{"input_ids": row, "labels": row} for row in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--accumulation", type=int, default=1, help="the Trainer's gradient_accumulation_steps")
    parser.add_argument("--output-dir", default="hf_run")
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    args = parser.parse_args()

    transformers.set_seed(0)
    model = tiny_gpt2()
    optimizer = regopt.GradNorm(torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01),
                                micro_batch_size=4, penalty=0.01)
    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=16,
        gradient_accumulation_steps=args.accumulation, max_grad_norm=1.0, logging_steps=1,
        save_strategy="steps", save_steps=args.save_steps, use_cpu=True, report_to=[], disable_tqdm=True, seed=0)
    trainer = RegoptTrainer(model=model, args=training_args, train_dataset=token_dataset(256),
                            optimizers=(optimizer, None))  # None: the Trainer builds its linear schedule
    trainer.train(resume_from_checkpoint=args.resume or None)
    logged = [entry for entry in trainer.state.log_history if "regopt/penalty" in entry]
    print(f"last log: loss {logged[-1]['loss']:.4f}, regopt/penalty {logged[-1]['regopt/penalty']:.4f}, "
          f"regopt/micro_grad_sq_norm {logged[-1]['regopt/micro_grad_sq_norm']:.4f}")
    print(f"global_step {trainer.state.global_step}")


if __name__ == "__main__":
    main()
