"""LightningCLI with LoRA: ``lora``, ``quantize`` and ``lora_module`` options next to the usual trainer/model/data.

The LoRA surgery is added as a :class:`~lightning_lora.callbacks.LoRAFinetuning` callback, so it runs in
``setup`` / right after ``configure_model``, before the optimizer exists. The CLI's automatic optimizer is off:
it would be built from ``model.parameters()`` before the surgery and miss every adapter. The built-in module takes
its optimizer as ``model.optimizer`` and builds it over the trainable parameters instead.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_lora.data.instruction import InstructionDataModule
from lightning_lora.modules.causal_lm import CausalLMModule
from lightning_lora.surgery.lora.config import LoRAConfig
from lightning_lora.surgery.training.sharding import ShardConfig

log = logging.getLogger(__name__)


def _quant_config_type() -> Any | None:
    try:
        from lightning_lora.surgery.quant.config import QuantConfig
    except ImportError:  # pragma: no cover - QLoRA support is part of the package; kept optional for slim installs
        return None
    return QuantConfig


class LoRACLI(LightningCLI):
    """``lightning-lora fit|validate|test|predict`` with LoRA options. See ``lightning-lora fit --help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", CausalLMModule)
        kwargs.setdefault("datamodule_class", InstructionDataModule)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--lora.*``, ``--quantize.*``, ``--lora_module``, ``--adapter_only_checkpoints`` and ``--shard.*``."""
        parser.add_argument("--lora", type=Optional[LoRAConfig], default=LoRAConfig(),
                            help="LoRA settings (null for no LoRA, e.g. full fine-tuning or layer freezing).")
        quant = _quant_config_type()
        if quant is not None:
            parser.add_argument("--quantize", type=Optional[quant], default=None,
                                help="4-bit quantization of the base before LoRA (QLoRA); null for none.")
        parser.add_argument("--lora_module", type=Optional[str], default="model",
                            help="Attribute path of the submodule to adapt inside the LightningModule.")
        parser.add_argument("--adapter_only_checkpoints", type=bool, default=True,
                            help="Checkpoints hold only trainable tensors, optimizer state and the LoRA config.")
        parser.add_argument("--shard", type=Optional[ShardConfig], default=None,
                            help="FSDP2 sharding options under ModelParallelStrategy (blocks, reshard_after_forward, "
                                 "cpu_offload, param_dtype, reduce_dtype); ignored under other strategies.")
        parser.link_arguments("model.model", "data.tokenizer")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the Trainer, then put the LoRA callback first so it runs before the others' setup."""
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        lora, quantize = config.get("lora"), config.get("quantize")
        if lora is not None or quantize is not None:
            from lightning_lora.callbacks import LoRAFinetuning

            callback = LoRAFinetuning(lora, quantize=quantize, module=config.get("lora_module"),
                                      adapter_only_checkpoints=config.get("adapter_only_checkpoints", True),
                                      shard=config.get("shard"))
            trainer.callbacks.insert(0, callback)
        return trainer

    def before_fit(self) -> None:
        """Log the LoRA and quantization settings with the hyperparameters."""
        config = self.config_init[self.subcommand]
        hparams: dict[str, Any] = {}
        if config.get("lora") is not None:
            hparams["lora"] = config["lora"].to_dict()
        if config.get("quantize") is not None:
            hparams["quantize"] = vars(config["quantize"]).copy()
        for logger in self.trainer.loggers:
            logger.log_hyperparams(hparams)
