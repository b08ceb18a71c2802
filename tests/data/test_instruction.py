"""Tests for tokenisation, masking, collation and the InstructionDataModule."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_lora.data.instruction import (
    IGNORE_INDEX,
    InstructionDataModule,
    collate_examples,
    split_train_val,
    tokenize_conversation,
)
from lightning_lora.data.jsonl import DataFormatError, to_conversation
from lightning_lora.modules.causal_lm import CausalLMModule
from tests.tiny_lm import build_tiny_tokenizer, save_tiny_causal_lm

DATES = Path(__file__).resolve().parents[2] / "examples" / "data" / "dates"
CONV = to_conversation({"prompt": "Convert: 3 Mar 2021", "response": "2021-03-03"})
LONG_CONV = to_conversation(
    {"system": "Be exact.", "prompt": "Convert this one please: March 3, 2021", "response": "2021-03-03"}
)


@pytest.fixture(scope="module")
def chat_tokenizer():
    return build_tiny_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return build_tiny_tokenizer(chat_template=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("plain") / "model", chat_template=False)


class NeverTrains(CausalLMModule):
    def training_step(self, *args: object) -> None:
        raise AssertionError("training must not start on bad data")


def labelled_text(tokenizer, labels: list[int]) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def test_chat_template_masks_the_prompt_and_keeps_answer_plus_end_of_turn(chat_tokenizer) -> None:
    example = tokenize_conversation(CONV, chat_tokenizer, max_length=256, use_chat_template=True)
    assert labelled_text(chat_tokenizer, example.labels) == "2021-03-03<|im_end|>\n"
    n_prompt = len(example.prompt_ids)
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.input_ids[:n_prompt] == example.prompt_ids
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    expected_prompt = chat_tokenizer.apply_chat_template([dict(CONV[0])], tokenize=False, add_generation_prompt=True)
    assert chat_tokenizer.decode(example.prompt_ids) == expected_prompt
    assert example.answer == "2021-03-03" and not example.truncated


def test_chat_template_includes_the_system_message(chat_tokenizer) -> None:
    example = tokenize_conversation(LONG_CONV, chat_tokenizer, max_length=256, use_chat_template=True)
    assert chat_tokenizer.decode(example.prompt_ids).startswith("<|im_start|>system\nBe exact.<|im_end|>\n")


def test_without_chat_template_the_answer_ends_with_eos(plain_tokenizer) -> None:
    example = tokenize_conversation(CONV, plain_tokenizer, max_length=256, use_chat_template=False)
    assert plain_tokenizer.decode(example.prompt_ids) == "Convert: 3 Mar 2021\n"
    assert labelled_text(plain_tokenizer, example.labels) == "2021-03-03<|im_end|>"
    assert example.input_ids[-1] == plain_tokenizer.eos_token_id


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_answer_tokens(chat_tokenizer) -> None:
    full = tokenize_conversation(LONG_CONV, chat_tokenizer, max_length=256, use_chat_template=True)
    cut = tokenize_conversation(LONG_CONV, chat_tokenizer, max_length=40, use_chat_template=True)
    assert len(cut.input_ids) == 40 and cut.truncated
    assert cut.input_ids[-len(full.input_ids) + len(full.prompt_ids) :] == full.input_ids[len(full.prompt_ids) :]
    assert cut.prompt_ids == full.prompt_ids[-len(cut.prompt_ids) :]
    tiny = tokenize_conversation(LONG_CONV, chat_tokenizer, max_length=4, use_chat_template=True)
    assert len(tiny.input_ids) == 4 and len(tiny.prompt_ids) == 1  # still one label to learn after the shift


def test_collate_right_pads_to_the_longest_and_left_pads_generation_prompts(chat_tokenizer) -> None:
    examples = [tokenize_conversation(c, chat_tokenizer, 256, True) for c in (CONV, LONG_CONV)]
    pad = chat_tokenizer.pad_token_id
    batch = collate_examples(examples, pad_token_id=pad, with_generation=True)
    longest = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, longest)
    short, n = examples[0], len(examples[0].input_ids)
    assert batch["input_ids"][0, :n].tolist() == short.input_ids
    assert (batch["input_ids"][0, n:] == pad).all() and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (longest - n)
    assert batch["attention_mask"][1].all()
    widest = max(len(e.prompt_ids) for e in examples)
    assert batch["gen_input_ids"].shape == (2, widest)
    p = len(short.prompt_ids)
    assert batch["gen_input_ids"][0, -p:].tolist() == short.prompt_ids
    assert (batch["gen_input_ids"][0, :-p] == pad).all()
    assert batch["gen_attention_mask"][0].tolist() == [0] * (widest - p) + [1] * p
    assert batch["answers"] == ["2021-03-03", "2021-03-03"]
    assert all(t.dtype == torch.long for k, t in batch.items() if k != "answers")


def test_collate_without_generation_has_training_keys_only(chat_tokenizer) -> None:
    batch = collate_examples([tokenize_conversation(CONV, chat_tokenizer, 256, True)], pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_split_train_val_is_seeded_and_disjoint() -> None:
    records = [to_conversation({"prompt": str(i), "response": str(i)}) for i in range(50)]
    train, val = split_train_val(records, 0.1, seed=3)
    assert (train, val) == split_train_val(records, 0.1, seed=3)
    assert len(val) == 5 and len(train) == 45
    assert not {r[0]["content"] for r in train} & {r[0]["content"] for r in val}
    assert split_train_val(records[:2], 0.1, seed=0)[1] != []  # at least one held out when asked
    assert split_train_val(records, 0.0, seed=0) == (records, [])


def test_datamodule_batches_use_the_chat_template(tiny_dir: Path) -> None:
    dm = InstructionDataModule(str(DATES / "train.jsonl"), str(DATES / "val.jsonl"), tokenizer=str(tiny_dir),
                               batch_size=4, eval_batch_size=5, max_eval_samples=10)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_examples) == 400 and len(dm.val_examples) == 10
    train_batch = next(iter(dm.train_dataloader()))
    assert set(train_batch) == {"input_ids", "attention_mask", "labels"} and len(train_batch["input_ids"]) == 4
    val_batch = next(iter(dm.val_dataloader()))
    assert len(val_batch["answers"]) == 5
    first_prompt = dm.tokenizer.decode(val_batch["gen_input_ids"][0], skip_special_tokens=False)
    assert first_prompt.replace("<pad>", "").startswith("<|im_start|>user\nConvert this date to ISO format")
    prompts = dm.eval_prompts()
    assert len(prompts) == 10 and prompts[0].prompt.endswith("<|im_start|>assistant\n")
    assert prompts[0].answer == val_batch["answers"][0]


def test_datamodule_without_chat_template_and_val_fraction(plain_dir: Path) -> None:
    dm = InstructionDataModule(str(DATES / "val.jsonl"), tokenizer=str(plain_dir), val_fraction=0.25)
    dm.setup("fit")
    assert (len(dm.train_examples), len(dm.val_examples)) == (30, 10)
    assert dm.tokenizer.decode(dm.val_examples[0].prompt_ids) == dm.val_records[0][0]["content"] + "\n"
    assert dm.eval_prompts()[0].prompt == dm.val_records[0][0]["content"] + "\n"


def test_forcing_a_missing_chat_template_is_refused(plain_dir: Path) -> None:
    dm = InstructionDataModule(str(DATES / "val.jsonl"), tokenizer=str(plain_dir), use_chat_template=True)
    with pytest.raises(ValueError, match=r"use_chat_template=True but the tokenizer '.*' has no chat template"):
        dm.setup("fit")


def test_missing_tokenizer_is_refused() -> None:
    dm = InstructionDataModule(str(DATES / "val.jsonl"))
    with pytest.raises(ValueError, match=r"needs a tokenizer: pass tokenizer= \(CLI: --data\.tokenizer\)"):
        dm.prepare_data()


def test_bad_arguments_are_reported_together() -> None:
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1\.5; max_length must be >= 2, "
                                         r"got 0; batch_size must be >= 1, got 0"):  # fmt: skip
        InstructionDataModule("x.jsonl", val_fraction=1.5, max_length=0, batch_size=0)


def test_bad_data_fails_before_the_first_training_step(tmp_path: Path, tiny_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + '{"prompt": "p"}\n')

    dm = InstructionDataModule(str(bad), tokenizer=str(tiny_dir))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(DataFormatError, match=r'bad\.jsonl:2: missing "response"'):
        trainer.fit(NeverTrains(model=str(tiny_dir)), dm)


def test_dataloaders_before_setup_are_refused() -> None:
    dm = InstructionDataModule(str(DATES / "val.jsonl"), tokenizer="unused")
    with pytest.raises(RuntimeError, match=r"call setup\(\) before asking for dataloaders"):
        dm.train_dataloader()
    with pytest.raises(RuntimeError, match=r"call setup\(\) before eval_prompts\(\)"):
        dm.eval_prompts()
