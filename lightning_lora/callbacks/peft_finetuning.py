"""``PEFTFinetuning``: any adapter method (LoRA, bottleneck, prompt / P- / prefix tuning; optionally on a 4-bit base)
applied to a LightningModule before its optimizer exists. ``LoRAFinetuning`` is its LoRA form.

Hooks, in Lightning 2.6's ``fit`` order:

* ``setup``: registers the surgery to run right after ``configure_model`` (see :mod:`._model_ready`), where the
  model exists whether the module builds it in ``__init__``, ``setup`` or ``configure_model``. The surgery
  fingerprints the base, quantizes (if asked), applies the adapter, freezes everything else and installs a load guard.
* checkpoint restore (resume): the load guard forgives missing frozen keys and refuses missing or mis-shaped adapter
  keys; ``load_state_dict`` of this callback then checks the base model's identity and the adapter settings.
* ``on_fit_start``: the optimizer exists; every trainable parameter must be in it.
* ``on_save_checkpoint``: drops the frozen base from the checkpoint (``adapter_only_checkpoints``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_lora.callbacks._checked_io import install_checked_io
from lightning_lora.callbacks._model_ready import IDENTITY, LORA, forget, target_module, when_model_ready
from lightning_lora.callbacks._sharding import SHARD_KEY, prepare_sharding, shard_config, uses_model_parallel
from lightning_lora.surgery.errors import CheckpointMismatchError, OptimizerSetupError, SurgeryError
from lightning_lora.surgery.lora.apply import DEFAULT_ADAPTER
from lightning_lora.surgery.lora.inventory import adapter_configs
from lightning_lora.surgery.lora.report import SurgeryReport
from lightning_lora.surgery.methods.apply import CONFIG_CLASSES, PEFTConfig, apply_peft, plan_peft
from lightning_lora.surgery.methods.prefix_tuning import PrefixTuningConfig
from lightning_lora.surgery.methods.virtual_tokens import refuse_checkpointing
from lightning_lora.surgery.quant.config import QuantConfig
from lightning_lora.surgery.training.adapter_checkpoint import (
    adapter_only_state_dict,
    config_differences,
    install_load_guard,
)
from lightning_lora.surgery.training.checkpoint_file import read_checkpoint
from lightning_lora.surgery.training.fingerprint import identity_differences, model_identity
from lightning_lora.surgery.training.freeze import frozen_in_optimizers, trainable_not_in_optimizers
from lightning_lora.surgery.training.sharded_loading import has_meta_parameters
from lightning_lora.surgery.training.sharding import ShardConfig, check_can_shard

_STATE_VERSION = 1




class PEFTFinetuning(Callback):
    """Fine-tune a LightningModule with an adapter of any method: attach it, freeze the rest, keep checkpoints small.

    The method is the config's type: :class:`~lightning_lora.LoRAConfig`, :class:`~lightning_lora.BottleneckConfig`,
    :class:`~lightning_lora.PromptTuningConfig`, :class:`~lightning_lora.PTuningConfig` or
    :class:`~lightning_lora.PrefixTuningConfig` (in YAML: ``class_path`` + ``init_args``). Everything else --
    checkpoints, resume, quantized bases -- is the same for every method.

    The module's ``configure_optimizers`` must build its optimizer from the parameters that require grad, e.g.
    ``AdamW(p for p in self.parameters() if p.requires_grad)``; it runs after the surgery. At fit start an
    optimizer that misses an adapter is an error (never a silent no-op).

    Resuming: ``trainer.fit(module, ckpt_path=...)`` with a freshly built module and the same callback resumes
    exactly. Loading an adapter-only checkpoint outside a Trainer: ``LightningModule.load_from_checkpoint`` builds a
    module without adapters and cannot load it; use :meth:`load_checkpoint` instead::

        callback = PEFTFinetuning.from_checkpoint("last.ckpt")  # the settings stored in the checkpoint
        module = callback.load_checkpoint(MyModule(), "last.ckpt")

    Args:
        config: The method and its settings (one of the configs above).
        quantize: Quantize the target's base layers to 4 bit before the surgery (QLoRA and its kin), with
            ``lightning_lora.surgery.quant.quantize.quantize_model``. Default: None (no quantization).
        module: Attribute path of the network inside the LightningModule to adapt, e.g. ``"model"``.
            Parameters outside it are frozen too. Default: None (the LightningModule itself).
        adapter_only_checkpoints: Checkpoints hold only the trainable tensors (adapters, ``modules_to_save``),
            optimizer and scheduler states, the adapter settings and a fingerprint of the base model. Default: True.
        adapter_name: Name of the adapter. Default: ``"default"``.
        shard: Under Lightning's ``ModelParallelStrategy`` (FSDP2), how the callback shards the model after the
            surgery: a :class:`~lightning_lora.surgery.training.sharding.ShardConfig`, the block class name (e.g.
            ``"LlamaDecoderLayer"``) or a policy ``(path, module) -> bool``. Each block becomes one FSDP unit, then the
            root. Do not shard in ``configure_model`` yourself. Ignored under other strategies. Default: None
            (``ShardConfig()``: the repeated blocks, e.g. ``LlamaDecoderLayer``).

    Example:
        >>> import lightning as L
        >>> from lightning_lora import PrefixTuningConfig
        >>> trainer = L.Trainer(callbacks=[PEFTFinetuning(PrefixTuningConfig(num_virtual_tokens=16), module="model")])
    """

    def __init__(self, config: PEFTConfig, *, quantize: QuantConfig | None = None,
                 module: str | None = None, adapter_only_checkpoints: bool = True,
                 adapter_name: str = DEFAULT_ADAPTER,
                 shard: ShardConfig | str | Callable[[str, torch.nn.Module], bool] | None = None) -> None:
        if isinstance(quantize, dict):
            quantize = QuantConfig(**quantize)
        if not isinstance(config, tuple(CONFIG_CLASSES.values())):
            raise TypeError(f"config={config!r}: expected one of {sorted(CONFIG_CLASSES)} (in YAML: class_path "
                            "lightning_lora.<Config> with init_args).")
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name={adapter_name!r}: give a non-empty name, e.g. 'default'.")
        self.config = config
        self.quantize = quantize
        self.module = module
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.adapter_name = adapter_name
        self.shard = shard_config(shard)
        self.report: SurgeryReport | None = None
        self.identity: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(adapter_name=self.adapter_name, module=self.module)

    # ------------------------------------------------------------------------------------------------ surgery
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        when_model_ready(pl_module, self.state_key, LORA, self.apply)
        when_model_ready(pl_module, f"{self.state_key}/identity", IDENTITY, self._identity_after_load)
        if uses_model_parallel(trainer):
            prepare_sharding(trainer, pl_module, self.module, self.shard, self.adapter_only_checkpoints)
        install_checked_io(trainer)  # a truncated ckpt_path is named as such, not `OSError: [Errno 22]`
        if self.adapter_only_checkpoints and any(isinstance(cb, ModelCheckpoint) and cb.save_weights_only
                                                 for cb in trainer.callbacks):
            rank_zero_warn("ModelCheckpoint(save_weights_only=True) skips callbacks' checkpoint hooks, so its checkpoints "
                           "hold the whole model and cannot be checked against the base on resume.\n"
                           "HINT: drop save_weights_only=True; adapter-only checkpoints are already small.")

    def apply(self, pl_module: torch.nn.Module) -> SurgeryReport | None:
        """Quantize (if asked) and attach the adapter to the target module now, freezing everything else; idempotent.

        Called by the Trainer right after ``configure_model``; call it yourself only outside a Trainer.

        Returns:
            The surgery report, or None if this adapter was already applied with the same config.

        Raises:
            SurgeryError: If an adapter of this name exists with another config.
            TargetMatchError, ConfigError: If the config does not fit the model (nothing is changed).
        """
        target = target_module(pl_module, self.module)
        existing = adapter_configs(target).get(self.adapter_name)
        if existing is not None:
            return self._check_existing(pl_module, target, existing)
        check_can_shard(pl_module)  # FSDP2 would not manage adapters added to an already sharded model
        if self.quantize is not None and has_meta_parameters(target):
            raise SurgeryError(f"{type(self).__name__}(quantize=...): the model's weights are on the meta device (not "
                               "loaded yet), and 4-bit quantization needs their values.\nHINT: load the model normally "
                               "(CausalLMModule(meta_init=False)) for QLoRA; shard it with quant_storage set to the "
                               "compute dtype.")
        # Of the base as built, before quantization and the adapter; a base on the meta device has no values yet: its
        # fingerprint is taken once its weights are loaded (_identity_after_load).
        self.identity = None if has_meta_parameters(target) else model_identity(target)
        if self.quantize is not None:
            from lightning_lora.surgery.quant.quantize import quantize_model

            plan_peft(target, self.config, name=self.adapter_name)  # a config that does not fit fails before quantizing
            quantize_model(target, self.quantize)
        self.report = apply_peft(target, self.config, name=self.adapter_name)
        _freeze_outside(pl_module, target)
        install_load_guard(pl_module, self.adapter_name)
        rank_zero_info(str(self.report))
        return self.report

    def _identity_after_load(self, pl_module: torch.nn.Module) -> None:
        if self.identity is None:
            self.identity = model_identity(target_module(pl_module, self.module))  # DTensors: collective, every rank

    @property
    def method(self) -> str:
        """The adapter method in words: ``"LoRA"``, ``"prefix tuning"``..."""
        return getattr(self.config, "method", "LoRA")

    def _check_existing(self, pl_module: torch.nn.Module, target: torch.nn.Module, existing: Any) -> None:
        differences = config_differences(_typed(existing), _typed(self.config))
        if differences:
            raise SurgeryError(
                f"The model already has a {self.method} adapter {self.adapter_name!r} with another config:\n  - "
                + "\n  - ".join(differences).replace("this run", type(self).__name__)
                + "\nHINT: pass adapter_name='<another name>' to add a second adapter, or delete_adapter(model, name) "
                "first."
            )
        if self.identity is None:
            self.identity = model_identity(target)
        install_load_guard(pl_module, self.adapter_name)
        return None

    # ------------------------------------------------------------------------------------------------ optimizer
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.config, PrefixTuningConfig):  # before training, not at its first step
            refuse_checkpointing(pl_module)
        missing = trainable_not_in_optimizers(pl_module, trainer.optimizers)
        if missing:
            raise OptimizerSetupError(_missing_message(missing))
        frozen = frozen_in_optimizers(pl_module, trainer.optimizers)
        if frozen:
            rank_zero_warn(
                f"The optimizer holds {len(frozen)} frozen parameter(s) (e.g. {frozen[0]}). They never change, but "
                "optimizers may still allocate state for them.\nHINT: build the optimizer from the trainable parameters "
                "only: `torch.optim.AdamW(p for p in self.parameters() if p.requires_grad)`."
            )

    # ------------------------------------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.adapter_only_checkpoints:
            checkpoint["state_dict"] = adapter_only_state_dict(pl_module, checkpoint["state_dict"])

    @override
    def state_dict(self) -> dict[str, Any]:
        # Plain types only: resuming reads the checkpoint with torch.load(weights_only=True).
        return {"version": _STATE_VERSION, "adapter_name": self.adapter_name, "module": self.module,
                "config": self.config.to_dict(), "config_class": type(self.config).__name__,
                "quantize": _plain(self.quantize), "identity": self.identity,
                "adapter_only": self.adapter_only_checkpoints}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {**state_dict.get("config", {}), "class": state_dict.get("config_class", "LoRAConfig")}
        problems = config_differences(saved, _typed(self.config))
        problems = [f"{self.method} config {p}" for p in problems]
        if _plain(self.quantize) != state_dict.get("quantize"):
            problems.append(f"quantize: checkpoint {state_dict.get('quantize')!r}, this run {_plain(self.quantize)!r}")
        if self.identity is not None and state_dict.get("identity") is not None:
            problems += [f"base {p}" for p in identity_differences(state_dict["identity"], self.identity)]
        if problems:
            raise CheckpointMismatchError(
                f"This checkpoint was written for another base model or adapter setup "
                f"(adapter {self.adapter_name!r}):\n  - "
                + "\n  - ".join(problems)
                + f"\nHINT: resume with the base model and {type(self).__name__} settings of the run that wrote it "
                f"({type(self).__name__}.from_checkpoint(path) rebuilds the callback from the checkpoint)."
            )

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            rank_zero_warn(
                f"The checkpoint has no {type(self).__name__} state for adapter {self.adapter_name!r}: its adapter tensors "
                "were loaded, but the base model and adapter settings could not be checked against it.\n"
                "HINT: resume from checkpoints written by a Trainer with this callback."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for key in (self.state_key, f"{self.state_key}/identity", SHARD_KEY):
            forget(pl_module, key)

    # ------------------------------------------------------------------------------------------------ outside fit
    def load_checkpoint(self, pl_module: pl.LightningModule, ckpt_path: str | Path) -> pl.LightningModule:
        """Load a checkpoint written with this callback into a freshly built module, outside a Trainer.

        The supported replacement for ``LightningModule.load_from_checkpoint`` with adapter-only checkpoints: builds
        the model (``configure_model``), applies the same surgery, checks the base model and adapter settings against
        the checkpoint, then loads the adapter tensors (missing frozen tensors are expected; missing adapter
        tensors are an error).

        Args:
            pl_module: A new module, built as for training (e.g. ``MyModule(**checkpoint["hyper_parameters"])``).
            ckpt_path: The Lightning checkpoint.

        Returns:
            ``pl_module``, with the adapters loaded and every parameter as training left it (adapters trainable).

        Raises:
            CheckpointMismatchError: If the checkpoint was written for another base model or adapter setup, or lacks
                adapter tensors.
        """
        checkpoint = read_checkpoint(ckpt_path)  # names a truncated or corrupt file
        if is_overridden("configure_model", pl_module):
            pl_module.configure_model()
        self.apply(pl_module)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            rank_zero_warn(f"{ckpt_path}: no {type(self).__name__} state for adapter {self.adapter_name!r}; "
                           "the base model and adapter settings cannot be checked.")
        else:
            self.load_state_dict(state)
        pl_module.on_load_checkpoint(checkpoint)
        pl_module.load_state_dict(checkpoint["state_dict"], strict=True)
        return pl_module

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | Path, *, adapter_name: str | None = None,
                        quantize: QuantConfig | None = None) -> PEFTFinetuning:
        """Rebuild the callback from the adapter settings stored in a checkpoint it wrote.

        Args:
            ckpt_path: The Lightning checkpoint.
            adapter_name: Which adapter, when the checkpoint holds several. Default: the only one.
            quantize: The quantization config, required when the checkpoint's run quantized the base.

        Raises:
            ValueError: If the checkpoint holds no (or several, and ``adapter_name`` is not given) states, or
                was trained on a quantized base and ``quantize`` is not given.
        """
        checkpoint = read_checkpoint(ckpt_path)  # names a truncated or corrupt file
        states = [s for s in cls.states_in(checkpoint) if adapter_name is None or s.get("adapter_name") == adapter_name]
        if len(states) != 1:
            found = [s.get("adapter_name") for s in states] or "none"
            raise ValueError(f"{ckpt_path}: expected one {cls.__name__} state for adapter_name={adapter_name!r}, found "
                             f"adapters {found}.\nHINT: pass adapter_name= to choose one, or check that the run used "
                             f"{cls.__name__}.")
        state = states[0]
        if state.get("quantize") is not None and quantize is None:
            raise ValueError(f"{ckpt_path}: the run quantized the base model (quantize={state['quantize']!r}).\n"
                             "HINT: pass the same settings: from_checkpoint(path, quantize=QuantConfig(...)).")
        return cls.from_state(state, quantize=quantize)

    @classmethod
    def from_state(cls, state: dict[str, Any], *, quantize: QuantConfig | None = None) -> PEFTFinetuning:
        """Rebuild the callback from its :meth:`state_dict` (a checkpoint's ``callbacks`` entry).

        Args:
            state: What :meth:`state_dict` returned.
            quantize: The quantization config. Default: the one stored in ``state``, if any.
        """
        if quantize is None and state.get("quantize") is not None:
            quantize = QuantConfig(**state["quantize"])
        config = CONFIG_CLASSES[state.get("config_class", "LoRAConfig")].from_dict(state["config"])
        return cls(config, quantize=quantize, module=state.get("module"),
                   adapter_only_checkpoints=state.get("adapter_only", True), adapter_name=state["adapter_name"])

    @classmethod
    def states_in(cls, checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
        """This callback's states stored in a loaded checkpoint (one per adapter)."""
        return [s for k, s in checkpoint.get("callbacks", {}).items() if str(k).startswith(cls.__qualname__ + "{")]


def _freeze_outside(pl_module: torch.nn.Module, target: torch.nn.Module) -> None:
    inside = {id(p) for p in target.parameters()}
    for param in pl_module.parameters():
        if id(param) not in inside:
            param.requires_grad_(False)


def _missing_message(missing: list[str]) -> str:
    shown = ", ".join(missing[:5]) + (f" ... and {len(missing) - 5} more" if len(missing) > 5 else "")
    return (
        f"{len(missing)} trainable parameter(s) are in no optimizer param group, so they would never be updated: "
        f"{shown}.\nThe optimizer was built from parameters gathered before the surgery added the adapters: e.g. "
        "LightningCLI's automatic optimizer (`--optimizer` with a module that has no configure_optimizers builds it "
        "from model.parameters() when the CLI starts), or parameters captured in __init__.\n"
        "HINT: build the optimizer inside configure_optimizers from the trainable parameters: "
        "`return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=2e-4)`; with LightningCLI, "
        "give the module an `optimizer: OptimizerCallable` argument (as lightning_lora's CausalLMModule does)."
    )


def _typed(config: Any) -> dict[str, Any]:
    """A config's fields plus its class name, so that two methods never compare equal."""
    return {**config.to_dict(), "class": type(config).__name__}


def _plain(value: Any) -> Any:
    """A weights_only-safe, comparable form of a config object (dataclass, mapping, or anything with to_dict)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
