"""Instruction data: JSONL reading and validation, the data module, and the date-task generator."""

from lightning_lora.data.instruction import (
    IGNORE_INDEX,
    EvalPrompt,
    InstructionDataModule,
    TokenizedExample,
    collate_examples,
    has_chat_template,
    render_completion,
    render_prompt,
    split_train_val,
    tokenize_conversation,
)
from lightning_lora.data.jsonl import (
    Conversation,
    DataFileNotFoundError,
    DataFormatError,
    Message,
    check_record,
    read_instruction_file,
    to_conversation,
)

__all__ = [
    "IGNORE_INDEX",
    "Conversation",
    "DataFileNotFoundError",
    "DataFormatError",
    "EvalPrompt",
    "InstructionDataModule",
    "Message",
    "TokenizedExample",
    "check_record",
    "collate_examples",
    "has_chat_template",
    "read_instruction_file",
    "render_completion",
    "render_prompt",
    "split_train_val",
    "to_conversation",
    "tokenize_conversation",
]
