"""Tiny LightningModules and trainers shared by the callback tests (CPU, seeded, a few thousand parameters)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB = 64
SEQ = 9
BATCHES_PER_EPOCH = 4
BATCH = 4


class Block(nn.Module):
    """A transformer-ish block with the usual projection names (``q_proj``, ``v_proj``) and an MLP."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.q_proj(x)) * self.v_proj(x)  # (B, T, H)
        return x + self.mlp(self.norm(h))


class TinyNet(nn.Module):
    """Embedding -> ``layers.N`` blocks -> ``head``."""

    def __init__(self, hidden: int = 32, num_layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, hidden)
        self.layers = nn.ModuleList([Block(hidden) for _ in range(num_layers)])
        self.head = nn.Linear(hidden, VOCAB)
        torch.random.set_rng_state(generator_state)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        return self.head(x)  # (B, T, V)


def token_data(n: int = BATCHES_PER_EPOCH * BATCH, seed: int = 1234, vocab: int = VOCAB) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, vocab, (n, SEQ), generator=generator))


class ResumableLoader:
    """Fixed batches whose position Lightning saves in checkpoints (it checkpoints loaders with ``state_dict``).

    A plain DataLoader restarts its epoch on a mid-epoch resume (Lightning issues #19617, #19815), which has
    nothing to do with LoRA; this loader lets the tests resume at any step.
    """

    def __init__(self, dataset: TensorDataset, batch_size: int) -> None:
        ids = dataset.tensors[0]
        self.batches = [[ids[i : i + batch_size]] for i in range(0, len(ids), batch_size)]
        self.start = self.pos = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        start, self.start = self.start, 0
        for i in range(start, len(self.batches)):
            self.pos = i + 1
            yield self.batches[i]

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = state["pos"] % len(self.batches)


class TinyModule(L.LightningModule):
    """Next-token prediction with :class:`TinyNet` as ``self.model``.

    Args:
        build_in: ``"init"`` builds the network in ``__init__``; ``"configure_model"`` builds it there.
        scheduler: Add a per-step LambdaLR scheduler.
        optimizer_params: ``"trainable"`` (the right way), ``"all"`` (all parameters, frozen ones included), or
            ``"captured"`` (parameters captured in ``__init__``, before any surgery: LightningCLI's automatic optimizer).
        resumable: Serve batches from a :class:`ResumableLoader` (exact mid-epoch resume) instead of a DataLoader.
    """

    def __init__(self, hidden: int = 32, num_layers: int = 2, seed: int = 0, lr: float = 0.05, build_in: str = "init",
                 scheduler: bool = False, optimizer_params: str = "trainable", resumable: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: TinyNet | None = TinyNet(hidden, num_layers, seed) if build_in == "init" else None
        if optimizer_params == "captured":
            self._captured = torch.optim.AdamW(self.model.parameters(), lr=lr)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = TinyNet(self.hparams.hidden, self.hparams.num_layers, self.hparams.seed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids = batch[0]
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def configure_optimizers(self) -> Any:
        mode = self.hparams.optimizer_params
        if mode == "captured":
            return self._captured
        params = self.parameters() if mode == "all" else [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr)
        if not self.hparams.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> DataLoader | ResumableLoader:
        if self.hparams.resumable:
            return ResumableLoader(token_data(), BATCH)
        return DataLoader(token_data(), batch_size=BATCH, shuffle=False)


class TinyLlamaModule(L.LightningModule):
    """A tiny transformers Llama (hidden 32, 2 layers) as ``self.model``, causal-LM loss on random tokens."""

    def __init__(self, seed: int = 0, lr: float = 0.01) -> None:
        super().__init__()
        from tests.factories import tiny_llama

        self.model = tiny_llama(num_layers=2, seed=seed).train()
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(token_data(vocab=128), batch_size=BATCH)


def trainer(tmp_path: Any, callbacks: list, **kwargs: Any) -> L.Trainer:
    """A quiet CPU Trainer; checkpointing off unless asked."""
    options: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                                   max_steps=2, num_sanity_val_steps=0)
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def adapter_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA factor of the module, detached copies, by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n}
