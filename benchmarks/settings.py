"""What each mode measures: the model, the batch, the repeats and the groups of workers run in lockstep.

A *group* is a set of worker processes that the parent steps round-robin (alternating the order every round), so
that the rows compared inside it (ours vs PEFT, LoRA vs full fine-tuning vs the frozen floor) share one time window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Impl = Literal["ours", "peft", "none"]

# The random-init Llama of ENVIRONMENT.md's PEFT table: hidden 512, 8 layers, 8 heads, MLP 1376, vocab 8192
# (untied) = 33,694,208 parameters. (A vocab of 32000 would give 58M; 8192 is what reproduces the 33.7M.)
LLAMA_33M: dict[str, Any] = dict(
    hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1376,
    vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=False,
)
LLAMA_TINY: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
    vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False,
)

# LoRA hyper-parameters shared by every row (ENVIRONMENT.md's table uses r=16).
LORA: dict[str, Any] = dict(r=16, alpha=32, dropout=0.0)

# Training variants: name -> (LoRA targets or None, gradient checkpointing, 4-bit base).
VARIANTS: dict[str, tuple[list[str] | str | None, bool, bool]] = {
    "full": (None, False, False),
    "floor": (None, False, False),
    "lora_qv": (["q_proj", "v_proj"], False, False),
    "lora_all": ("all-linear", False, False),
    "lora_qv_gc": (["q_proj", "v_proj"], True, False),
    "qlora_qv": (["q_proj", "v_proj"], False, True),
}

VARIANT_LABELS: dict[str, str] = {
    "full": "full fine-tuning (reference)",
    "floor": "floor: all weights frozen, grad through every block",
    "lora_qv": "LoRA r16 q_proj,v_proj",
    "lora_all": "LoRA r16 all-linear",
    "lora_qv_gc": "LoRA r16 q,v + grad checkpointing (non-reentrant)",
    "qlora_qv": "QLoRA r16 q,v (NF4 + double quant, fp32 compute)",
}


@dataclass(frozen=True)
class Worker:
    """One worker process: an implementation and what it builds."""

    impl: Impl
    variant: str  # a VARIANTS key for training groups, "infer" for inference groups

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.impl}"


@dataclass(frozen=True)
class Group:
    """Workers stepped in lockstep; ``kind`` is ``"train"`` (one runner, the step) or ``"infer"`` (several)."""

    name: str
    kind: Literal["train", "infer"]
    workers: tuple[Worker, ...]
    model: str  # a key of Mode.models


@dataclass(frozen=True)
class ModelSpec:
    """Where the base model comes from: a seeded random Llama config, or the bundled SmolLM2."""

    label: str
    source: Literal["random", "smollm2"]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Mode:
    """Everything one ``--quick`` / ``--full`` / ``--smoke`` run does."""

    name: str
    batch: tuple[int, int]
    repeats: int
    warmup: int
    steps_per_repeat: int
    infer_repeats: int
    import_repeats: int
    models: dict[str, ModelSpec]
    groups: tuple[Group, ...]
    run_mixed_batch: bool = False
    extra_rounds: int = 0  # rounds allowed beyond `repeats` to replace rounds disturbed by other processes


def _pair(variant: str) -> tuple[Worker, Worker]:
    return Worker("ours", variant), Worker("peft", variant)


def _train_groups(model: str, prefix: str = "") -> tuple[Group, ...]:
    return (
        Group(f"{prefix}qv", "train", (Worker("none", "full"), Worker("none", "floor"), *_pair("lora_qv")), model),
        Group(f"{prefix}all-linear", "train", _pair("lora_all"), model),
        Group(f"{prefix}gc", "train", _pair("lora_qv_gc"), model),
        Group(f"{prefix}infer", "infer", _pair("infer"), model),
        Group(f"{prefix}qlora", "train", _pair("qlora_qv"), model),
    )


QUICK = Mode(
    name="quick", batch=(8, 128), repeats=5, warmup=1, steps_per_repeat=1, infer_repeats=5, import_repeats=5,
    models={"llama33m": ModelSpec("random Llama 33.7M", "random", LLAMA_33M)},
    groups=_train_groups("llama33m"), run_mixed_batch=True, extra_rounds=3,
)

FULL = Mode(
    name="full", batch=(8, 128), repeats=7, warmup=1, steps_per_repeat=1, infer_repeats=7, import_repeats=7,
    models={"llama33m": ModelSpec("random Llama 33.7M", "random", LLAMA_33M),
            "smollm2": ModelSpec("SmolLM2-135M", "smollm2")},
    groups=_train_groups("llama33m") + _train_groups("smollm2", "smollm2-"), run_mixed_batch=True, extra_rounds=4,
)

SMOKE = Mode(
    name="smoke", batch=(2, 16), repeats=1, warmup=0, steps_per_repeat=1, infer_repeats=1, import_repeats=0,
    models={"tiny": ModelSpec("tiny random Llama", "random", LLAMA_TINY)},
    groups=(Group("qv", "train", _pair("lora_qv"), "tiny"),),
)

MODES: dict[str, Mode] = {m.name: m for m in (QUICK, FULL, SMOKE)}
