"""LayerFreezing: partial fine-tuning with and without LoRA, unfreezing on a schedule, resuming that schedule."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_lora import LoRAConfig
from lightning_lora.callbacks import LayerFreezing, LoRAFinetuning
from lightning_lora.surgery.errors import FreezingConfigError, LoRAConfigError
from tests.callbacks.models import TinyModule, trainer


def _snapshot(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {n.replace(".base_layer.", "."): p.detach().clone() for n, p in module.named_parameters() if ".lora_" not in n}


def _changed(module: L.LightningModule, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in _snapshot(module).items() if not torch.equal(p, before[n])}


def test_trains_only_the_last_block_and_chosen_modules(tmp_path: Path) -> None:
    module = TinyModule()
    before = _snapshot(module)
    t = trainer(tmp_path, [LayerFreezing("-1:", modules=["head"], module="model")], max_steps=2)
    t.fit(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in module.named_parameters() if n.startswith(("model.layers.1.", "model.head."))}
    assert {id(p) for g in t.optimizers[0].param_groups for p in g["params"]} == {
        id(p) for p in module.parameters() if p.requires_grad}
    assert _changed(module, before) == trainable


@pytest.mark.parametrize("lora_first", [True, False])
def test_with_lora_the_blocks_train_fully_in_addition_to_the_adapters(tmp_path: Path, lora_first: bool) -> None:
    module = TinyModule()
    before = _snapshot(module)
    lora = LoRAFinetuning(LoRAConfig(r=2, targets=["q_proj"]), module="model")
    freezing = LayerFreezing([1], module="model")
    trainer(tmp_path, [lora, freezing] if lora_first else [freezing, lora], max_steps=2).fit(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".lora_" in n} == {f"model.layers.{i}.q_proj.lora_{f}.default" for i in (0, 1) for f in "AB"}
    assert {n for n in trainable if ".lora_" not in n} == {
        n for n, _ in module.named_parameters() if n.startswith("model.layers.1.") and ".lora_" not in n}
    assert all(n.startswith("model.layers.1.") for n in _changed(module, before))


def _fit(tmp_path: Path, epochs: int, ckpt_path: str | None = None) -> tuple[TinyModule, LayerFreezing, L.Trainer]:
    L.seed_everything(0, verbose=False)
    module = TinyModule(scheduler=True)
    freezing = LayerFreezing("-1:", modules=["head"], schedule={1: [0], 2: ":"}, module="model")
    t = trainer(tmp_path, [freezing], max_steps=-1, max_epochs=epochs, enable_checkpointing=True)
    t.fit(module, ckpt_path=ckpt_path)
    return module, freezing, t


def test_schedule_unfreezes_into_new_param_groups_and_resumes_exactly(tmp_path: Path) -> None:
    straight, freezing, t = _fit(tmp_path / "a", 3)
    assert freezing.applied == [1, 2]
    groups = t.optimizers[0].param_groups
    assert [len(g["params"]) for g in groups] == [10, 8]  # block 1 + head; block 0 at epoch 1; nothing new at 2
    assert [n for n, p in straight.named_parameters() if not p.requires_grad] == ["model.embed.weight"]
    scheduler = t.lr_scheduler_configs[0].scheduler
    assert len(scheduler.base_lrs) == len(scheduler.lr_lambdas) == 2  # the new group joined the LR schedule
    assert groups[1]["lr"] == groups[0]["lr"] == pytest.approx(0.05 / (1 + 12))  # it follows the first group

    first, freezing_first, _ = _fit(tmp_path / "b", 2)
    assert freezing_first.applied == [1]
    last = next((tmp_path / "b").rglob("*.ckpt"))
    assert torch.load(last, weights_only=True)["callbacks"][freezing_first.state_key] == {"applied": [1], "interval": "epoch"}
    assert not any(p.requires_grad for p in first.model.embed.parameters())
    assert all(p.requires_grad for p in first.model.layers[0].parameters())

    resumed, freezing_resumed, t_resumed = _fit(tmp_path / "c", 3, ckpt_path=str(last))
    assert freezing_resumed.applied == [1, 2]
    assert [len(g["params"]) for g in t_resumed.optimizers[0].param_groups] == [10, 8]
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_step_schedule_adds_the_group_at_that_step(tmp_path: Path) -> None:
    module = TinyModule()
    freezing = LayerFreezing([1], schedule={2: [0]}, interval="step", unfreeze_lr=0.001, module="model")
    t = trainer(tmp_path, [freezing], max_steps=2)
    t.fit(module)
    assert freezing.applied == [] and len(t.optimizers[0].param_groups) == 1
    t = trainer(tmp_path, [freezing], max_steps=3)
    t.fit(module)  # a second fit on the same module: step 2 comes
    assert freezing.applied == [2]
    assert [g["lr"] for g in t.optimizers[0].param_groups] == [0.05, 0.001]


def test_bad_settings_are_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(FreezingConfigError, match=r"(?s)blocks='last two'.*schedule\[1\]=\[\].*interval='epochs'"):
        LayerFreezing("last two", schedule={1: []}, interval="epochs")
    with pytest.raises(FreezingConfigError, match="nothing to train"):
        LayerFreezing()
    with pytest.raises(LoRAConfigError, match=r"indices \[5\] are out of range; the model has 2 blocks"):
        trainer(tmp_path, [LayerFreezing([0], schedule={1: [5]}, module="model")]).fit(TinyModule())


def test_schedule_under_ddp_is_refused(tmp_path: Path) -> None:
    t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, default_root_dir=tmp_path)
    freezing = LayerFreezing([1], schedule={1: [0]})
    with pytest.raises(ValueError, match=r"(?s)cannot unfreeze blocks during training under DDP.*HINT"):
        freezing.setup(t, TinyModule(), "fit")  # the hook itself: a DDP fit would spawn processes
