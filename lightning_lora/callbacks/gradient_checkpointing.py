"""``GradientCheckpointing``: activation checkpointing on the transformer blocks, composable with LoRA."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lora.callbacks._model_ready import CHECKPOINTING, forget, target_module, when_model_ready
from lightning_lora.surgery.training.activation_checkpointing import enable_activation_checkpointing


class GradientCheckpointing(Callback):
    """Recompute the blocks' activations in the backward pass instead of storing them (less memory, ~30% more time).

    Transformers models are switched through their own API; any other model has the forward of each matched block
    wrapped in ``torch.utils.checkpoint.checkpoint`` (the module tree and state-dict keys are unchanged). It runs
    right after ``configure_model`` and after the LoRA surgery, whatever the order of the callbacks.

    Args:
        blocks: Which blocks: a container name (``"layers"`` wraps every child of ``...layers``) or
            ``"re:<regex>"`` full-matching block paths. Default: None (the transformers API when the target holds a
            transformers model, else the numbered blocks ``layers.N`` / ``h.N`` / ``layer.N`` / ``blocks.N``).
        module: Attribute path of the network inside the LightningModule. Default: None (the LightningModule).
        use_reentrant: Reentrant checkpointing (the older PyTorch implementation). Input gradients are then switched
            on so that adapters behind a frozen embedding still get gradients. Default: False (non-reentrant).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[GradientCheckpointing(blocks="layers")])
    """

    def __init__(self, blocks: str | None = None, *, module: str | None = None, use_reentrant: bool = False) -> None:
        self.blocks = blocks
        self.module = module
        self.use_reentrant = use_reentrant
        self.checkpointed: list[str] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(blocks=self.blocks, module=self.module)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        when_model_ready(pl_module, self.state_key, CHECKPOINTING, self.apply)

    def apply(self, pl_module: pl.LightningModule) -> list[str]:
        """Enable checkpointing on the target now (idempotent); returns the checkpointed block paths."""
        target = target_module(pl_module, self.module)
        self.checkpointed = enable_activation_checkpointing(target, blocks=self.blocks, use_reentrant=self.use_reentrant)
        kind = "reentrant" if self.use_reentrant else "non-reentrant"
        rank_zero_info(f"Activation checkpointing ({kind}) on {len(self.checkpointed)} blocks"
                       + (f": {self.checkpointed[0]} ... {self.checkpointed[-1]}" if self.checkpointed else ""))
        return self.checkpointed

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        forget(pl_module, self.state_key)
