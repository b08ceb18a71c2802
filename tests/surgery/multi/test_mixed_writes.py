"""mixed_batch after adapter weights change, by any write path: rows always equal each row run alone, and the
stacked buffer is not rebuilt per call (the adapters are views into it) (issue 10)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_lora import (
    LoRAConfig,
    apply_lora,
    load_adapter,
    mixed_batch,
    save_adapter,
    use_adapters,
)
from lightning_lora.surgery.lora.inventory import lora_layers
from lightning_lora.surgery.multi.mixed import clear_mixed_batch_cache
from tests.factories import input_ids, logits, perturb_lora_B, tiny_llama

ROWS = ["a", "b", "base", "c"]
IDS = input_ids(len(ROWS), 5)


def _model() -> nn.Module:
    model = tiny_llama(num_layers=2)
    apply_lora(model, LoRAConfig(r=4, targets=["q_proj", "v_proj"]), name="a")
    apply_lora(model, LoRAConfig(r=2, alpha=8, targets=["q_proj", "down_proj"]), name="b")  # another rank
    apply_lora(model, LoRAConfig(r=4, targets="all-linear", use_rslora=True), name="c")
    perturb_lora_B(model, std=0.3)
    return model.eval()


def _check_rows(model: nn.Module) -> torch.Tensor:
    with torch.no_grad(), mixed_batch(model, ROWS):
        mixed = model(input_ids=IDS).logits
    for i, name in enumerate(ROWS):
        if name == "base":
            continue
        with use_adapters(model, name):
            torch.testing.assert_close(mixed[i : i + 1], logits(model, IDS[i : i + 1]), rtol=1e-5, atol=1e-5)
    return mixed


def _b(model: nn.Module, name: str = "b") -> torch.Tensor:
    return model.model.layers[0].self_attn.q_proj.lora_B[name]


def _a(model: nn.Module, name: str = "c") -> torch.Tensor:
    return model.model.layers[1].mlp.down_proj.lora_A[name]


WRITES: dict[str, Callable[[nn.Module], None]] = {
    "data_copy": lambda m: _b(m).data.copy_(torch.randn(_b(m).shape)),
    "data_mul": lambda m: _a(m).data.mul_(-3.0),
    "data_index": lambda m: _b(m).data.__setitem__((slice(None), 0), 1.5),
    "no_grad_copy": lambda m: _no_grad(lambda: _a(m).copy_(torch.randn(_a(m).shape))),
    "data_rebind": lambda m: setattr(_b(m), "data", torch.randn(_b(m).shape)),
    "load_state_dict": lambda m: m.load_state_dict({k: v * 2 if ".lora_B.b" in k else v
                                                    for k, v in m.state_dict().items()}),
    "optimizer_step": lambda m: _train_step(m, "c"),
}


def _no_grad(fn: Callable[[], object]) -> None:
    with torch.no_grad():
        fn()


def _train_step(model: nn.Module, name: str) -> None:
    params = [p for n, p in model.named_parameters() if f".lora_A.{name}" in n or f".lora_B.{name}" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=0.5)
    with use_adapters(model, name):
        model(input_ids=IDS).logits.square().mean().backward()
    optimizer.step()
    for p in params:
        p.requires_grad_(False)
        p.grad = None


@pytest.mark.parametrize("write", list(WRITES))
def test_rows_follow_every_write_path(write: str) -> None:
    model = _model()
    before = _check_rows(model)  # builds the stacks
    WRITES[write](model)
    after = _check_rows(model)
    assert not torch.equal(after, before)  # the write changed some row (so the check above saw new weights)


def test_in_place_writes_do_not_rebuild_the_stack() -> None:
    model = _model()
    _check_rows(model)
    stacks = {path: layer.derived["_mixed_batch_stack"][2] for path, layer in lora_layers(model)}
    WRITES["data_copy"](model)
    WRITES["optimizer_step"](model)
    _check_rows(model)
    assert all(layer.derived["_mixed_batch_stack"][2] is stacks[path] for path, layer in lora_layers(model))


def test_save_deepcopy_and_clear_after_mixed_batch(tmp_path: Path) -> None:
    model = _model()
    _check_rows(model)
    twin = copy.deepcopy(model)
    reference = logits(_use(twin, "b"), IDS)
    WRITES["data_copy"](model)
    assert torch.equal(logits(_use(twin, "b"), IDS), reference)  # the copy has its own storage
    save_adapter(model, tmp_path / "b", name="b")  # safetensors refuses shared storage: the file holds copies
    fresh = tiny_llama(num_layers=2)
    load_adapter(fresh, tmp_path / "b", name="b")
    torch.testing.assert_close(logits(fresh, IDS), logits(_use(model, "b"), IDS), rtol=1e-5, atol=1e-5)
    assert clear_mixed_batch_cache(model) == len(lora_layers(model))
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size()
               for n, p in model.named_parameters() if ".lora_" in n)  # each adapter owns its storage again
    _check_rows(model)


def _use(model: nn.Module, name: str) -> nn.Module:
    from lightning_lora import set_active_adapters

    set_active_adapters(model, name)
    return model
