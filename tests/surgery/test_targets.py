"""Target selection: names, ``re:`` regexes, presets, ``exclude``, ``layers``; what is skipped and why; the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_lora.surgery import (
    LoRAConfig,
    LoRAConfigError,
    LoRALayer,
    SurgeryError,
    TargetMatchError,
    apply_lora,
    lora_layers,
    merge_lora,
    plan_lora,
)
from lightning_lora.surgery.lora.targets import block_index
from tests.factories import FAMILIES, perturb_lora_B, tiny_bert, tiny_llama, unchanged

LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]

# Per family: (module path of block N, with {i}), attention leaf paths, MLP leaf paths, linear layers outside blocks.
PRESETS = {
    "llama": ("model.layers.{i}.", [f"self_attn.{n}" for n in LLAMA_ATTN], [f"mlp.{n}" for n in LLAMA_MLP], []),
    "gpt2": ("transformer.h.{i}.", ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"], []),
    "bert": ("bert.encoder.layer.{i}.",
             ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
             ["intermediate.dense", "output.dense"], ["bert.pooler.dense"]),
    "opt": ("model.decoder.layers.{i}.", ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj"],
            ["fc1", "fc2"], []),
    "phi": ("model.layers.{i}.", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"],
            ["mlp.fc1", "mlp.fc2"], []),
}


def names(model: nn.Module, **kwargs: object) -> list[str]:
    return plan_lora(model, LoRAConfig(**kwargs)).names


def in_blocks(family: str, leaves: list[str], blocks: range) -> set[str]:
    prefix = PRESETS[family][0]
    return {prefix.format(i=i) + leaf for i in blocks for leaf in leaves}


# ------------------------------------------------------------------------------------------------ selection
def test_names_match_the_path_or_its_last_components() -> None:
    model = tiny_llama()
    assert names(model, targets=["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{n}" for i in range(4) for n in ("q_proj", "v_proj")
    ]
    assert names(model, targets=["self_attn.q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    assert names(model, targets=["model.layers.2.mlp.up_proj"]) == ["model.layers.2.mlp.up_proj"]
    assert names(model, targets="q_proj") == names(model, targets=["q_proj"])  # a string is one pattern
    # A component must match whole: "proj" is not a suffix component of "q_proj".
    with pytest.raises(TargetMatchError, match="'proj' matched no module"):
        names(model, targets=["proj"])


def test_regex_targets_full_match_the_path() -> None:
    model = tiny_llama()
    assert names(model, targets=[r"re:.*\.layers\.[01]\.self_attn\.(q|v)_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    with pytest.raises(TargetMatchError, match="'re:q_proj' matched no module"):  # full match, not search
        names(model, targets=["re:q_proj"])


@pytest.mark.parametrize("family", sorted(PRESETS))
def test_presets_on_every_family(family: str) -> None:
    model = FAMILIES[family]()
    _, attention, mlp, outside = PRESETS[family]
    blocks = range(len({block_index(n) for n in names(model, targets="all-linear")} - {None}))
    assert len(blocks) == 2 or family == "llama"
    assert set(names(model, targets="attention")) == in_blocks(family, attention, blocks)
    assert set(names(model, targets="mlp")) == in_blocks(family, mlp, blocks)
    assert set(names(model, targets="all-linear")) == in_blocks(family, attention + mlp, blocks) | set(outside)
    # the output head never gets a low-rank adapter under "all-linear"
    assert not {"lm_head", "classifier"} & set(names(model, targets="all-linear"))


@pytest.mark.parametrize("family", sorted(PRESETS))
def test_all_linear_leaves_out_the_head_of_a_network_held_by_a_lightning_module(family: str) -> None:
    """Adapting a LightningModule that holds the network as ``self.model`` selects the same layers (with the
    ``model.`` prefix) as adapting the network: its ``lm_head`` / ``classifier`` stays out."""
    from lightning.pytorch import LightningModule

    holder = LightningModule()
    holder.model = FAMILIES[family]()
    direct = names(FAMILIES[family](), targets="all-linear")
    assert names(holder, targets="all-linear") == [f"model.{n}" for n in direct]


def test_gpt2_attention_and_mlp_c_proj_are_told_apart() -> None:
    model = FAMILIES["gpt2"]()
    assert names(model, targets="attention", layers=[0]) == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    assert names(model, targets="mlp", layers=[0]) == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert names(model, targets=["attn.c_proj"]) == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]


def test_bert_attention_output_dense_is_attention_and_output_dense_is_mlp() -> None:
    model = tiny_bert()
    attention, mlp = set(names(model, targets="attention")), set(names(model, targets="mlp"))
    assert "bert.encoder.layer.0.attention.output.dense" in attention - mlp
    assert {"bert.encoder.layer.0.output.dense", "bert.encoder.layer.0.intermediate.dense"} <= mlp - attention
    assert "bert.pooler.dense" not in attention | mlp  # outside any block


def test_exclude_removes_matches_and_reports_them() -> None:
    plan = plan_lora(tiny_llama(), LoRAConfig(targets="all-linear", exclude=["o_proj", r"re:.*\.layers\.0\..*"]))
    assert len(plan.names) == 3 * 6
    assert not [n for n in plan.names if n.endswith("o_proj") or ".layers.0." in n]
    assert ("model.layers.0.mlp.up_proj", "excluded") in plan.skipped
    assert ("model.layers.3.self_attn.o_proj", "excluded") in plan.skipped


@pytest.mark.parametrize(("layers", "blocks"), [
    ([0, -1], {0, 3}), ([-2], {2}), ("-2:", {2, 3}), ("0:1", {0}), ("::2", {0, 2}), (" 1 : 3 ", {1, 2}), ("-8:", {0, 1, 2, 3}),
])
def test_layers_as_indices_and_slices(layers: list[int] | str, blocks: set[int]) -> None:
    plan = plan_lora(tiny_llama(), LoRAConfig(targets=["q_proj", "down_proj"], layers=layers))
    assert {layer.block for layer in plan.layers} == blocks
    assert len(plan) == 2 * len(blocks)
    assert all(reason == f"outside layers={LoRAConfig(layers=layers).layers!r}" for _, reason in plan.skipped)


def test_layers_leave_out_modules_outside_blocks() -> None:
    plan = plan_lora(tiny_bert(), LoRAConfig(targets="all-linear", layers=[-1]))
    assert "bert.pooler.dense" not in plan.names
    assert ("bert.pooler.dense", "outside layers=[-1]") in plan.skipped


def test_modules_to_save_are_not_wrapped() -> None:
    plan = plan_lora(tiny_llama(), LoRAConfig(targets=["re:.*"], modules_to_save=["layers.0"], layers=[0, 1]))
    assert [n for n in plan.names if ".layers.0." in n] == []
    assert ("model.layers.0.self_attn.q_proj", "in modules_to_save (trained fully instead)") in plan.skipped
    assert any(reason.startswith("Embedding is not a supported layer type") for _, reason in plan.skipped)


def test_plan_does_not_change_the_model() -> None:
    model = tiny_llama()
    with unchanged(model):
        plan = plan_lora(model, LoRAConfig(targets="all-linear", modules_to_save=["lm_head"]))
    assert len(plan) == 28 and "28 layers" in str(plan)


# ------------------------------------------------------------------------------- the real SmolLM2-135M shape
def test_plan_on_smollm2_135m_shape_lists_the_56_linear_layers_of_the_last_8_blocks() -> None:
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):  # no memory, no init cost: the plan needs shapes only
        model = LlamaForCausalLM(config)
    plan = plan_lora(model, LoRAConfig(targets="all-linear", layers="-8:"))
    assert plan.names == [f"model.layers.{i}.{part}.{n}" for i in range(22, 30)
                          for part, group in (("self_attn", LLAMA_ATTN), ("mlp", LLAMA_MLP)) for n in group]
    shapes = {layer.name.rsplit(".", 1)[-1]: (layer.in_features, layer.out_features) for layer in plan.layers}
    assert shapes == {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
                      "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    assert plan.adapter_params == 8 * 16 * (2 * 1152 + 2 * 768 + 3 * 2112)  # r=16 * (in + out), 7 layers a block
    assert {layer.block for layer in plan.layers} == set(range(22, 30))


# ------------------------------------------------------------------------------- Lightning's demo transformer
@pytest.fixture
def demo() -> nn.Module:
    from lightning.pytorch.demos.transformer import LightningTransformer

    torch.manual_seed(0)
    return LightningTransformer(vocab_size=64).eval()


def demo_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 64, (2, 8), generator=generator), torch.randint(0, 64, (2, 8), generator=generator)


def test_demo_transformer_skips_multihead_attention_out_proj_with_a_reason(demo: nn.Module) -> None:
    plan = plan_lora(demo, LoRAConfig(targets="all-linear"))
    mha = [n for n, m in demo.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(mha) == 6
    skipped = dict(plan.skipped)
    for path in mha:
        assert "nn.MultiheadAttention" in skipped[f"{path}.out_proj"]
        assert f"{path}.out_proj" not in plan.names
    assert "model.transformer.encoder.layers.0.linear1" in plan.names


def test_all_linear_leaves_out_the_demo_transformers_decoder_head(demo: nn.Module) -> None:
    """Its head is a plain ``decoder`` Linear onto the vocabulary: no name or get_output_embeddings finds it."""
    plan = plan_lora(demo, LoRAConfig(targets="all-linear"))
    assert "model.decoder" not in plan.names
    assert len(plan.names) == 8  # linear1 / linear2 of 2 encoder + 2 decoder layers


def test_attention_on_multihead_attention_says_what_to_target_instead(demo: nn.Module) -> None:
    with pytest.raises(TargetMatchError, match=r"(?s)in_proj_weight.*use targets=\['linear1', 'linear2'\]"):
        plan_lora(demo, LoRAConfig(targets="attention"))


def test_demo_transformer_eval_output_includes_the_adapter(demo: nn.Module) -> None:
    """nn.TransformerEncoderLayer has a fused eval/no_grad fast path that reads ``linear1.weight`` directly and would
    silently bypass a wrapper: the eval output must differ from the base and equal the merged model's output."""
    inputs, target = demo_inputs()
    with torch.no_grad():
        base = demo.model(inputs, target)
    report = apply_lora(demo, LoRAConfig(r=4, targets=["linear1", "linear2"]))
    assert len(report.replaced) == 8
    perturb_lora_B(demo)
    demo.eval()
    with torch.no_grad():
        adapted = demo.model(inputs, target)
        encoder_layer = demo.model.transformer.encoder.layers[0]
        x = torch.randn(2, 8, 200, generator=torch.Generator().manual_seed(1))
        layer_adapted = encoder_layer(x)
    merged = merge_lora(copy.deepcopy(demo))
    assert not lora_layers(merged)
    with torch.no_grad():
        merged_out = merged.model(inputs, target)
        layer_merged = merged.model.transformer.encoder.layers[0](x)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(adapted, merged_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer_adapted, layer_merged, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- errors
def test_unmatched_patterns_list_the_closest_names_each() -> None:
    model = tiny_llama()
    with unchanged(model), pytest.raises(TargetMatchError) as info:
        apply_lora(model, LoRAConfig(targets=["q_prj", "v_proj", "mlp.gate"]))
    message = str(info.value)
    assert "target pattern 'q_prj' matched no module (closest module names: q_proj" in message
    assert "target pattern 'mlp.gate' matched no module (closest module names:" in message
    assert "'v_proj'" not in message
    assert not lora_layers(model)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(exclude=["o_prj"]), TargetMatchError, r"exclude pattern 'o_prj' matched no module \(closest module names: o_proj"),
    (dict(modules_to_save=["lm_hed"]), TargetMatchError,
     r"modules_to_save pattern 'lm_hed' matched no module \(closest module names: lm_head"),
    (dict(layers=[0, 4, -5]), LoRAConfigError,
     r"indices \[4, -5\] are out of range; the model has 4 blocks, valid indices are -4\.\.3"),
    (dict(layers="7:"), LoRAConfigError, r"layers='7:' selects no block of the model's 4 blocks \(0\.\.3\)"),
    (dict(exclude=["q_proj"]), TargetMatchError, r"left no layer to adapt(.|\n)*q_proj: excluded"),
    (dict(targets=["embed_tokens"]), TargetMatchError, r"embed_tokens: Embedding is not a supported layer type \(.*Linear"),
])
def test_selection_errors_leave_the_model_unchanged(kwargs: dict, error: type, match: str) -> None:
    model = tiny_llama()
    with unchanged(model), pytest.raises(error, match=match):
        apply_lora(model, LoRAConfig(**{"targets": ["q_proj"], **kwargs}))
    assert not lora_layers(model)


def test_layers_on_a_model_without_blocks_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with unchanged(model), pytest.raises(LoRAConfigError, match=r"layers=\[0\], but no module path contains a numbered block"):
        apply_lora(model, LoRAConfig(targets=["0"], layers=[0]))


def test_applying_twice_is_refused_and_changes_nothing() -> None:
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=2, targets=["q_proj"]))
    perturb_lora_B(model)
    twice = r"'model\.layers\.0\.self_attn\.q_proj' already has a LoRA adapter named 'default'\. Applying LoRA twice is refused"
    with unchanged(model), pytest.raises(SurgeryError, match=twice):
        apply_lora(model, LoRAConfig(r=2, targets=["q_proj", "v_proj"]))
    assert not isinstance(model.model.layers[0].self_attn.v_proj, LoRALayer)
    apply_lora(model, LoRAConfig(r=2, targets=["q_proj", "v_proj"]), name="second")  # another name is fine
