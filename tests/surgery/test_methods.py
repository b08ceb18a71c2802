"""Bottleneck adapters, prompt / P- / prefix tuning through the shared surgery: configs, the math, named adapters,
disabling, merging (refused), gradient checkpointing (prefix: refused), 4-bit bases, files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora.surgery import (
    BottleneckConfig,
    BottleneckConfigError,
    LoRAConfig,
    MergeError,
    PrefixTuningConfig,
    PrefixTuningConfigError,
    PromptTuningConfig,
    PromptTuningConfigError,
    PTuningConfig,
    PTuningConfigError,
    SurgeryError,
    adapter_parameters,
    apply_peft,
    delete_adapter,
    disable_adapters,
    get_active_adapters,
    list_adapters,
    load_adapter,
    merge_lora,
    plan_peft,
    save_adapter,
    set_active_adapters,
)
from tests.factories import input_ids, logits, tiny_llama, unchanged

ALL = {
    "bottleneck": BottleneckConfig(size=4, nonlinearity="gelu"),  # relu units of a size-4 adapter can all be dead
    "prompt": PromptTuningConfig(num_virtual_tokens=3),
    "p_tuning": PTuningConfig(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8),
    "prefix": PrefixTuningConfig(num_virtual_tokens=3, projection=True),
}


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(("build", "error", "match"), [
    (lambda: PromptTuningConfig(num_virtual_tokens=0), PromptTuningConfigError, r"num_virtual_tokens=0"),
    (lambda: PromptTuningConfig(init="text"), PromptTuningConfigError, r"init='text' needs init_text"),
    (lambda: PromptTuningConfig(init="words"), PromptTuningConfigError, r"init='words': must be one of"),
    (lambda: PTuningConfig(encoder="gru", encoder_dropout=1.5), PTuningConfigError,
     r"encoder='gru'(.|\n)*encoder_dropout=1.5"),
    (lambda: PrefixTuningConfig(projection_hidden_size=8), PrefixTuningConfigError, r"only used with projection=True"),
    (lambda: BottleneckConfig(size=8, reduction_factor=4), BottleneckConfigError, r"give one of them"),
    (lambda: BottleneckConfig(placement="middle", nonlinearity="tanh"), BottleneckConfigError,
     r"placement='middle'(.|\n)*nonlinearity='tanh'"),
    (lambda: BottleneckConfig(layers="x"), BottleneckConfigError, r"layers='x'"),
])
def test_configs_refuse_bad_values_naming_them(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_configs_are_frozen_values_with_a_dict_round_trip():
    cfg = BottleneckConfig(reduction_factor=8, layers="-1:")
    assert BottleneckConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(BottleneckConfigError, match="Unknown BottleneckConfig field"):
        BottleneckConfig.from_dict({"sise": 3})
    with pytest.raises(AttributeError):
        cfg.size = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ bottleneck math
class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.Module()
        self.self_attn.v_proj, self.self_attn.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.up_proj, self.mlp.down_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(x @ x.transpose(-1, -2), dim=-1)
        x = x + self.self_attn.o_proj(weights @ self.self_attn.v_proj(self.norm1(x)))
        return x + self.mlp.down_proj(F.gelu(self.mlp.up_proj(self.norm2(x))))


class _Tiny(nn.Module):
    def __init__(self, d: int = 8, n: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(d) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def _reference(model: _Tiny, x: torch.Tensor, weights: dict[str, torch.Tensor], placement: str) -> torch.Tensor:
    """Houlsby et al. 2019 (fig. 2) / Pfeiffer et al. 2020, written out: ``a(h) = h + W_u relu(W_d h + b_d) + b_u``
    on the sublayer output, before the residual addition."""
    def adapter(h: torch.Tensor, site: str) -> torch.Tensor:
        w = {k[len(site) + 1:]: v for k, v in weights.items() if k.startswith(site + ".")}
        return h + torch.relu(h @ w["down.weight"].T + w["down.bias"]) @ w["up.weight"].T + w["up.bias"]

    def linear(layer: nn.Linear, h: torch.Tensor) -> torch.Tensor:  # the bare layer, without the adapter's hook
        return F.linear(h, layer.weight, layer.bias)

    for i, b in enumerate(model.layers):
        attn = torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ linear(b.self_attn.v_proj, b.norm1(x))
        attn = linear(b.self_attn.o_proj, attn)
        if placement == "houlsby":
            attn = adapter(attn, f"layers.{i}.self_attn.o_proj")
        x = x + attn
        mlp = adapter(linear(b.mlp.down_proj, F.gelu(linear(b.mlp.up_proj, b.norm2(x)))), f"layers.{i}.mlp.down_proj")
        x = x + mlp
    return x


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_bottleneck_matches_a_hand_written_reference(tmp_path, placement):
    torch.manual_seed(0)
    model, x = _Tiny(), torch.randn(2, 5, 8)
    base = model(x).detach()
    apply_peft(model, BottleneckConfig(size=3, placement=placement))
    torch.testing.assert_close(model(x), base, atol=0, rtol=0)  # zero-up init: exactly unchanged
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.normal_(0, 0.3)
    save_adapter(model, tmp_path / "b")
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert len(weights) == 4 * (4 if placement == "houlsby" else 2)
    torch.testing.assert_close(model(x), _reference(model, x, weights, placement), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(model(x), base, atol=1e-3)


def test_bottleneck_files_round_trip_bit_exactly(tmp_path):
    model = tiny_llama()
    apply_peft(model, BottleneckConfig(reduction_factor=8, layers=[0, -1], nonlinearity="swish"))
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.normal_(0, 0.2)
    save_adapter(model, tmp_path / "b")
    again = tiny_llama()
    load_adapter(again, tmp_path / "b")
    ids = input_ids()
    assert torch.equal(logits(model, ids), logits(again, ids))
    other = tiny_llama(num_layers=2)
    with unchanged(other), pytest.raises(Exception, match="does not fit"):
        load_adapter(other, tmp_path / "b")


# ------------------------------------------------------------------------------------------------ shared surgery
@pytest.mark.parametrize("method", list(ALL))
def test_plan_counts_what_apply_adds_and_a_step_trains_only_the_adapter(method):
    model = tiny_llama()
    with unchanged(model):
        plan = plan_peft(model, ALL[method])
    total = sum(p.numel() for p in model.parameters())
    report = apply_peft(model, ALL[method])
    assert report.trainable_params == plan.adapter_params == sum(p.numel() for p in model.parameters()) - total
    params = adapter_parameters(model, "default")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = input_ids()
    if method == "bottleneck":  # the up projection starts at zero: give the down projection a gradient first
        with torch.no_grad():
            for n, p in params.items():
                if ".up." in n:
                    p.normal_(0, 0.1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(params)


def test_named_adapters_switch_and_disable_per_method():
    model = tiny_llama()
    ids = input_ids()
    base = logits(model, ids)
    apply_peft(model, LoRAConfig(r=2), name="lora")
    apply_peft(model, BottleneckConfig(size=2), name="neck")
    apply_peft(model, PromptTuningConfig(num_virtual_tokens=2), name="prompt")
    apply_peft(model, PrefixTuningConfig(num_virtual_tokens=2), name="prefix")
    assert list_adapters(model) == ["lora", "neck", "prompt", "prefix"]
    assert set(get_active_adapters(model)) == {"lora", "neck", "prefix"}  # one virtual-token adapter at a time
    with_prefix = logits(model, ids)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, ids), with_prefix, atol=0, rtol=0)
    set_active_adapters(model, ["prompt"])
    assert not torch.allclose(logits(model, ids), with_prefix)
    set_active_adapters(model, ["prompt", "prefix"])
    with pytest.raises(SurgeryError, match=r"one at a time"):
        logits(model, ids)
    delete_adapter(model, "prefix")
    delete_adapter(model, "prompt")
    set_active_adapters(model, [])
    torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)


def test_name_clash_is_refused_before_any_change():
    model = tiny_llama()
    apply_peft(model, PromptTuningConfig(num_virtual_tokens=2))
    with unchanged(model), pytest.raises(SurgeryError, match="already has an adapter named 'default'"):
        apply_peft(model, BottleneckConfig(size=2))


@pytest.mark.parametrize("method", list(ALL))
def test_merge_lora_refuses_other_methods_saying_why_and_what_to_do(method):
    model = tiny_llama()
    apply_peft(model, ALL[method])
    with unchanged(model), pytest.raises(MergeError, match=r"cannot merge 'default' is .*HINT: serve the model "
                                                          r"unmerged"):
        merge_lora(model)


def test_prefix_tuning_refuses_gradient_checkpointing_clearly():
    model = tiny_llama()
    apply_peft(model, PrefixTuningConfig(num_virtual_tokens=2))
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(SurgeryError, match="Prefix tuning cannot train under gradient checkpointing"):
        model(input_ids=input_ids(), labels=input_ids())


def test_prompt_tuning_trains_under_gradient_checkpointing():
    model = tiny_llama()
    apply_peft(model, PromptTuningConfig(num_virtual_tokens=2))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model(input_ids=input_ids(), labels=input_ids()).loss.backward()
    assert all(p.grad is not None for p in adapter_parameters(model).values())


def test_virtual_tokens_need_a_transformers_causal_lm():
    from tests.factories import tiny_bert

    with pytest.raises(SurgeryError, match="needs a transformers model"):
        apply_peft(nn.Sequential(nn.Linear(2, 2)), PromptTuningConfig())
    model = tiny_bert()
    with unchanged(model), pytest.raises(SurgeryError, match=r"causal language models.*BertForSequenceClassification"):
        apply_peft(model, PrefixTuningConfig())
    apply_peft(model, BottleneckConfig(size=2))  # bottleneck adapters fit any transformer with recognisable blocks


@pytest.mark.parametrize("method", list(ALL))
def test_methods_train_on_a_4bit_base(method):
    pytest.importorskip("bitsandbytes")
    from lightning_lora.surgery import QuantConfig, quantize_model

    model = tiny_llama()
    quantize_model(model, QuantConfig())
    apply_peft(model, ALL[method])
    params = adapter_parameters(model)
    if method == "bottleneck":
        with torch.no_grad():
            for n, p in params.items():
                if ".up." in n:
                    p.normal_(0, 0.1)
    model.train()
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in params)


def test_lora_only_features_refuse_other_methods_by_name(tmp_path):
    from lightning_lora.surgery import (
        CombineError,
        MixedBatchError,
        combine_adapters,
        load_adapters,
        mixed_batch,
        save_adapters,
        unload_lora,
    )

    model = tiny_llama()
    apply_peft(model, LoRAConfig(r=2), name="lora")
    apply_peft(model, PromptTuningConfig(num_virtual_tokens=2), name="prompt")
    model.eval()
    with pytest.raises(MixedBatchError, match=r"mixed_batch works with LoRA adapters only; 'prompt' \(prompt tuning\)"):
        with mixed_batch(model, ["lora", "prompt"]):
            pass
    with pytest.raises(CombineError, match=r"combine_adapters works with LoRA adapters only; 'prompt'"):
        combine_adapters(model, ["lora", "prompt"], name="both")
    ids = input_ids()
    expected = logits(model, ids)
    save_adapters(model, tmp_path / "all")
    again = tiny_llama().eval()
    load_adapters(again, tmp_path / "all", active=["lora", "prompt"])
    assert list_adapters(again) == ["lora", "prompt"]
    torch.testing.assert_close(logits(again, ids), expected, atol=0, rtol=0)
    unload_lora(again)  # LoRA goes, the prompt adapter stays
    assert list_adapters(again) == ["prompt"]


def test_readme_methods_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Other methods: prompt tuning"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["out"].shape == (2, 9)
    assert (tmp_path / "out/prefix/adapter_model.safetensors").is_file()
    assert list_adapters(namespace["fresh"]) == ["default"]


def test_layer_freezing_adds_blocks_to_another_methods_adapter():
    from lightning_lora.surgery.training.freeze import train_only

    model = tiny_llama()
    apply_peft(model, PromptTuningConfig(num_virtual_tokens=2))
    names = train_only(model, blocks=[-1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names) | set(adapter_parameters(model))  # the prompt stays trainable
    assert all(".layers.3." in n for n in names)


def test_prompt_init_from_text_and_vocab_uses_the_models_embeddings(tmp_path):
    from tests.tiny_lm import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    model = tiny_llama()
    config = PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="ab", tokenizer=str(tmp_path / "tok"))
    apply_peft(model, config)
    ids = tokenizer("ab")["input_ids"] * 3  # repeated, then cut to the number of virtual tokens (PEFT's rule)
    words = model.get_input_embeddings().weight
    prompts = adapter_parameters(model)["peft_virtual_tokens.encoders.default.embedding.weight"]
    assert torch.equal(prompts, words[ids[:5]])
    other = tiny_llama()
    apply_peft(other, PromptTuningConfig(num_virtual_tokens=4, init="vocab"))
    rows = adapter_parameters(other)["peft_virtual_tokens.encoders.default.embedding.weight"]
    vocab = other.get_input_embeddings().weight
    assert all(any(torch.equal(row, v) for v in vocab) for row in rows)
