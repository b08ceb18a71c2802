"""``MultiAdapterEvaluation``: validate several adapters (and the bare base) on the same batches, side by side.

On each validation batch, after the module's own ``validation_step``, the callback runs the batch again once per
requested adapter (only that adapter active) and once with every adapter off, and accumulates each loss weighted
by its number of target tokens. At the end of the epoch it logs ``val_loss/<adapter>`` (and ``val_loss/base``).
The adapters that were active before are restored after every batch, also when a forward fails. The work lives in
:mod:`lightning_lora.surgery.lora.active` (:func:`use_adapters`, :func:`disable_adapters`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_lora.surgery.lora.active import check_adapter_names, disable_adapters, list_adapters, use_adapters
from lightning_lora.surgery.multi.mixed import BASE

LossFn = Callable[[pl.LightningModule, Any], "Tensor | tuple[Tensor, Tensor | int]"]


def causal_lm_loss(pl_module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
    """The default loss: ``pl_module(input_ids=, attention_mask=, labels=).loss`` and its number of target tokens.

    Fits :class:`~lightning_lora.modules.causal_lm.CausalLMModule` and any module whose forward takes these
    keywords and returns an output with ``.loss`` (Hugging Face causal LMs). The token count is
    ``(labels[:, 1:] != -100).sum()``, the tokens a shifted causal-LM loss averages over.

    Raises:
        TypeError: If the batch is not a mapping with ``input_ids`` and ``labels``.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
        raise TypeError("MultiAdapterEvaluation's default loss needs dict batches with 'input_ids' and 'labels'; got "
                        f"{type(batch).__name__}. HINT: pass loss_fn=lambda module, batch: <scalar loss tensor>.")
    output = pl_module(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
    loss = output.loss if hasattr(output, "loss") else output
    return loss, (batch["labels"][:, 1:] != -100).sum()


class MultiAdapterEvaluation(Callback):
    """Evaluate several adapters and the bare base model on the same validation batches; log ``<prefix>/<name>``.

    Args:
        adapters: Adapter names to evaluate, one at a time. Default: None (every adapter on the model).
        include_base: Also evaluate with every adapter off, logged as ``<prefix>/base``. Default: True.
        loss_fn: ``loss_fn(pl_module, batch)`` returning the batch's mean loss, or ``(mean loss, weight)``; the
            logged value is the weighted mean over the epoch. Default: :func:`causal_lm_loss` (weight = target
            tokens, so ``val_loss/<a>`` equals what ``CausalLMModule`` logs as ``val_loss`` with ``a`` active).
        prefix: Metric name prefix. Default: ``"val_loss"``.
        verbose: Print a side-by-side summary at the end of each validation. Default: False.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[MultiAdapterEvaluation(adapters=["legal", "medical"])])
    """

    def __init__(self, adapters: Sequence[str] | None = None, include_base: bool = True, loss_fn: LossFn | None = None,
                 prefix: str = "val_loss", verbose: bool = False) -> None:
        if isinstance(adapters, str):
            adapters = [adapters]
        if adapters is not None and (not adapters or not all(isinstance(a, str) and a for a in adapters)):
            raise ValueError(f"adapters={adapters!r}: give a non-empty list of adapter names, or None for all of them.")
        if adapters is not None and BASE in adapters:
            raise ValueError(f"adapters={adapters!r}: {BASE!r} is the bare base model; use include_base=True for it.")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix={prefix!r}: give a non-empty metric prefix, e.g. 'val_loss'.")
        self.adapters = list(adapters) if adapters is not None else None
        self.include_base = include_base
        self.loss_fn = loss_fn or causal_lm_loss
        self.prefix = prefix
        self.verbose = verbose
        self._sums: dict[str, list[Tensor]] = {}

    def _names(self, pl_module: pl.LightningModule) -> list[str]:
        names = self.adapters if self.adapters is not None else list_adapters(pl_module)
        check_adapter_names(pl_module, names, "MultiAdapterEvaluation")
        return names

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums = {}
        if not trainer.sanity_checking:
            self._names(pl_module)  # fail before the first batch on an unknown name

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
        with torch.no_grad():
            for name in self._names(pl_module):
                with use_adapters(pl_module, name):
                    self._accumulate(name, pl_module, batch)
            if self.include_base:
                with disable_adapters(pl_module):
                    self._accumulate(BASE, pl_module, batch)

    def _accumulate(self, name: str, pl_module: pl.LightningModule, batch: Any) -> None:
        result = self.loss_fn(pl_module, batch)
        loss, weight = result if isinstance(result, tuple) else (result, 1)
        weight = torch.as_tensor(weight, dtype=torch.float64, device=loss.device)
        total = self._sums.setdefault(name, [torch.zeros((), dtype=torch.float64, device=loss.device)] * 2)
        self._sums[name] = [total[0] + loss.detach().double() * weight, total[1] + weight]

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._sums:
            return
        means = {}
        for name, (loss_sum, weight) in self._sums.items():
            # Sum over processes before dividing, so the mean is weighted by every rank's tokens.
            loss_sum = trainer.strategy.reduce(loss_sum, reduce_op="sum")
            weight = trainer.strategy.reduce(weight, reduce_op="sum")
            means[name] = (loss_sum / weight.clamp(min=1e-12)).float()
            pl_module.log(f"{self.prefix}/{name}", means[name], sync_dist=True)  # equal on every rank already
        if self.verbose:
            rank_zero_info("  ".join(f"{self.prefix}/{n}={v.item():.4f}" for n, v in means.items()))
        self._sums = {}
