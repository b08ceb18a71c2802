"""Combining adapters: the new adapter's update checked against deltas computed by hand from the input factors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lora import (
    CombineError,
    LoRAConfig,
    SurgeryError,
    UnknownAdapterError,
    apply_lora,
    combine_adapters,
    get_active_adapters,
    list_adapters,
    load_adapter,
    merge_lora,
    save_adapter,
    set_active_adapters,
    use_adapters,
)
from lightning_lora.surgery.lora.inventory import lora_layers
from tests.factories import input_ids, logits, perturb_lora_B, tiny_llama

WEIGHTS = [0.7, -0.4]


@pytest.fixture
def model() -> torch.nn.Module:
    """``a``: r4 alpha32 on q,v; ``b``: r8, rsLoRA alpha 4 on q,down; ``c``: r4 alpha 2 on q,v (same shape as ``a``)."""
    m = tiny_llama(num_layers=2)
    apply_lora(m, LoRAConfig(r=4, targets=["q_proj", "v_proj"]), name="a")
    apply_lora(m, LoRAConfig(r=8, alpha=4, targets=["q_proj", "down_proj"], use_rslora=True), name="b")
    apply_lora(m, LoRAConfig(r=4, alpha=2, targets=["q_proj", "v_proj"]), name="c")
    perturb_lora_B(m, std=0.5)
    return m.eval()


def _hand_delta(layer, name: str) -> torch.Tensor:
    """``s B A`` from the raw factors, with the scale written out (not through the library)."""
    spec = layer.specs[name]
    scale = spec.alpha / math.sqrt(spec.r) if spec.use_rslora else spec.alpha / spec.r
    return scale * layer.lora_B[name].detach().double() @ layer.lora_A[name].detach().double()


def _weighted_sum(layer, names, weights) -> torch.Tensor:
    return sum(w * _hand_delta(layer, n) for n, w in zip(names, weights) if n in layer.specs)


def test_cat_is_the_exact_weighted_sum(model):
    report = combine_adapters(model, ["a", "b"], WEIGHTS, name="ab", method="cat")
    assert report.adapter == "ab" and list_adapters(model) == ["a", "b", "c", "ab"]
    layers = dict(lora_layers(model))
    with_ab = {p for p, layer in layers.items() if "ab" in layer.specs}
    assert with_ab == {p for p, layer in layers.items() if {"a", "b"} & set(layer.specs)}
    for _path, layer in layers.items():
        if "ab" in layer.specs:
            assert layer.specs["ab"].scale == 1.0
            assert layer.specs["ab"].r == sum(layer.specs[n].r for n in ("a", "b") if n in layer.specs)
            torch.testing.assert_close(_hand_delta(layer, "ab"), _weighted_sum(layer, ["a", "b"], WEIGHTS), rtol=1e-5, atol=1e-6)
    q = layers["model.layers.0.self_attn.q_proj"]  # A stacked, B concatenated with w_i s_i folded in
    assert torch.equal(q.lora_A["ab"], torch.cat([q.lora_A["a"], q.lora_A["b"]]).detach())
    torch.testing.assert_close(q.lora_B["ab"][:, :4], WEIGHTS[0] * 8.0 * q.lora_B["a"].detach())
    torch.testing.assert_close(q.lora_B["ab"][:, 4:], WEIGHTS[1] * 4 / math.sqrt(8) * q.lora_B["b"].detach())


def test_cat_output_equals_both_adapters_active(model):
    combine_adapters(model, ["a", "b"], name="ab")  # weights 1: the same as running both adapters at once
    ids = input_ids(2, 6)
    set_active_adapters(model, ["a", "b"])
    both = logits(model, ids)
    set_active_adapters(model, "ab")
    torch.testing.assert_close(logits(model, ids), both, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [12, 3])
def test_svd_is_the_best_rank_k_approximation(model, rank):
    combine_adapters(model, ["a", "b"], WEIGHTS, name="svd", method="svd", rank=rank)
    for _path, layer in lora_layers(model):
        if "svd" not in layer.specs:
            continue
        assert layer.specs["svd"].r == rank and layer.specs["svd"].scale == 1.0
        target = _weighted_sum(layer, ["a", "b"], WEIGHTS)
        u, s, vh = torch.linalg.svd(target)  # the dense reference (Eckart-Young)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        torch.testing.assert_close(_hand_delta(layer, "svd"), best, rtol=1e-4, atol=1e-5)
        b, a = layer.lora_B["svd"].double(), layer.lora_A["svd"].double()  # B = U sqrt(S), A = sqrt(S) V^T: balanced
        torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-4, atol=1e-6)
        if rank >= sum(layer.specs[n].r for n in ("a", "b") if n in layer.specs):
            torch.testing.assert_close(_hand_delta(layer, "svd"), target, rtol=1e-4, atol=1e-5)


def test_svd_default_rank_is_largest_input_rank(model):
    combine_adapters(model, ["a", "c"], name="ac", method="svd")
    assert {layer.specs["ac"].r for _, layer in lora_layers(model) if "ac" in layer.specs} == {4}


def test_linear_mixes_the_factors(model):
    combine_adapters(model, ["a", "c"], [0.5, -2.0], name="lin", method="linear")
    for _, layer in lora_layers(model):
        if "lin" not in layer.specs:
            continue
        sa, sc = 32 / 4, 2 / 4  # the scales of a and c
        want_a = math.sqrt(0.5 * sa) * layer.lora_A["a"] + math.sqrt(2.0 * sc) * layer.lora_A["c"]
        want_b = math.sqrt(0.5 * sa) * layer.lora_B["a"] - math.sqrt(2.0 * sc) * layer.lora_B["c"]
        torch.testing.assert_close(layer.lora_A["lin"], want_a.detach())
        torch.testing.assert_close(layer.lora_B["lin"], want_b.detach())
        assert layer.specs["lin"].r == 4 and layer.specs["lin"].scale == 1.0


def test_linear_of_one_adapter_is_exact_scaling(model):
    combine_adapters(model, ["b"], [-1.5], name="neg", method="linear")
    for _, layer in lora_layers(model):
        if "neg" in layer.specs:
            torch.testing.assert_close(_hand_delta(layer, "neg"), -1.5 * _hand_delta(layer, "b"), rtol=1e-5, atol=1e-6)


def test_new_adapter_is_inactive_and_frozen(model):
    set_active_adapters(model, "a")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = input_ids(2, 5)
    before = logits(model, ids)
    combine_adapters(model, ["a", "b"], name="ab")
    assert get_active_adapters(model) == ["a"]
    assert all(p.requires_grad == flags.get(n, False) for n, p in model.named_parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".ab"))
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)


def test_saves_in_peft_format_and_round_trips(model, tmp_path):
    combine_adapters(model, ["a", "b"], WEIGHTS, name="ab", method="cat")  # ranks differ per layer: rank_pattern
    save_adapter(model, tmp_path / "ab", name="ab")
    ids = input_ids(2, 6)
    with use_adapters(model, "ab"):
        expected = logits(model, ids)
    fresh = tiny_llama(num_layers=2)
    load_adapter(fresh, tmp_path / "ab", name="ab")
    torch.testing.assert_close(logits(fresh, ids), expected, rtol=1e-6, atol=1e-6)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(num_layers=2), str(tmp_path / "ab"))
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-5, atol=1e-5)


def test_linear_refuses_different_ranks_or_targets(model):
    match = r"(?s)same rank in the same layers.*q_proj: ranks differ \(a: r=4, b: r=8\).*method='cat'"
    with pytest.raises(CombineError, match=match):
        combine_adapters(model, ["a", "b"], name="x", method="linear")
    apply_lora(model, LoRAConfig(r=4, targets=["q_proj"]), name="q_only")
    with pytest.raises(CombineError, match=r"(?s)v_proj: adapted by \['a'\] but not by \['q_only'\]"):
        combine_adapters(model, ["a", "q_only"], name="x", method="linear")
    assert "x" not in list_adapters(model)


def test_bad_input(model):
    with pytest.raises(UnknownAdapterError, match=r"'zz'.*\['a', 'b', 'c'\]"):
        combine_adapters(model, ["a", "zz"], name="x")
    with pytest.raises(SurgeryError, match="'c' exists already"):
        combine_adapters(model, ["a"], name="c")
    with pytest.raises(CombineError, match="one finite number per adapter"):
        combine_adapters(model, ["a", "b"], [1.0], name="x")
    with pytest.raises(CombineError, match="one finite number per adapter"):
        combine_adapters(model, ["a"], [float("nan")], name="x")
    with pytest.raises(CombineError, match="method='sum'.*'linear', 'cat', 'svd'"):
        combine_adapters(model, ["a"], name="x", method="sum")
    with pytest.raises(CombineError, match="rank=4 applies only to method='svd'"):
        combine_adapters(model, ["a"], name="x", method="cat", rank=4)
    with pytest.raises(CombineError, match="rank=0"):
        combine_adapters(model, ["a"], name="x", method="svd", rank=0)
    with pytest.raises(CombineError, match=r"rank=40 exceeds min\(in, out\).*rank <= 16"):
        combine_adapters(model, ["a"], name="x", method="svd", rank=40)
    with pytest.raises(CombineError, match="at least one adapter"):
        combine_adapters(model, [], name="x")
    merge_lora(model, adapters=["a"], unload=False)
    with pytest.raises(SurgeryError, match="merged"):
        combine_adapters(model, ["b"], name="x")
    assert "x" not in list_adapters(model)


def test_refuses_different_modules_to_save():
    model = tiny_llama(num_layers=1)
    apply_lora(model, LoRAConfig(r=2, modules_to_save=["lm_head"]), name="a")
    apply_lora(model, LoRAConfig(r=2), name="b")
    with pytest.raises(CombineError, match="different biases / modules_to_save.*cannot be combined"):
        combine_adapters(model, ["a", "b"], name="x")
