"""The instruction-tuning data module: JSONL records -> token batches with the loss on the answer only.

A record's prompt is every message but the last, rendered with the tokenizer's chat template and its
generation prompt; the completion is the assistant's answer plus the template's end-of-turn text. Without a
chat template the prompt is the messages' contents joined by blank lines plus a newline, and the completion
is the answer plus the EOS token. Labels are ``-100`` (ignored by the loss) on prompt and padding tokens.

Validation batches also carry what generation-based exact match needs: the prompts alone, left-padded
(``gen_input_ids``, ``gen_attention_mask``), and the reference answers (``answers``).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_lora.data.jsonl import Conversation, read_instruction_file
from lightning_lora.data.packing import collate_packed, pad_fraction
from lightning_lora.data.rendering import render_completion, render_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF's loss) skips


@dataclass(frozen=True)
class TokenizedExample:
    """One tokenised record: ``input_ids = prompt_ids + completion ids``; ``labels`` masks the prompt."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    answer: str
    truncated: bool = False


class EvalPrompt(NamedTuple):
    """A rendered prompt (text ready for generation, template applied) and its reference answer."""

    prompt: str
    answer: str


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _fit_length(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut the prompt from the left (keeping one token), then the completion from the right, to fit."""
    overflow = len(prompt) + len(completion) - max_length
    if overflow <= 0:
        return prompt, completion
    prompt = prompt[max(0, min(overflow, len(prompt) - 1)) :]
    return prompt, completion[: max_length - len(prompt)]


def tokenize_conversation(
    messages: Conversation, tokenizer: PreTrainedTokenizerBase, max_length: int, use_chat_template: bool
) -> TokenizedExample:
    """Tokenise one conversation for training and evaluation.

    Prompt and completion are tokenised separately and concatenated, so the training input starts with
    exactly the tokens that generation is later given. If longer than ``max_length``, the prompt loses
    tokens from the left first, then the completion from the right.

    Args:
        messages: The conversation; the last message is the answer.
        tokenizer: The model's tokenizer.
        max_length: Longest allowed ``input_ids``.
        use_chat_template: See :func:`render_prompt`.

    Returns:
        The tokenised example; ``labels`` is ``-100`` on prompt tokens.
    """
    prompt_text = render_prompt(messages, tokenizer, use_chat_template)
    # A chat template writes its own special tokens (e.g. BOS); a plain prompt gets the tokenizer's.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not use_chat_template)["input_ids"]
    completion = render_completion(messages, tokenizer, use_chat_template)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not use_chat_template:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    truncated = len(prompt_ids) + len(completion_ids) > max_length
    prompt_ids, completion_ids = _fit_length(prompt_ids, completion_ids, max_length)
    return TokenizedExample(
        input_ids=prompt_ids + completion_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
        prompt_ids=prompt_ids,
        answer=messages[-1]["content"],
        truncated=truncated,
    )


def _pad(rows: Sequence[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = [[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long)  # (B, T_max)


def collate_examples(
    examples: Sequence[TokenizedExample], pad_token_id: int, with_generation: bool = False
) -> dict[str, Any]:
    """Batch tokenised examples: right-pad to the longest example in the batch.

    Args:
        examples: The examples of one batch.
        pad_token_id: Token id used for padding (never seen by the loss or attention).
        with_generation: Also return ``gen_input_ids`` / ``gen_attention_mask`` (the prompts alone,
            left-padded so that generated tokens follow every prompt directly) and ``answers``.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (``(B, T)`` long tensors), plus the generation keys.
    """
    ids = [e.input_ids for e in examples]
    batch: dict[str, Any] = {
        "input_ids": _pad(ids, pad_token_id),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0),
        "labels": _pad([e.labels for e in examples], IGNORE_INDEX),
    }
    if with_generation:
        prompts = [e.prompt_ids for e in examples]
        batch["gen_input_ids"] = _pad(prompts, pad_token_id, left=True)
        batch["gen_attention_mask"] = _pad([[1] * len(r) for r in prompts], 0, left=True)
        batch["answers"] = [e.answer for e in examples]
    return batch


def split_train_val(
    records: Sequence[Conversation], val_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Split records into train and validation with a seeded shuffle; at least one record stays in train.

    Returns:
        ``(train, val)``; ``val`` is empty when ``val_fraction`` is 0.
    """
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(round(len(records) * val_fraction), len(records) - 1) if val_fraction > 0 else 0
    n_val = max(n_val, 1) if val_fraction > 0 and len(records) > 1 else n_val
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    return train, [records[i] for i in sorted(val_idx)]


class InstructionDataModule(L.LightningDataModule):
    """Instruction-tuning data from JSONL files, with the loss on the answer tokens only.

    Files hold ``{"prompt": ..., "response": ...}`` or ``{"messages": [...]}`` records (see
    ``lightning_lora.data.jsonl``); they are validated before training starts.

    Args:
        train_file: JSONL file of training records.
        val_file: JSONL file of validation records. If not given, ``val_fraction`` of ``train_file`` is held
            out. Default: None.
        val_fraction: Fraction of ``train_file`` held out for validation when ``val_file`` is not given
            (seeded split; 0 disables validation). Default: ``0.1``.
        tokenizer: Model alias or directory to load the tokenizer from; usually linked to the model.
            Default: None.
        max_length: Longest tokenised record; longer ones lose prompt tokens from the left. Default: ``256``.
        batch_size: Training batch size. Default: ``8``.
        eval_batch_size: Validation batch size (loss and generation). Default: ``16``.
        num_workers: DataLoader worker processes. Default: ``0``.
        seed: Seed of the train/val split and of the training shuffle. Default: ``0``.
        use_chat_template: Render prompts with the tokenizer's chat template; None uses it when the tokenizer
            has one. Default: None.
        max_eval_samples: Keep at most this many validation records (first ones), to bound the cost of
            generation. Default: None (all).
        replay: Replay data mixed into each training epoch against forgetting: a JSONL instruction file, or
            ``"self"`` (the base model's own answers to general prompts, generated once and cached; see
            :mod:`lightning_lora.data.replay`). Default: None (no replay).
        replay_ratio: Share of replay examples in each training epoch, in [0, 1); drawn anew each epoch, seeded.
            The realised ratio (after rounding) is logged and kept in ``replay_report``. Default: ``0.1``.
        packing: Train on packed batches: each batch's rows concatenated into one sequence with position ids
            restarting per row and no attention mask (transformers' padding-free convention), so no padding is
            computed; same rows per step and same loss as unpacked. The model must support it (Llama-family
            models in transformers do; the built-in module passes ``use_cache=False``, without which rows would
            attend to each other). Validation stays unpacked. Default: False.

    Example:
        >>> dm = InstructionDataModule("examples/data/dates/train.jsonl", "examples/data/dates/val.jsonl",
        ...                            tokenizer="smollm2-135m-instruct")  # doctest: +SKIP
        >>> dm.setup("fit"); batch = next(iter(dm.val_dataloader()))  # doctest: +SKIP
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        val_fraction: float = 0.1,
        tokenizer: str | None = None,
        max_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        use_chat_template: bool | None = None,
        max_eval_samples: int | None = None,
        replay: str | None = None,
        replay_ratio: float = 0.1,
        packing: bool = False,
    ) -> None:
        super().__init__()
        _validate_args(val_fraction, max_length, batch_size, eval_batch_size, num_workers, max_eval_samples)
        _validate_replay(replay, replay_ratio)
        self.replay, self.replay_ratio = replay, replay_ratio
        self.replay_examples: list[TokenizedExample] = []
        self.replay_report: dict[str, float] | None = None
        self.save_hyperparameters()
        self.train_file, self.val_file, self.val_fraction = train_file, val_file, val_fraction
        self.tokenizer_name, self.use_chat_template = tokenizer, use_chat_template
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.num_workers, self.seed, self.max_eval_samples = num_workers, seed, max_eval_samples
        self.packing = packing
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_records: list[Conversation] | None = None
        self.val_records: list[Conversation] = []
        self.train_examples: list[TokenizedExample] = []
        self.val_examples: list[TokenizedExample] = []

    def prepare_data(self) -> None:
        """Validate the files and make the tokenizer available (converts the bundled model once, on rank 0)."""
        self._read_records()
        from lightning_lora.modules.loading import resolve_model_path

        resolve_model_path(self._require_tokenizer_name())

    def setup(self, stage: str | None = None) -> None:
        """Read, validate and tokenise the data (once). Raises ``DataFormatError`` on bad files."""
        if self.tokenizer is not None and self.train_examples:
            return  # already set up; Lightning may call setup once per stage
        self._read_records()
        if self.tokenizer is None:
            from lightning_lora.modules.loading import load_tokenizer

            self.tokenizer = load_tokenizer(self._require_tokenizer_name())
        self.train_examples = self._tokenize(self.train_records or [], "train")
        self.val_examples = self._tokenize(self.val_records, "val")
        if self.replay:
            self.replay_examples = self._tokenize(self._replay_records(), "replay")
        if self.train_examples:
            stats = self.padding_stats()
            log.info("training batches: %.1f%% of computed tokens are padding unpacked, %.1f%% packed (%s)",
                     100 * stats["unpacked"], 100 * stats["packed"], "packing on" if self.packing else "packing off")

    def padding_stats(self) -> dict[str, float]:
        """Fraction of padding among the tokens of the first epoch's training batches, unpacked and packed.

        Returns:
            ``{"unpacked": ..., "packed": ...}``, each in [0, 1) (packed is 0: packed batches have no padding).
        """
        order = list(torch.utils.data.RandomSampler(self.train_examples, generator=self._train_generator()))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        lengths = [len(e.input_ids) for e in self.train_examples]
        return {"unpacked": pad_fraction(lengths, batches, False), "packed": pad_fraction(lengths, batches, True)}

    def _train_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training batches: ``input_ids``, ``attention_mask``, ``labels``; packed:
        ``input_ids``, ``labels``, ``position_ids`` of shape ``(1, tokens in the batch)`` (see ``packing``)."""
        # Packed or not, the same sampler gives the same rows per batch; only the collation differs.
        if self.replay_examples and self.replay_ratio > 0:
            return self._replay_loader()
        return self._loader(self.train_examples, self.batch_size, False, shuffle=True,
                            generator=self._train_generator(), packed=self.packing)

    def _replay_records(self) -> list[Conversation]:
        from lightning_lora.data.replay import self_replay_records

        if self.replay == "self":
            return self_replay_records(self._require_tokenizer_name(), self._use_chat_template())
        return read_instruction_file(str(self.replay))

    def _replay_loader(self) -> DataLoader:
        from lightning_lora.data.replay import ReplaySampler

        sampler = ReplaySampler(len(self.train_examples), len(self.replay_examples), self.replay_ratio, self.seed)
        self.replay_report = {"task": len(self.train_examples), "replay_per_epoch": sampler.n_replay,
                              "pool": len(self.replay_examples), "ratio": sampler.realised_ratio}
        log.info("replay: %d of %d examples per epoch from a pool of %d (realised ratio %.4f, asked %.4f)",
                 sampler.n_replay, len(sampler), len(self.replay_examples), sampler.realised_ratio, self.replay_ratio)
        return self._loader(self.train_examples + self.replay_examples, self.batch_size, False, sampler=sampler,
                            packed=self.packing)

    def val_dataloader(self) -> DataLoader:
        """Validation batches: the training keys plus ``gen_input_ids``, ``gen_attention_mask``, ``answers``."""
        return self._loader(self.val_examples, self.eval_batch_size, True)

    def test_dataloader(self) -> DataLoader:
        """The held-out (validation) batches, for ``lightning-lora test``."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The held-out prompts, for ``lightning-lora predict`` (greedy answers next to the references)."""
        return self.val_dataloader()

    def eval_prompts(self) -> list[EvalPrompt]:
        """The validation prompts as text (chat template applied) with their answers; needs ``setup`` first."""
        if self.tokenizer is None:
            raise RuntimeError("call setup() before eval_prompts(): the tokenizer is not loaded yet")
        chat = self._use_chat_template()
        return [EvalPrompt(render_prompt(c, self.tokenizer, chat), c[-1]["content"]) for c in self.val_records]

    def _read_records(self) -> None:
        if self.train_records is not None:
            return
        records = read_instruction_file(self.train_file)
        if self.val_file:
            val = read_instruction_file(self.val_file)
        else:
            records, val = split_train_val(records, self.val_fraction, self.seed)
        self.train_records, self.val_records = records, val[: self.max_eval_samples]
        log.info("instruction data: %d train, %d val records", len(records), len(self.val_records))

    def _require_tokenizer_name(self) -> str:
        if not self.tokenizer_name:
            raise ValueError(
                "InstructionDataModule needs a tokenizer: pass tokenizer= (CLI: --data.tokenizer), usually the "
                "same model alias or directory as the model"
            )
        return self.tokenizer_name

    def _use_chat_template(self) -> bool:
        available = has_chat_template(self.tokenizer)
        if self.use_chat_template and not available:
            raise ValueError(
                f"use_chat_template=True but the tokenizer {self.tokenizer_name!r} has no chat template; "
                "set use_chat_template to false, or to null to use one only when present"
            )
        return available if self.use_chat_template is None else self.use_chat_template

    def _tokenize(self, records: list[Conversation], split: str) -> list[TokenizedExample]:
        chat = self._use_chat_template()
        examples = [tokenize_conversation(r, self.tokenizer, self.max_length, chat) for r in records]
        truncated = sum(e.truncated for e in examples)
        if truncated:
            log.warning(
                "%d of %d %s records are longer than max_length=%d tokens and were truncated; "
                "HINT: raise max_length (CLI: --data.max_length)", truncated, len(examples), split, self.max_length
            )
        return examples

    def _loader(
        self, examples: list[TokenizedExample], batch_size: int, with_generation: bool, packed: bool = False,
        **kwargs: Any,
    ) -> DataLoader:
        if self.tokenizer is None:
            raise RuntimeError("call setup() before asking for dataloaders: the data is not tokenised yet")
        collate = collate_packed if packed else functools.partial(
            collate_examples, pad_token_id=self.tokenizer.pad_token_id, with_generation=with_generation
        )
        return DataLoader(examples, batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate, **kwargs)


def _validate_replay(replay: str | None, ratio: float) -> None:
    from pathlib import Path

    if replay is not None and replay != "self" and not Path(replay).is_file():
        raise ValueError(f"replay={replay!r}: no such file; give a JSONL instruction file or 'self' (the base model's "
                         "own answers to general prompts).")
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"replay_ratio={ratio!r}: give a share in [0, 1), e.g. 0.1 for one replay example in ten.")


def _validate_args(
    val_fraction: float, max_length: int, batch_size: int, eval_batch_size: int, num_workers: int,
    max_eval_samples: int | None,
) -> None:  # fmt: skip
    problems = []
    if not 0 <= val_fraction < 1:
        problems.append(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    for name, value, low in (("max_length", max_length, 2), ("batch_size", batch_size, 1),
                             ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0)):  # fmt: skip
        if value < low:
            problems.append(f"{name} must be >= {low}, got {value!r}")
    if max_eval_samples is not None and max_eval_samples < 1:
        problems.append(f"max_eval_samples must be >= 1 or None, got {max_eval_samples!r}")
    if problems:
        raise ValueError("invalid InstructionDataModule arguments: " + "; ".join(problems))
