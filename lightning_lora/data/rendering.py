"""Turning a conversation into the prompt text a model sees and the completion it must learn."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_lora.data.jsonl import Conversation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def render_prompt(messages: Conversation, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool) -> str:
    """Render the prompt part of a conversation (all messages but the answer) as text.

    Args:
        messages: The whole conversation; its last message (the answer) is left out.
        tokenizer: Supplies the chat template.
        use_chat_template: Apply the chat template with its generation prompt; else join the contents with
            blank lines and end with a newline.
    """
    context = [dict(m) for m in messages[:-1]]
    if use_chat_template:
        return tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in context) + "\n"


def render_completion(messages: Conversation, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool) -> str:
    """Render what the model must learn to produce after the prompt: the answer and the end of its turn.

    With a chat template this is the full rendering minus the prompt rendering, so it includes the
    template's end-of-turn text (e.g. ``"2021-03-03<|im_end|>\\n"``). Without one it is the bare answer; the
    EOS token id is appended by :func:`tokenize_conversation`.

    Raises:
        ValueError: If the template does not render the prompt as a prefix of the whole conversation.
    """
    if not use_chat_template:
        return messages[-1]["content"]
    prompt = render_prompt(messages, tokenizer, True)
    full = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the tokenizer's chat template does not render the prompt (with add_generation_prompt=True) as a "
            f"prefix of the whole conversation, so the answer cannot be isolated: prompt={prompt[-80:]!r}, "
            f"full={full[-120:]!r}. Set use_chat_template to false, or fix the template"
        )
    return full[len(prompt) :]
