"""LightningCLI with LoRA: ``lora``, ``quantize`` and ``lora_module`` options next to the usual trainer/model/data.

Adapter health checks (:class:`~lightning_lora.callbacks.AdapterHealth`) are on by default (``--health null`` turns
them off): a non-finite loss or adapter gradient stops the run naming the step.
``peft`` selects any other method by class path (``peft: {class_path: lightning_lora.PrefixTuningConfig,
init_args: {...}}``) and replaces ``lora``; setting both is an error.

The LoRA surgery is added as a :class:`~lightning_lora.callbacks.LoRAFinetuning` callback, so it runs in
``setup`` / right after ``configure_model``, before the optimizer exists. The CLI's automatic optimizer is off:
it would be built from ``model.parameters()`` before the surgery and miss every adapter. The built-in module takes
its optimizer as ``model.optimizer`` and builds it over the trainable parameters instead.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any, Optional

from jsonargparse import lazy_instance
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_lora.callbacks.adapter_health import AdapterHealth
from lightning_lora.cli.errors import CommandLineError
from lightning_lora.cli.parsing import ShortErrors, flat_keys_help, use_flat_config_keys
from lightning_lora.data.instruction import InstructionDataModule
from lightning_lora.modules.causal_lm import CausalLMModule
from lightning_lora.surgery.errors import TargetMatchError
from lightning_lora.surgery.lora.config import LoRAConfig
from lightning_lora.surgery.methods.apply import PEFTConfig
from lightning_lora.surgery.training.sharding import ShardConfig

log = logging.getLogger(__name__)
use_flat_config_keys()


class LoRAArgumentParser(ShortErrors, LightningArgumentParser):
    """LightningCLI's parser with one-or-two-line errors (see :mod:`lightning_lora.cli.errors`)."""


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
        kwargs.setdefault("parser_class", LoRAArgumentParser)
        kwargs.setdefault("parser_kwargs", {"prog": "lightning-lora"})
        from lightning_lora.cli.quiet import (
            quiet_known_noise,
            quiet_progress_bars_when_logging,
        )

        quiet_known_noise()
        quiet_progress_bars_when_logging()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--lora.*``, ``--quantize.*``, ``--lora_module``, ``--adapter_only_checkpoints`` and ``--shard.*``."""
        parser.add_argument("--lora", type=Optional[LoRAConfig], default=LoRAConfig(),
                            help="LoRA settings, or null for none (full fine-tuning, layer freezing). Keys: "
                                 f"{flat_keys_help('lora', LoRAConfig)}. `--lora.help LoRAConfig` explains each key.")
        parser.add_argument("--peft", type=Optional[PEFTConfig], default=None,
                            help="Another method instead of `lora`, by class path: lightning_lora.PromptTuningConfig, "
                                 "PTuningConfig, PrefixTuningConfig or BottleneckConfig (or LoRAConfig), with init_args.")
        quant = _quant_config_type()
        if quant is not None:
            parser.add_argument("--quantize", type=Optional[quant], default=None,
                                help="4-bit quantization of the base before LoRA (QLoRA); null for none. Keys: "
                                     f"{flat_keys_help('quantize', quant)}. `--quantize.help QuantConfig` explains each key.")
        parser.add_argument("--lora_module", type=Optional[str], default="model",
                            help="Attribute path of the submodule to adapt inside the LightningModule.")
        parser.add_argument("--adapter_only_checkpoints", type=bool, default=True,
                            help="Checkpoints hold only trainable tensors, optimizer state and the LoRA config.")
        parser.add_argument("--health", type=Optional[AdapterHealth], default=lazy_instance(AdapterHealth),
                            help="Adapter health checks (AdapterHealth: optimizer, gradients, update size, non-finite "
                                 "stop); on by default, null to turn off, e.g. --health.on_nonfinite skip.")
        parser.add_argument("--shard", type=Optional[ShardConfig], default=None,
                            help="FSDP2 sharding options under ModelParallelStrategy (blocks, reshard_after_forward, "
                                 "cpu_offload, param_dtype, reduce_dtype); ignored under other strategies.")
        parser.link_arguments("model.model", "data.tokenizer")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (the console script passes its own ``argv`` here, so no "args and sys.argv" warning)."""
        self.config = parser.parse_args(args)

    def before_instantiate_classes(self) -> None:
        """Check the LoRA targets on the model built from its config on the meta device, before reading weights."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        lora, model = config.get("lora"), config.get("model")
        name = model.get("model") if model is not None and self.model_class is CausalLMModule else None
        if lora is None or not isinstance(name, str) or config.get("lora_module") != "model":
            return
        from lightning_lora.cli.plan import plan_for

        try:
            plan_for(name, LoRAConfig(**vars(lora)))
        except TargetMatchError as err:
            lines = [line for line in str(err).splitlines() if "plan_lora(" not in line]
            hint = f"See what targets select without loading weights: lightning-lora plan --model {name} --lora.targets ..."
            raise CommandLineError("\n".join([*lines, hint])) from err

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Add a readable progress bar (plain lines when stdout is not a terminal) and a model summary without FLOPs."""
        given = [*(config.get("callbacks") or []), *callbacks]
        extra: list[Callback] = []
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            from lightning_lora.callbacks.progress import (
                LineProgressBar,
                StepRichProgressBar,
            )

            extra.append(StepRichProgressBar() if sys.stdout.isatty() else LineProgressBar())
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in given):
            from lightning_lora.callbacks.progress import CompactModelSummary

            extra.append(CompactModelSummary())
        return super()._instantiate_trainer(config, [*callbacks, *extra])

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the Trainer, then put the LoRA callback first so it runs before the others' setup."""
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        lora, quantize, peft = config.get("lora"), config.get("quantize"), config.get("peft")
        options = dict(quantize=quantize, module=config.get("lora_module"),
                       adapter_only_checkpoints=config.get("adapter_only_checkpoints", True), shard=config.get("shard"))
        if peft is not None:
            from lightning_lora.callbacks import PEFTFinetuning

            _refuse_both(lora, peft)
            trainer.callbacks.insert(0, PEFTFinetuning(peft, **options))
        elif lora is not None or quantize is not None:
            from lightning_lora.callbacks import LoRAFinetuning

            trainer.callbacks.insert(0, LoRAFinetuning(lora, **options))
        health = config.get("health")
        if health is not None and not any(isinstance(cb, AdapterHealth) for cb in trainer.callbacks):
            trainer.callbacks.append(health)
        return trainer

    def before_fit(self) -> None:
        """Log the LoRA and quantization settings with the hyperparameters."""
        config = self.config_init[self.subcommand]
        hparams: dict[str, Any] = {}
        if config.get("peft") is not None:
            hparams["peft"] = {"class": type(config["peft"]).__name__, **config["peft"].to_dict()}
        elif config.get("lora") is not None:
            hparams["lora"] = config["lora"].to_dict()
        if config.get("quantize") is not None:
            hparams["quantize"] = vars(config["quantize"]).copy()
        for logger in self.trainer.loggers:
            logger.log_hyperparams(hparams)


def _refuse_both(lora: LoRAConfig | None, peft: Any) -> None:
    # `lora` has a default (LoRAConfig()), so only a lora section that differs from it counts as set.
    if lora is not None and lora != LoRAConfig():
        raise ValueError(
            f"Both `lora:` ({lora!r}) and `peft:` ({type(peft).__name__}) are set; one adapter method per run.\n"
            f"HINT: keep `peft:` and set `lora: null` (or delete the lora section) to train {type(peft).__name__}, "
            "or delete `peft:` to train LoRA."
        )


def _run(subcommand: str, argv: Sequence[str]) -> LoRACLI:
    return LoRACLI(args=[subcommand, *argv])


def fit_main(argv: Sequence[str]) -> LoRACLI:
    """``lightning-lora fit``: train."""
    return _run("fit", argv)


def validate_main(argv: Sequence[str]) -> LoRACLI:
    """``lightning-lora validate``."""
    return _run("validate", argv)


def test_main(argv: Sequence[str]) -> LoRACLI:
    """``lightning-lora test``."""
    return _run("test", argv)


def predict_main(argv: Sequence[str]) -> LoRACLI:
    """``lightning-lora predict``."""
    return _run("predict", argv)
