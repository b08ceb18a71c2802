"""``LoRALayer._add_update``: the fused ``addmm`` used in training and the in-place add into the base layer's output
used when no graph is recorded. Both must give exactly what the plain formula gives, with the same gradients."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from lightning_lora.surgery.lora.codecs import codec_for
from lightning_lora.surgery.lora.layer import AdapterSpec, LoRALayer

N, IN, OUT, R = 6, 5, 4, 3


def _layer(seed: int = 0, dtype: torch.dtype = torch.float64) -> LoRALayer:
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT).to(dtype)
    base.requires_grad_(False)
    layer = LoRALayer(base, codec_for(base))
    layer.add_adapter("default", AdapterSpec(r=R, alpha=6.0, dropout=0.0))
    with torch.no_grad():
        layer.lora_B["default"].normal_()  # B starts at zero, which would hide mistakes in A's gradient
    return layer


def _reference(layer: LoRALayer, x: torch.Tensor) -> torch.Tensor:
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    return layer.base_layer(x) + layer.specs["default"].scale * (x @ a.t()) @ b.t()


def test_training_path_gradients_match_finite_differences() -> None:
    layer = _layer()
    a = layer.lora_A["default"].detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].detach().clone().requires_grad_(True)
    x = torch.randn(2, N, IN, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"lora_A.default": a, "lora_B.default": b}, (x,))

    assert gradcheck(fn, (x, a, b))
    assert gradgradcheck(fn, (x, a, b))  # second derivatives too (gradient penalties, meta-learning)


def test_training_path_matches_the_plain_formula_on_3d_input() -> None:
    layer = _layer()
    x = torch.randn(2, N, IN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = _reference(layer, ref_x)
    torch.testing.assert_close(out, ref)
    weights = torch.randn_like(out)
    params = [layer.lora_A["default"], layer.lora_B["default"]]
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [ref_x, *params])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_frozen_adapter_passes_only_the_input_gradient() -> None:
    layer = _layer()
    layer.lora_A["default"].requires_grad_(False)
    layer.lora_B["default"].requires_grad_(False)
    x = torch.randn(N, IN, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    _reference(layer, ref_x).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert layer.lora_A["default"].grad is None and layer.lora_B["default"].grad is None


def test_frozen_a_trains_only_b() -> None:
    layer = _layer()
    layer.lora_A["default"].requires_grad_(False)
    x = torch.randn(N, IN, dtype=torch.float64)
    layer(x).square().sum().backward()
    b = layer.lora_B["default"]
    grad = b.grad.clone()
    b.grad = None
    _reference(layer, x).square().sum().backward()
    torch.testing.assert_close(grad, b.grad)
    assert layer.lora_A["default"].grad is None


def test_no_grad_forward_adds_in_place_and_matches() -> None:
    layer = _layer()
    x = torch.randn(2, N, IN, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, x))
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), _reference(layer, x))


def test_no_grad_forward_leaves_a_hooked_base_output_untouched() -> None:
    layer = _layer()
    seen: list[torch.Tensor] = []
    layer.base_layer.register_forward_hook(lambda module, args, output: seen.append(output))
    x = torch.randn(N, IN, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(seen[0], layer.base_layer(x))  # the base output as the base returned it
        torch.testing.assert_close(out, _reference(layer, x))


def test_no_grad_forward_respects_global_forward_hooks() -> None:
    layer = _layer()
    seen: list[torch.Tensor] = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, output: seen.append(output) if module is layer.base_layer else None
    )
    try:
        x = torch.randn(N, IN, dtype=torch.float64)
        with torch.no_grad():
            layer(x)
            torch.testing.assert_close(seen[0], layer.base_layer(x))
    finally:
        handle.remove()


def test_float32_training_matches_reference() -> None:
    layer = _layer(dtype=torch.float32)
    x = torch.randn(3, N, IN, requires_grad=True)
    out = layer(x)
    params = [layer.lora_A["default"], layer.lora_B["default"]]
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    ref_x = x.detach().clone().requires_grad_(True)
    ref_grads = torch.autograd.grad(_reference(layer, ref_x).square().sum(), [ref_x, *params])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Recording(nn.Linear):
    """A Linear that keeps its last output (without a hook), to see whether LoRA wrote into it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = super().forward(x)
        return self.last


def test_no_grad_forward_writes_into_the_fresh_base_output() -> None:
    torch.manual_seed(0)
    base = _Recording(IN, OUT)
    layer = LoRALayer(base, codec_for(base))
    layer.add_adapter("default", AdapterSpec(r=R, alpha=6.0, dropout=0.0))
    x = torch.randn(N, IN)
    with torch.no_grad():
        out = layer(x)
    assert out.data_ptr() == base.last.data_ptr()  # no second (N, out) tensor allocated
    layer.train()
    out = layer(x.requires_grad_(True))
    assert out.data_ptr() != base.last.data_ptr()  # with a graph, the base output is never overwritten
