"""Prefix tuning (Li & Liang 2021): trainable key / value prefixes in every attention block.

Each block's attention sees ``num_virtual_tokens`` extra keys and values in front of the real ones (they are put
into the KV cache before the forward, as PEFT does; they get no rotary position). Optionally the prefixes are
computed by a two-layer projection (Linear -> tanh -> Linear) from a smaller embedding, which eases optimisation.
The flat layout ``(n, num_layers * 2 * kv_dim)`` is PEFT's, so a PEFT file's ``prompt_embeddings`` is this tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from lightning_lora.surgery.errors import ConfigError, PrefixTuningConfigError
from lightning_lora.surgery.lora.config import ConfigDict
from lightning_lora.surgery.methods._common import ModelDims, positive_int, raise_problems


@dataclass(frozen=True, eq=True)
class PrefixTuningConfig(ConfigDict):
    """Prefix tuning: ``num_virtual_tokens`` trainable keys and values in front of every block's attention.

    Not mergeable (the prefixes are extra attention positions, not a weight change). Refused together with
    gradient checkpointing (transformers drops the cache inside checkpointed blocks).

    Args:
        num_virtual_tokens: Prefix length. Default: 20.
        projection: Compute the prefixes with a Linear -> tanh -> Linear projection from an embedding of width
            ``kv_dim`` (PEFT's ``prefix_projection``); only its output is kept in PEFT's file. Default: False.
        projection_hidden_size: Hidden width of that projection (``projection=True`` only). Default: None (the
            model's hidden size).
    """

    num_virtual_tokens: int = 20
    projection: bool = False
    projection_hidden_size: int | None = None

    error_type: ClassVar[type[ConfigError]] = PrefixTuningConfigError
    method: ClassVar[str] = "prefix tuning"
    merge_refusal: ClassVar[str] = "its prefixes are extra attention keys and values, not a change of any weight"

    def __post_init__(self) -> None:
        problems = positive_int("num_virtual_tokens", self.num_virtual_tokens, "20")
        if not isinstance(self.projection, bool):
            problems.append(f"projection={self.projection!r}: must be true or false.")
        if self.projection_hidden_size is not None:
            problems += positive_int("projection_hidden_size", self.projection_hidden_size, "512")
            if self.projection is False:
                problems.append(f"projection_hidden_size={self.projection_hidden_size!r} is only used with "
                                "projection=True; set projection=True or drop projection_hidden_size.")
        raise_problems(PrefixTuningConfigError, "PrefixTuningConfig", problems)

    def __hash__(self) -> int:
        return hash(repr(self))

    def num_parameters(self, dims: ModelDims) -> int:
        """Trainable parameters on a model with these dimensions."""
        return sum(p.numel() for p in PrefixEncoder(self, dims).parameters())


class PrefixEncoder(nn.Module):
    """The prefixes of one adapter, flat: ``(n, num_layers * 2 * kv_dim)`` (PEFT's ``PrefixEncoder`` layout)."""

    def __init__(self, config: PrefixTuningConfig, dims: ModelDims) -> None:
        super().__init__()
        self.dims = dims
        flat = dims.num_layers * 2 * dims.kv_dim
        if config.projection:
            hidden = config.projection_hidden_size or dims.hidden
            self.embedding = nn.Embedding(config.num_virtual_tokens, dims.kv_dim)
            self.transform = nn.Sequential(nn.Linear(dims.kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, flat))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, flat)
            self.transform = None

    def flat(self) -> Tensor:
        """``(n, num_layers * 2 * kv_dim)``."""
        x = self.embedding.weight
        return self.transform(x) if self.transform is not None else x

    def key_values(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        """Per block, the key and value prefix, each ``(batch, kv_heads, n, head_dim)`` (PEFT's ``get_prompt``)."""
        d = self.dims
        x = self.flat()
        n = x.shape[0]
        x = x.view(n, d.num_layers * 2, d.kv_heads, d.head_dim)  # (n, L*2*kv) -> (n, 2L, kvh, hd)
        x = x.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # -> (2L, B, kvh, n, hd)
        return [(x[2 * i], x[2 * i + 1]) for i in range(d.num_layers)]

    def peft_embeddings(self) -> Tensor:
        """What PEFT's file stores as ``prompt_embeddings``: the flat prefixes (the projection's output)."""
        return self.flat()
