"""GradientCheckpointing: the transformers API and generic block wrapping, composed with LoRAFinetuning either way."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_lora import LoRAConfig, TargetMatchError
from lightning_lora.callbacks import GradientCheckpointing, LoRAFinetuning
from lightning_lora.surgery.training.activation_checkpointing import (
    disable_activation_checkpointing,
    enable_activation_checkpointing,
)
from tests.callbacks.models import TinyLlamaModule, TinyModule, TinyNet, adapter_tensors, trainer

CFG = LoRAConfig(r=4, targets=["q_proj", "v_proj"])


def _fit(tmp_path: Path, module: L.LightningModule, callbacks: list) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    trainer(tmp_path, callbacks, max_steps=3).fit(module)
    return adapter_tensors(module)


@pytest.mark.parametrize("lora_first", [True, False])
def test_transformers_model_uses_its_api_and_trains_like_without(tmp_path: Path, lora_first: bool) -> None:
    reference = _fit(tmp_path, TinyLlamaModule(), [LoRAFinetuning(CFG, module="model")])
    module = TinyLlamaModule()
    lora, checkpointing = LoRAFinetuning(CFG, module="model"), GradientCheckpointing(module="model")
    got = _fit(tmp_path, module, [lora, checkpointing] if lora_first else [checkpointing, lora])
    assert module.model.is_gradient_checkpointing
    assert checkpointing.checkpointed == ["model.layers.0", "model.layers.1"]
    assert all(torch.allclose(got[n], reference[n], atol=1e-6) for n in reference)
    assert all(got[n].abs().sum() > 0 for n in got)


def _count_block_runs(module: TinyModule) -> list[int]:
    # A pre-hook on the block's first layer: recomputation stops early once every saved tensor is back, so hooks
    # that run after a layer's forward are not reliable counters.
    runs = [0]
    module.model.layers[0].q_proj.register_forward_pre_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    return runs


@pytest.mark.parametrize("lora_first", [True, False])
def test_generic_blocks_are_recomputed_in_backward(tmp_path: Path, lora_first: bool) -> None:
    reference = _fit(tmp_path, TinyModule(), [LoRAFinetuning(CFG, module="model")])
    module = TinyModule()
    runs = _count_block_runs(module)
    lora, checkpointing = LoRAFinetuning(CFG, module="model"), GradientCheckpointing("layers", module="model")
    got = _fit(tmp_path, module, [lora, checkpointing] if lora_first else [checkpointing, lora])
    assert checkpointing.checkpointed == ["layers.0", "layers.1"]
    assert runs[0] == 2 * 3  # forward + recomputation in backward, 3 steps
    assert all(torch.equal(got[n], reference[n]) for n in reference)
    assert "forward" in module.model.layers[0].__dict__  # wrapped per instance: module tree and keys unchanged


def test_reentrant_checkpointing_still_gives_adapters_gradients(tmp_path: Path) -> None:
    reference = _fit(tmp_path, TinyModule(), [LoRAFinetuning(CFG, module="model")])
    got = _fit(
        tmp_path, TinyModule(), [LoRAFinetuning(CFG, module="model"), GradientCheckpointing(use_reentrant=True, module="model")]
    )
    # The frozen embedding's output does not require grad; without switching input grads on, reentrant checkpointing
    # would give the adapters inside the blocks no gradient at all.
    assert all(torch.equal(got[n], reference[n]) for n in reference)
    assert all(got[n].abs().sum() > 0 for n in got if ".lora_B." in n)


def test_plain_helpers_are_idempotent_and_reversible() -> None:
    net = TinyNet()
    assert enable_activation_checkpointing(net) == ["layers.0", "layers.1"]  # numbered blocks found by default
    wrapped = net.layers[0].forward
    assert enable_activation_checkpointing(net, blocks="re:layers\\.[01]") == ["layers.0", "layers.1"]
    assert net.layers[0].forward is wrapped
    disable_activation_checkpointing(net)
    assert "forward" not in net.layers[0].__dict__
    net.eval()
    assert net(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 64)


def test_pattern_matching_nothing_names_the_closest_modules() -> None:
    with pytest.raises(TargetMatchError, match=r"(?s)blocks pattern 'layerz' matched no module.*closest module names: layers"):
        enable_activation_checkpointing(TinyNet(), blocks="layerz")
