"""Mixed-batch inference: each row of one forward / generate call uses its own adapter (or the bare base)."""

from __future__ import annotations

import pytest
import torch

from lightning_lora import (
    LoRAConfig,
    MixedBatchError,
    SurgeryError,
    UnknownAdapterError,
    apply_lora,
    disable_adapters,
    merge_lora,
    mixed_batch,
    unmerge_lora,
    use_adapters,
)
from lightning_lora.surgery.lora.inventory import lora_layers
from lightning_lora.surgery.multi.mixed import clear_mixed_batch_cache
from tests.factories import input_ids, logits, perturb_lora_B, tiny_gpt2, tiny_llama

ROWS = ["legal", "base", "medical", "code", "legal", "__base__"]


TARGETS = {"llama": (["q_proj", "v_proj"], ["q_proj", "down_proj"]), "gpt2": (["c_attn"], ["c_attn", "c_fc"])}


def _three_adapters(model: torch.nn.Module, family: str = "llama") -> torch.nn.Module:
    # Different ranks, scales (rsLoRA too) and targets: "legal" is absent from the MLP, "medical" from v_proj.
    legal, medical = TARGETS[family]
    apply_lora(model, LoRAConfig(r=4, targets=legal), name="legal")
    apply_lora(model, LoRAConfig(r=8, alpha=4, targets=medical), name="medical")
    apply_lora(model, LoRAConfig(r=2, targets="all-linear", use_rslora=True), name="code")
    perturb_lora_B(model, std=0.3)
    return model.eval()


@pytest.fixture
def model() -> torch.nn.Module:
    return _three_adapters(tiny_llama(num_layers=2))


def _alone(model: torch.nn.Module, name: str, run):
    if name in ("base", "__base__"):
        with disable_adapters(model):
            return run()
    with use_adapters(model, name):
        return run()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_rows_match_each_row_alone(family):
    model = _three_adapters({"llama": tiny_llama, "gpt2": tiny_gpt2}[family](num_layers=2), family)
    ids = input_ids(len(ROWS), 7)
    with torch.no_grad(), mixed_batch(model, ROWS):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(ROWS):
        alone = _alone(model, name, lambda i=i: logits(model, ids[i : i + 1]))
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    with disable_adapters(model):  # rows really differ: the adapters change the output
        base = logits(model, ids)
    assert not torch.allclose(mixed[0], base[0], atol=1e-3) and torch.allclose(mixed[1], base[1], atol=1e-6)


def test_single_adapter_batch_and_all_base(model):
    ids = input_ids(3, 5)
    with use_adapters(model, "medical"):
        expected = logits(model, ids)
    with torch.no_grad(), mixed_batch(model, ["medical"] * 3):
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)  # the ordinary path
    with disable_adapters(model):
        base = logits(model, ids)
    with torch.no_grad(), mixed_batch(model, ["base"] * 3):
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)


def test_greedy_generate_rows_match(model):
    ids = input_ids(len(ROWS), 5, seed=3)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad(), mixed_batch(model, ROWS):
        mixed = model.generate(ids, **kwargs)
    assert mixed.shape == (len(ROWS), 11)
    for i, name in enumerate(ROWS):
        row_kwargs = {**kwargs, "attention_mask": kwargs["attention_mask"][i : i + 1]}
        alone = _alone(model, name, lambda i=i, row_kwargs=row_kwargs: model.generate(ids[i : i + 1], **row_kwargs))
        assert torch.equal(mixed[i], alone[0]), name
    assert len({tuple(row[5:].tolist()) for row in mixed}) > 1  # the adapters steer the continuations apart


def test_beam_search_with_num_beams(model):
    rows = ["legal", "base", "code"]
    ids = input_ids(3, 5, seed=4)
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad(), mixed_batch(model, rows, num_beams=2):
        mixed = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    for i, name in enumerate(rows):
        row = ids[i : i + 1]
        alone = _alone(model, name, lambda row=row: model.generate(row, attention_mask=torch.ones_like(row), **kwargs))
        assert torch.equal(mixed[i], alone[0]), name
    with pytest.raises(MixedBatchError, match=r"got 6 rows, but 3 adapter names.*num_beams=k"):
        with torch.no_grad(), mixed_batch(model, rows):
            model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


def test_matches_peft_adapter_names(model):
    peft = pytest.importorskip("peft")
    peft_config = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(tiny_llama(num_layers=2), peft_config,
                                 adapter_name="legal")
    theirs.add_adapter("medical", peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    theirs.add_adapter("code", peft.LoraConfig(r=2, lora_alpha=32, target_modules="all-linear", use_rslora=True))
    theirs.eval()
    ours_layers = dict(lora_layers(model))
    with torch.no_grad():
        for path, module in theirs.base_model.model.named_modules():
            for name in getattr(module, "lora_A", {}):
                module.lora_A[name].weight.copy_(ours_layers[path].lora_A[name])
                module.lora_B[name].weight.copy_(ours_layers[path].lora_B[name])
    ids = input_ids(len(ROWS), 6)
    with torch.no_grad(), mixed_batch(model, ROWS):
        mixed = model(input_ids=ids).logits
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=["__base__" if n == "base" else n for n in ROWS]).logits
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_hooks_removed_on_exit_even_after_errors(model):
    ids = input_ids(2, 4)
    with pytest.raises(MixedBatchError, match="got 2 rows, but 3 adapter names"):
        with torch.no_grad(), mixed_batch(model, ["legal", "base", "code"]):
            model(input_ids=ids)
    assert all(layer.row_update is None and "row_update" not in vars(layer) for _, layer in lora_layers(model))
    with use_adapters(model, "legal"):
        torch.testing.assert_close(logits(model, ids[:1]), _alone(model, "legal", lambda: logits(model, ids[:1])))


def test_stacked_copy_follows_weight_changes(model):
    ids = input_ids(2, 4)
    with torch.no_grad(), mixed_batch(model, ["legal", "code"]):
        before = model(input_ids=ids).logits
    perturb_lora_B(model, std=0.3, seed=7, adapter="code")  # in place: the cached stack must be rebuilt
    with torch.no_grad(), mixed_batch(model, ["legal", "code"]):
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[1:], _alone(model, "code", lambda: logits(model, ids[1:])), rtol=1e-5, atol=1e-5)
    assert clear_mixed_batch_cache(model) > 0 and clear_mixed_batch_cache(model) == 0


def test_refusals(model):
    with pytest.raises(UnknownAdapterError, match=r"'legl'.*\['legal', 'medical', 'code'\].*'base' means the bare base"):
        mixed_batch(model, ["legl", "base"]).__enter__()
    with pytest.raises(MixedBatchError, match="one adapter name per batch row"):
        mixed_batch(model, "legal").__enter__()
    with pytest.raises(MixedBatchError, match="non-empty list"):
        mixed_batch(model, []).__enter__()
    with pytest.raises(MixedBatchError, match="num_beams=0"):
        mixed_batch(model, ["legal"], num_beams=0).__enter__()
    model.train()
    with pytest.raises(SurgeryError, match=r"for inference.*model.eval\(\)"):
        mixed_batch(model, ["legal"]).__enter__()
    model.eval()
    merge_lora(model, adapters=["legal"], unload=False)
    with pytest.raises(SurgeryError, match=r"\['legal'\] are merged.*unmerge_lora"):
        mixed_batch(model, ["medical"]).__enter__()
    unmerge_lora(model)
    with disable_adapters(model), pytest.raises(SurgeryError, match="disabled"):
        mixed_batch(model, ["legal"]).__enter__()
    with mixed_batch(model, ["legal"]), pytest.raises(SurgeryError, match="cannot be nested"):
        mixed_batch(model, ["legal"]).__enter__()
    with pytest.raises(SurgeryError, match="no LoRA layers"):
        mixed_batch(torch.nn.Linear(2, 2), ["base"]).__enter__()


def test_refuses_training_mode_switched_inside(model):
    ids = input_ids(2, 4)
    with mixed_batch(model, ["legal", "code"]):
        model.train()
        with pytest.raises(SurgeryError, match="training mode"):
            model(input_ids=ids)


def test_adapter_named_base_is_refused():
    model = tiny_llama(num_layers=1)
    apply_lora(model, LoRAConfig(r=2), name="base")
    with pytest.raises(MixedBatchError, match="adapter named 'base'.*another name"):
        mixed_batch(model.eval(), ["base"]).__enter__()


def test_autograd_enabled_gives_the_same_rows(model):
    ids = input_ids(3, 4)
    rows = ["code", "legal", "base"]
    with torch.no_grad(), mixed_batch(model, rows):
        expected = model(input_ids=ids).logits
    model.get_input_embeddings().weight.requires_grad_(True)  # the base outputs now carry a graph
    with mixed_batch(model, rows):
        out = model(input_ids=ids).logits
    assert out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)


def test_delete_adapter_frees_the_stacked_copies(model):
    from lightning_lora import delete_adapter

    with torch.no_grad(), mixed_batch(model, ["legal", "code"]):
        model(input_ids=input_ids(2, 3))
    assert any("_mixed_batch_stack" in layer.derived for _, layer in lora_layers(model))
    delete_adapter(model, "medical")
    stacks = [layer.derived["_mixed_batch_stack"] for _, layer in lora_layers(model) if "_mixed_batch_stack" in layer.derived]
    assert not any("medical" in stack[1] for stack in stacks)  # no stacked copy of the deleted adapter is kept
    with torch.no_grad(), mixed_batch(model, ["code", "legal"]):
        out = model(input_ids=input_ids(2, 3)).logits
    torch.testing.assert_close(out[:1], _alone(model, "code", lambda: logits(model, input_ids(2, 3)[:1])), rtol=1e-5, atol=1e-5)


def test_base_output_kept_by_a_hook_is_not_changed(model):
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    ids = input_ids(2, 4)

    def base_output_seen_by_hook(context) -> torch.Tensor:
        seen = []
        handle = layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out))
        with torch.no_grad(), context:
            model(input_ids=ids)
        handle.remove()
        return seen[0]

    in_mixed = base_output_seen_by_hook(mixed_batch(model, ["legal", "code"]))
    torch.testing.assert_close(in_mixed, base_output_seen_by_hook(disable_adapters(model)), rtol=0, atol=0)
