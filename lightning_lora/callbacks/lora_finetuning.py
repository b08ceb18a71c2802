"""``LoRAFinetuning``: the LoRA form of :class:`~lightning_lora.callbacks.PEFTFinetuning` (same hooks, same checkpoints).

Kept for its LoRA-specific signature (``config`` defaults to ``LoRAConfig()`` and accepts a dict of its fields) and
for checkpoints written under its name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_lora.callbacks.peft_finetuning import PEFTFinetuning
from lightning_lora.surgery.lora.apply import DEFAULT_ADAPTER
from lightning_lora.surgery.lora.config import LoRAConfig
from lightning_lora.surgery.quant.config import QuantConfig
from lightning_lora.surgery.training.sharding import ShardConfig


class LoRAFinetuning(PEFTFinetuning):
    """Fine-tune a LightningModule with LoRA: wrap the target layers, freeze the rest, keep checkpoints small.

    The module's ``configure_optimizers`` must build its optimizer from the parameters that require grad, e.g.
    ``AdamW(p for p in self.parameters() if p.requires_grad)``; it runs after the surgery. At fit start an
    optimizer that misses an adapter is an error (never a silent no-op).

    Resuming: ``trainer.fit(module, ckpt_path=...)`` with a freshly built module and the same callback resumes
    exactly. Loading an adapter-only checkpoint outside a Trainer: ``LightningModule.load_from_checkpoint`` builds a
    module without adapters and cannot load it; use :meth:`load_checkpoint` instead::

        callback = LoRAFinetuning.from_checkpoint("last.ckpt")  # the LoRA settings stored in the checkpoint
        module = callback.load_checkpoint(MyModule(), "last.ckpt")

    Args:
        config: What to adapt and how (in YAML: a nested mapping of :class:`LoRAConfig` fields).
            Default: ``LoRAConfig()`` (q_proj and v_proj, r=16).
        quantize: Quantize the target's base layers to 4 bit before the LoRA surgery (QLoRA), with
            ``lightning_lora.surgery.quant.quantize.quantize_model``. Default: None (no quantization).
        module: Attribute path of the network inside the LightningModule to adapt, e.g. ``"model"``.
            Parameters outside it are frozen too. Default: None (the LightningModule itself).
        adapter_only_checkpoints: Checkpoints hold only the trainable tensors (adapters, ``modules_to_save``),
            optimizer and scheduler states, the LoRA settings and a fingerprint of the base model. Default: True.
        adapter_name: Name of the adapter. Default: ``"default"``.

    Example:
        >>> import lightning as L
        >>> from lightning_lora import LoRAConfig
        >>> trainer = L.Trainer(callbacks=[LoRAFinetuning(LoRAConfig(r=8, targets="all-linear"), module="model")])
    """

    def __init__(self, config: LoRAConfig | None = None, *, quantize: QuantConfig | None = None,
                 module: str | None = None, adapter_only_checkpoints: bool = True,
                 adapter_name: str = DEFAULT_ADAPTER,
                 shard: ShardConfig | str | Callable[[str, torch.nn.Module], bool] | None = None) -> None:
        if isinstance(config, dict):
            config = LoRAConfig.from_dict(config)
        if config is not None and not isinstance(config, LoRAConfig):
            raise TypeError(f"config={config!r}: expected a LoRAConfig (or a dict of its fields), or None for the "
                            "defaults. HINT: for the other methods use PEFTFinetuning(config).")
        super().__init__(config if config is not None else LoRAConfig(), quantize=quantize, module=module,
                         adapter_only_checkpoints=adapter_only_checkpoints, adapter_name=adapter_name, shard=shard)
