"""bitsandbytes optimizers from a config (class_path / init_args), stepping the adapters of a QLoRA model on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_lora import LoRAConfig, QuantConfig, apply_lora, quantize_model
from lightning_lora.surgery import lora_layers
from tests.factories import input_ids, state_snapshot, tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def qlora() -> nn.Module:
    model = tiny_llama(num_layers=1)
    quantize_model(model, QuantConfig())
    apply_lora(model, LoRAConfig(r=4, targets="all-linear"))
    return model.train()


@pytest.mark.parametrize(
    ("class_path", "warning"),
    [
        ("bitsandbytes.optim.AdamW8bit", None),
        ("bitsandbytes.optim.PagedAdamW32bit", "Paged optimizers are not supported on CPU"),
    ],
)
def test_optimizer_from_config_steps_the_adapters(class_path: str, warning: str | None) -> None:
    from lightning.pytorch.cli import instantiate_class

    model = qlora()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate_class(params, {"class_path": class_path, "init_args": {"lr": 1e-2}})
    assert type(optimizer).__module__.startswith("bitsandbytes.optim")
    frozen = {k: v for k, v in state_snapshot(model).items() if ".lora_" not in k}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    if warning is None:
        optimizer.step()
    else:  # bitsandbytes falls back to its non-paged behaviour on CPU, with its own warning
        with pytest.warns(UserWarning, match=warning):
            optimizer.step()
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in before.items() if ".lora_A." in n)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())


def test_optimizer_through_jsonargparse_config() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(torch.optim.Optimizer, "optimizer", skip={"params"}, instantiate=False)
    cfg = parser.parse_args(["--optimizer=bitsandbytes.optim.AdamW8bit", "--optimizer.lr=0.005"])
    assert cfg.optimizer.class_path == "bitsandbytes.optim.AdamW8bit" and cfg.optimizer.init_args.lr == 0.005
    from lightning.pytorch.cli import instantiate_class

    model = qlora()
    layer = lora_layers(model)[0][1]
    optimizer = instantiate_class([p for p in model.parameters() if p.requires_grad], cfg.optimizer.as_dict())
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    b_before = layer.lora_B["default"].detach().clone()
    optimizer.step()
    assert not torch.equal(layer.lora_B["default"], b_before)
    assert optimizer.param_groups[0]["lr"] == 0.005
