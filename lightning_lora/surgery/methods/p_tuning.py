"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens produced by a small trainable encoder.

Trainable: an embedding of ``num_virtual_tokens`` rows and an MLP (or bidirectional LSTM + MLP) over it, in
PEFT's ``PromptEncoder`` layout (``embedding``, ``mlp_head``, ``lstm_head``), so state dicts line up with PEFT's.
PEFT's file keeps only the encoder's *output* (``prompt_embeddings``); the encoder weights go to a sidecar file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor, nn

from lightning_lora.surgery.errors import ConfigError, PTuningConfigError
from lightning_lora.surgery.lora.config import ConfigDict
from lightning_lora.surgery.methods._common import ModelDims, one_of, positive_int, raise_problems

Encoder = Literal["mlp", "lstm"]


@dataclass(frozen=True, eq=True)
class PTuningConfig(ConfigDict):
    """P-tuning: ``num_virtual_tokens`` virtual tokens computed by a trainable encoder, prepended to every input.

    Not mergeable (extra tokens). For inference only the encoder's output matters (PEFT's file stores just that).

    Args:
        num_virtual_tokens: How many virtual tokens. Default: 20.
        encoder: ``"mlp"`` (three Linear layers with ReLU) or ``"lstm"`` (a bidirectional LSTM then a two-layer
            MLP), as in PEFT. Default: ``"mlp"``.
        encoder_hidden_size: Hidden width of the encoder. Default: None (the model's hidden size, PEFT's default).
        encoder_num_layers: LSTM layers (``encoder="lstm"`` only). Default: 2.
        encoder_dropout: LSTM dropout between layers, in [0, 1). Default: 0.0.
    """

    num_virtual_tokens: int = 20
    encoder: Encoder = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    error_type: ClassVar[type[ConfigError]] = PTuningConfigError
    method: ClassVar[str] = "P-tuning"
    merge_refusal: ClassVar[str] = "its virtual tokens are extra input positions, not a change of any weight"

    def __post_init__(self) -> None:
        problems = positive_int("num_virtual_tokens", self.num_virtual_tokens, "20")
        problems += one_of("encoder", self.encoder, ("mlp", "lstm"))
        if self.encoder_hidden_size is not None:
            problems += positive_int("encoder_hidden_size", self.encoder_hidden_size, "128")
        problems += positive_int("encoder_num_layers", self.encoder_num_layers, "2")
        if not isinstance(self.encoder_dropout, (int, float)) or not 0.0 <= self.encoder_dropout < 1.0:
            problems.append(f"encoder_dropout={self.encoder_dropout!r}: must be in [0, 1), e.g. 0.1.")
        raise_problems(PTuningConfigError, "PTuningConfig", problems)

    def __hash__(self) -> int:
        return hash(repr(self))

    def hidden_size(self, dims: ModelDims) -> int:
        """The encoder's hidden width on a model with these dimensions."""
        return self.encoder_hidden_size or dims.hidden

    def num_parameters(self, dims: ModelDims) -> int:
        """Trainable parameters on a model with these dimensions."""
        return sum(p.numel() for p in PromptEncoder(self, dims).parameters())


class PromptEncoder(nn.Module):
    """Embedding ``(n, hidden)`` -> encoder -> virtual tokens ``(n, hidden)`` (PEFT's layout and maths)."""

    def __init__(self, config: PTuningConfig, dims: ModelDims) -> None:
        super().__init__()
        d, h = dims.hidden, config.hidden_size(dims)
        self.encoder = config.encoder
        self.embedding = nn.Embedding(config.num_virtual_tokens, d)
        if config.encoder == "lstm":
            self.lstm_head = nn.LSTM(input_size=d, hidden_size=h, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def prompts(self) -> Tensor:
        """The virtual tokens, ``(n, hidden)``."""
        x = self.embedding.weight  # (n, hidden)
        if self.encoder == "lstm":
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)  # (1, n, hidden) -> (n, 2h)
        return self.mlp_head(x)  # -> (n, hidden)

    def peft_embeddings(self) -> Tensor:
        """What PEFT's file stores as ``prompt_embeddings``: the encoder's output."""
        return self.prompts()
