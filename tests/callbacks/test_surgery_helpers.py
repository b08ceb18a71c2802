"""The plain (Lightning-free) helpers behind the callbacks: freeze, checkpoint, identity, summary, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_lora import LoRAConfig, SurgeryError, apply_lora
from lightning_lora.surgery.errors import CheckpointMismatchError, LoRAConfigError, TargetMatchError
from lightning_lora.surgery.io.export import export_merged
from lightning_lora.surgery.training.adapter_checkpoint import adapter_only_state_dict, install_load_guard
from lightning_lora.surgery.training.fingerprint import identity_differences, model_identity
from lightning_lora.surgery.training.freeze import add_param_group, select_blocks, train_only
from tests.callbacks.models import TinyNet


def test_train_only_validates_before_changing_anything() -> None:
    net = TinyNet()
    with pytest.raises(TargetMatchError, match=r"(?s)modules pattern 'haed' matched no module.*closest module names: head"):
        train_only(net, "-1:", ["haed"])
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(LoRAConfigError, match=r"blocks='1:2:0'"):
        select_blocks(net, "1:2:0")
    assert select_blocks(net, "-1:") == {1} and select_blocks(net, [0, -1]) == {0, 1}


def test_new_param_group_joins_the_schedulers_and_cyclic_schedulers_are_refused() -> None:
    a, b = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([a], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    optimizer.step()
    scheduler.step()  # group 0 at 0.5
    assert add_param_group(optimizer, [a, b], lr=0.05, schedulers=[scheduler]) == 1  # `a` is already held
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, pytest.approx(0.025)]  # proportional to group 0
    cyclic_opt = torch.optim.SGD([a], lr=1.0, momentum=0.9)
    cyclic = torch.optim.lr_scheduler.OneCycleLR(cyclic_opt, max_lr=1.0, total_steps=10)
    with pytest.raises(NotImplementedError, match=r"(?s)driven by OneCycleLR.*HINT"):
        add_param_group(cyclic_opt, [b], schedulers=[cyclic])
    assert len(cyclic_opt.param_groups) == 1


def test_load_guard_forgives_frozen_keys_and_refuses_missing_adapters() -> None:
    net = TinyNet()
    apply_lora(net, LoRAConfig(r=2, targets=["q_proj"]))
    install_load_guard(net, "default")
    small = adapter_only_state_dict(net, net.state_dict())
    assert sorted(small) == [f"layers.{i}.q_proj.lora_{f}.default" for i in (0, 1) for f in "AB"]
    net.load_state_dict(small)  # strict, yet the frozen base may be missing
    del small["layers.0.q_proj.lora_A.default"]
    small["layers.9.q_proj.lora_A.default"] = torch.zeros(1)
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)1 key\(s\) missing.*1 key\(s\) in the checkpoint but not in the model"
    ):
        net.load_state_dict(small, strict=False)
    # nested in a parent module: keys carry a prefix
    parent = nn.Module()
    parent.net = net
    parent.load_state_dict({f"net.{k}": v for k, v in adapter_only_state_dict(net, net.state_dict()).items()})


def test_identity_is_unchanged_by_lora_and_names_what_differs() -> None:
    base = model_identity(TinyNet())
    adapted = TinyNet()
    apply_lora(adapted, LoRAConfig(r=2, targets=["q_proj"]))
    assert model_identity(adapted) == base
    assert identity_differences(base, model_identity(TinyNet(seed=1))) == [
        "weights: same architecture, but the base weights differ (another checkpoint, seed or fine-tune)"]
    assert "architecture" in identity_differences(base, model_identity(TinyNet(hidden=48)))[0]


def test_export_needs_the_adapter(tmp_path: Path) -> None:
    with pytest.raises(SurgeryError, match=r"(?s)no LoRA adapter named 'default'.*adapters: none.*HINT"):
        export_merged(TinyNet(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
