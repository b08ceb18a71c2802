"""``LayerFreezing``: train only some transformer blocks (and chosen modules), unfreezing more on a schedule."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_lora.callbacks._model_ready import FREEZING, forget, target_module, when_model_ready
from lightning_lora.surgery.errors import FreezingConfigError
from lightning_lora.surgery.training.freeze import (
    add_param_group,
    block_spec_problems,
    has_lora,
    selected_parameters,
    train_only,
    unfreeze,
)

Interval = Literal["epoch", "step"]


class LayerFreezing(Callback):
    """Partial fine-tuning: train the chosen blocks and modules only; optionally unfreeze more blocks later.

    Without LoRA, every other parameter is frozen. With :class:`LoRAFinetuning` the adapters train as configured and
    the chosen blocks are trained fully in addition (LoRA adapters are never frozen or unfrozen here). The initial
    freezing runs right after ``configure_model`` and after the LoRA surgery, whatever the callback order, so the
    module's ``configure_optimizers`` (built from parameters that require grad) sees it.

    Blocks unfrozen by ``schedule`` are added to the first optimizer as a new param group (as Lightning's
    ``BaseFinetuning`` does), which joins that optimizer's learning-rate schedulers (scheduled like the first group,
    from its own initial lr). Which schedule entries have run is saved in checkpoints and restored on resume, param
    groups included, so resumed runs match uninterrupted ones. Under DDP a schedule is refused: DDP only
    synchronises parameters that were trainable when it wrapped the model.

    Args:
        blocks: Blocks trained from the start, in ``LoRAConfig.layers`` syntax: indices (``[10, 11]``) or a slice
            string (``"-2:"`` = the last two). Default: None (no block).
        modules: Module name patterns also trained from the start (``LoRAConfig.targets`` syntax), e.g.
            ``["lm_head", "norm"]``. Default: none.
        schedule: ``{when: blocks}``: at the start of epoch (or step) ``when``, also train ``blocks`` (same syntax),
            e.g. ``{1: "-4:", 3: ":"}``. Default: none.
        interval: Whether ``schedule`` keys count epochs or optimizer steps. Default: ``"epoch"``.
        unfreeze_lr: Learning rate of a param group added by ``schedule``, when it is added; afterwards it follows
            the first group's schedule proportionally. Default: the first group's current learning rate.
        module: Attribute path of the network inside the LightningModule. Default: None (the LightningModule).

    Example:
        >>> import lightning as L
        >>> freezing = LayerFreezing(blocks="-2:", modules=["lm_head"], schedule={1: "-4:"})
        >>> trainer = L.Trainer(callbacks=[freezing], max_epochs=3)
    """

    def __init__(self, blocks: list[int] | str | None = None, *, modules: list[str] | None = None,
                 schedule: dict[int, list[int] | str] | None = None, interval: Interval = "epoch",
                 unfreeze_lr: float | None = None, module: str | None = None) -> None:
        self.blocks = blocks
        self.modules = list(modules or [])
        self.schedule = {int(k): v for k, v in (schedule or {}).items()}
        self.interval = interval
        self.unfreeze_lr = unfreeze_lr
        self.module = module
        self.applied: list[int] = []
        self._validate()

    def _validate(self) -> None:
        problems = block_spec_problems(self.blocks)
        for when, spec in self.schedule.items():
            problems += block_spec_problems(spec, f"schedule[{when}]")
            if when < 0:
                problems.append(f"schedule key {when}: must be an epoch / step number >= 0.")
        if self.interval not in ("epoch", "step"):
            problems.append(f"interval={self.interval!r}: must be 'epoch' or 'step'.")
        if self.blocks is None and not self.modules and not self.schedule:
            problems.append("nothing to train: give blocks=, modules= or schedule=.")
        if problems:
            raise FreezingConfigError("Invalid LayerFreezing:\n  - " + "\n  - ".join(problems))

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(blocks=self.blocks, modules=self.modules, module=self.module)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.schedule and isinstance(trainer.strategy, (DDPStrategy, ModelParallelStrategy)):
            # DDP registers the parameters that require grad when it wraps the model; parameters unfrozen later are
            # never all-reduced, so the ranks would silently drift apart. FSDP2 fixes its gradient layout at its
            # first forward too.
            raise ValueError(
                f"LayerFreezing(schedule={self.schedule!r}) cannot unfreeze blocks during training under DDP or FSDP2: "
                "they only synchronise parameters that were trainable when they wrapped the model.\n"
                "HINT: train those blocks from the start (blocks=...), or run the schedule on one device."
            )
        when_model_ready(pl_module, self.state_key, FREEZING, self.apply)

    def apply(self, pl_module: pl.LightningModule) -> list[str]:
        """Freeze / unfreeze for the start of training now; returns the names of the parameters made trainable."""
        target = target_module(pl_module, self.module)
        for spec in self.schedule.values():
            selected_parameters(target, spec)  # fail now, not mid-training, on a block that does not exist
        names = train_only(target, self.blocks, self.modules)
        if target is not pl_module and not has_lora(pl_module):
            inside = {id(p) for p in target.parameters()}
            for param in pl_module.parameters():
                if id(param) not in inside:
                    param.requires_grad_(False)
        rank_zero_info(f"LayerFreezing: training blocks {self.blocks!r} and modules {self.modules}: "
                       f"{len(names)} parameter tensors" + (" (in addition to the LoRA adapters)" if has_lora(target) else ""))
        return names

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resuming: redo the unfreezing that happened before the checkpoint, in the same order, before Lightning
        # loads the optimizer state (which expects the same param groups).
        for when in self.applied:
            self._unfreeze(when, trainer, pl_module, record=False)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._run_due(trainer.current_epoch, trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.interval == "step":
            self._run_due(trainer.global_step, trainer, pl_module)

    def _run_due(self, now: int, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for when in sorted(self.schedule):
            if when <= now and when not in self.applied:
                self._unfreeze(when, trainer, pl_module, record=True)

    def _unfreeze(self, when: int, trainer: pl.Trainer, pl_module: pl.LightningModule, *, record: bool) -> None:
        params = list(selected_parameters(target_module(pl_module, self.module), self.schedule[when]).values())
        newly = unfreeze(params)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        added = add_param_group(trainer.optimizers[0], params, self.unfreeze_lr, schedulers) if trainer.optimizers else 0
        if record:
            self.applied.append(when)
            rank_zero_info(f"LayerFreezing: {self.interval} {when}: unfroze blocks {self.schedule[when]!r} "
                           f"({sum(p.numel() for p in newly):,} parameters, {added} tensors added to the optimizer)")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"applied": list(self.applied), "interval": self.interval}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = [int(k) for k in state_dict.get("applied", [])]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        forget(pl_module, self.state_key)
