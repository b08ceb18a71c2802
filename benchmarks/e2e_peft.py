"""The other side of ``benchmarks/e2e.py``: the demo task with PEFT + transformers' ``Trainer``, as PEFT's docs show.

A plain script, as a user would write it: load the model and tokenizer, ``LoraConfig`` + ``get_peft_model``, tokenise
with the chat template (loss on the answer only), ``Trainer`` with ``DataCollatorForSeq2Seq`` padding. Hyperparameters
match ``examples/demo.yaml``: AdamW lr 5e-4 (weight decay 0.01, torch's default, as ours), constant schedule, no
warm-up, no gradient clipping (ours has none), batch 8, seed 0. Held-out exact match every ``--eval-every`` steps
with :func:`benchmarks.e2e_eval.exact_match`, stopping once it reaches ``--target``.

Run by ``benchmarks/e2e.py``; by hand: ``python -m benchmarks.e2e_peft --model DIR --out peft.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.e2e_eval import Tracker, exact_match, read_val


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (save_pretrained)")
    p.add_argument("--train", default="examples/data/dates/train.jsonl")
    p.add_argument("--val", default="examples/data/dates/val.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--bf16", action="store_true", help="TrainingArguments(bf16=True): bf16 autocast on CPU")
    return p.parse_args(argv)


def tokenize(tokenizer, row: dict[str, str], max_length: int = 256) -> dict[str, list[int]]:
    messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ([-100] * len(prompt_ids) + answer_ids)[:max_length]}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    tracker = Tracker(args.target, args.out)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,  # fmt: skip
    )

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))  # fmt: skip
    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines() if line.strip()]
    train = [tokenize(tokenizer, r) for r in rows]
    val = read_val(args.val, args.max_eval_samples)
    autocast = torch.bfloat16 if args.bf16 else None

    class EvalEvery(TrainerCallback):
        def on_train_begin(self, *a, **k):
            tracker.train_started = __import__("time").time()

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step % args.eval_every == 0 or state.global_step >= args.max_steps:
                tracker.evaluate(state.global_step,
                                 lambda: exact_match(model, tokenizer, val, args.max_new_tokens, autocast=autocast))
                control.should_training_stop = tracker.reached() or state.global_step >= args.max_steps
            return control

    targs = TrainingArguments(
        output_dir=str(Path(args.out).with_suffix(".trainer")), per_device_train_batch_size=8, learning_rate=5e-4,
        weight_decay=0.01, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, max_steps=args.max_steps,
        seed=0, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, bf16=args.bf16,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=targs, train_dataset=train, callbacks=[EvalEvery()],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.train()
    tracker.write(side="peft_trainer", precision="bf16 autocast" if args.bf16 else "fp32",
                  trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))


if __name__ == "__main__":
    main()
