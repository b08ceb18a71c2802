"""Properties every adapted model must have, checked on every supported model family.

A fresh adapter is a no-op; merged == unmerged; merging is idempotent; unmerge and unload restore the base bit for
bit; an optimizer step changes only what the config makes trainable; save -> load round-trips bit-exactly; a merge
that would give inf / NaN is refused without touching the model.
"""

from __future__ import annotations

import pytest
import torch

from lightning_lora.surgery import (
    LoRAConfig,
    LoRALayer,
    MergeError,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)
from tests.factories import (
    FAMILIES,
    assert_same_state,
    forward,
    input_ids,
    logits,
    lora_structure,
    perturb_lora_B,
    state_snapshot,
    unchanged,
)

# A module per family trained fully through `modules_to_save` (an untied one: GPT-2's and OPT's heads are tied).
MODULES_TO_SAVE = {
    "llama": "lm_head", "gpt2": "ln_f", "bert": "classifier",
    "opt": "final_layer_norm", "phi": "lm_head", "t5": "final_layer_norm",
}
ALL_LINEAR = LoRAConfig(r=4, alpha=8, targets="all-linear")


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def _adapted(family: str, config: LoRAConfig = ALL_LINEAR, perturb: bool = True) -> torch.nn.Module:
    model = FAMILIES[family]()
    apply_lora(model, config)
    if perturb:
        assert perturb_lora_B(model) == len(lora_layers(model))
    return model


def test_fresh_adapter_is_an_exact_no_op(family: str) -> None:
    model, ids = FAMILIES[family](), input_ids()
    base = logits(model, ids)
    report = apply_lora(model, ALL_LINEAR)
    assert report.replaced and all(isinstance(model.get_submodule(p), LoRALayer) for p in report.replaced)
    assert torch.equal(logits(model, ids), base)


def test_merged_equals_unmerged(family: str) -> None:
    model, ids = _adapted(family), input_ids()
    base = logits(FAMILIES[family](), ids)
    unmerged = logits(model, ids)
    assert (unmerged - base).abs().max() > 1e-3, "perturbing B must change the output, else this test proves nothing"
    merged = logits(merge_lora(model), ids)
    assert not lora_layers(model)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


def test_merge_twice_equals_merge_once(family: str) -> None:
    model, ids = _adapted(family), input_ids()
    merge_lora(model, unload=False)
    once, once_logits = state_snapshot(model), logits(model, ids)
    merge_lora(model, unload=False)
    assert_same_state(once, model)
    assert torch.equal(logits(model, ids), once_logits)
    assert all(layer.merged_adapters == ["default"] for _, layer in lora_layers(model))


def test_unmerge_restores_base_weights_bitwise(family: str) -> None:
    model, ids = _adapted(family), input_ids()
    before, unmerged = state_snapshot(model), logits(model, ids)
    merge_lora(model, unload=False)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "merge changed no weight"
    unmerge_lora(model)
    assert_same_state(before, model)
    assert torch.equal(logits(model, ids), unmerged)
    assert all(layer.merged_adapters == [] for _, layer in lora_layers(model))


@pytest.mark.parametrize("merge_first", [False, True], ids=["unmerged", "merged"])
def test_unload_gives_back_the_original_state_dict(family: str, merge_first: bool) -> None:
    model, ids = FAMILIES[family](), input_ids()
    original, base = state_snapshot(model), logits(model, ids)
    apply_lora(model, ALL_LINEAR)
    perturb_lora_B(model)
    if merge_first:
        merge_lora(model, unload=False)
    unload_lora(model)
    assert not lora_layers(model)
    assert_same_state(original, model)
    assert torch.equal(logits(model, ids), base)


def _expected_trainable(model: torch.nn.Module, bias: str, keep: str) -> set[str]:
    # Written independently of apply.set_trainable: adapter factors by name, plus what the config asks for.
    names = set()
    for name, _ in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if ".lora_A." in name or ".lora_B." in name:
            names.add(name)
        elif name.startswith(f"{keep}.") or f".{keep}." in name:
            names.add(name)
        elif leaf == "bias" and (bias == "all" or (bias == "lora_only" and name.endswith(".base_layer.bias"))):
            names.add(name)
    return names


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_optimizer_step_changes_only_trainable_tensors(family: str, bias: str) -> None:
    keep = MODULES_TO_SAVE[family]
    config = LoRAConfig(r=4, alpha=8, targets="all-linear", bias=bias, modules_to_save=[keep])
    model = _adapted(family, config).train()
    expected = _expected_trainable(model, bias, keep)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    if bias != "none" and family not in ("llama", "t5"):  # Llama and T5 have no bias anywhere
        assert any(n.endswith("bias") and ".lora_" not in n and keep not in n for n in trainable)
    before = state_snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    forward(model, input_ids()).float().pow(2).mean().backward()
    optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        if key in expected:
            continue
        assert torch.equal(after[key], value), f"{key} is not trainable but changed"
    changed = {k for k in expected if not torch.equal(after[k], before[k])}
    lora = {k for k in expected if ".lora_" in k}
    assert lora <= changed, f"adapter tensors that did not move: {sorted(lora - changed)}"
    assert any(k.startswith(f"{keep}.") or f".{keep}." in k for k in changed), "modules_to_save did not train"


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_save_load_round_trip_is_bit_exact(family: str, bias: str, tmp_path) -> None:
    config = LoRAConfig(r=4, alpha=8, targets="all-linear", bias=bias, modules_to_save=[MODULES_TO_SAVE[family]])
    model, ids = _adapted(family, config), input_ids()
    with torch.no_grad():  # train the extra tensors too, so that a load that skips them fails
        for param in (p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n):
            param.add_(0.01)
    saved = adapter_state_dict(model)
    save_adapter(model, tmp_path / "adapter")

    fresh = FAMILIES[family]()
    report = load_adapter(fresh, tmp_path / "adapter")
    assert sorted(report.replaced) == sorted(p for p, _ in lora_layers(model))
    loaded = adapter_state_dict(fresh)
    assert list(loaded) == list(saved)
    for key, value in saved.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    assert not any(p.requires_grad for p in fresh.parameters())  # load_adapter(trainable=False) freezes everything


@pytest.mark.parametrize("unload", [True, False])
def test_merge_refuses_non_finite_results_and_changes_nothing(family: str, unload: bool) -> None:
    model = _adapted(family)
    path, layer = lora_layers(model)[-1]
    with torch.no_grad():
        layer.lora_B["default"][0, 0] = float("inf")
    structure = lora_structure(model)
    with unchanged(model), pytest.raises(MergeError, match=rf"{path}: merging adapters \['default'\] gives non-finite"):
        merge_lora(model, unload=unload)
    assert lora_structure(model) == structure and all(not layer.merged_adapters for _, layer in lora_layers(model))


def test_adapter_dropout_follows_the_mode_of_the_wrapped_layer(family: str, tmp_path) -> None:
    """New adapter modules take the wrapped layer's train/eval mode: an eval model stays deterministic after
    apply_lora / load_adapter with dropout > 0 (PEFT's get_peft_model leaves them in training mode)."""
    config = LoRAConfig(r=4, alpha=8, targets="all-linear", dropout=0.5)
    model, ids = _adapted(family, config), input_ids()
    assert not any(m.training for m in model.modules())
    save_adapter(model, tmp_path)
    fresh = FAMILIES[family]()
    load_adapter(fresh, tmp_path)
    loaded = logits(fresh, ids)
    assert torch.equal(loaded, logits(model, ids)) and torch.equal(loaded, logits(fresh, ids))
    torch.testing.assert_close(logits(merge_lora(fresh), ids), loaded, rtol=0, atol=1e-5)
    model.train()
    with torch.no_grad():
        assert not torch.equal(forward(model, ids), forward(model, ids))  # dropout on in training
