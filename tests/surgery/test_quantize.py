"""quantize_model / QuantConfig: bitsandbytes 4-bit layers on CPU, validated before anything is replaced."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_lora import LoRAConfig, QuantConfig, QuantizationError, apply_lora, quantize_model
from lightning_lora.surgery import QuantConfigError, SurgeryError, TargetMatchError, plan_quantization
from lightning_lora.surgery.quant.bnb4bit import dequantize, is_linear4bit, weight_bytes
from tests.factories import input_ids, logits, state_snapshot, tiny_gpt2, tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def mlp(width: int = 64, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 8, bias=False)).to(dtype)


# ------------------------------------------------------------------------------------------------ QuantConfig
def test_quant_config_defaults_and_round_trip() -> None:
    cfg = QuantConfig(exclude="lm_head")
    assert (cfg.bits, cfg.quant_type, cfg.double_quant, cfg.blocksize) == (4, "nf4", True, 64)
    assert cfg.targets == ["all-linear"] and cfg.exclude == ["lm_head"]
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.compute_dtype_for(torch.device("cpu")) == torch.float32  # bf16 is ~10x slower on CPU
    assert QuantConfig(compute_dtype="bfloat16").compute_dtype_for(torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quant_type": "int4"}, r"quant_type='int4': must be 'nf4'"),
        ({"bits": 8}, r"bits=8: only 4-bit"),
        ({"blocksize": 48}, r"blocksize=48: must be one of \[32, 64"),
        ({"compute_dtype": "float64"}, r"compute_dtype='float64'"),
        ({"quant_storage": "int8"}, r"quant_storage='int8'"),
        ({"targets": []}, r"targets=\[\]: give at least one pattern"),
        ({"exclude": ["re:("]}, r"not a valid regular expression"),
    ],
)
def test_quant_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(QuantConfigError, match=match):
        QuantConfig(**kwargs)


def test_quant_config_reports_every_problem_at_once() -> None:
    with pytest.raises(QuantConfigError, match=r"(?s)bits=3.*quant_type='x'.*blocksize=7"):
        QuantConfig(bits=3, quant_type="x", blocksize=7)


def test_quant_config_from_dict_names_unknown_keys() -> None:
    with pytest.raises(QuantConfigError, match=r"Unknown QuantConfig field\(s\) \['load_in_4bit'\]"):
        QuantConfig.from_dict({"load_in_4bit": True})


# ------------------------------------------------------------------------------------------------ quantize_model
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_is_x_times_dequantized_weight(quant_type: str, double_quant: bool) -> None:
    model = mlp()
    dense = model[0].weight.detach().clone()
    report = quantize_model(model, QuantConfig(quant_type=quant_type, double_quant=double_quant, targets=["0", "2"]))
    assert report.replaced == ["0", "2"] and report.compute_dtype == "float32"
    layer = model[0]
    assert is_linear4bit(layer) and layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert layer.weight.quant_state.quant_type == quant_type and layer.weight.quant_state.nested == double_quant
    w = dequantize(layer)  # (out, in)
    assert w.shape == dense.shape and w.dtype == torch.float32
    assert 0 < (w - dense).norm() / dense.norm() < 0.15  # quantized, but close (NF4 ~0.09 on N(0,1) weights)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)
    layer.eval()
    with torch.no_grad():  # eval / no-grad goes through the same path (no AVX512-BF16 repacking)
        torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-5, atol=1e-5)
    assert layer.weight.quant_state.dtype == torch.float32


def test_llama_all_linear_keeps_head_and_stays_close() -> None:
    model = tiny_llama()
    ids = input_ids()
    before = logits(model, ids)
    report = quantize_model(model)
    assert "lm_head" not in report.replaced and len(report.replaced) == 4 * 7
    assert not is_linear4bit(model.lm_head) and is_linear4bit(model.model.layers[0].mlp.down_proj)
    after = logits(model, ids)
    assert after.shape == before.shape and 0 < (after - before).abs().max() < 1.0
    assert "28 layers" in str(report)


def test_exclude_and_explicit_targets() -> None:
    model = tiny_llama(num_layers=2)
    report = quantize_model(model, QuantConfig(targets=["q_proj", "v_proj", "lm_head"], exclude=["lm_head"]))
    assert report.replaced == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert report.skipped == [("lm_head", "excluded")]


def test_memory_is_under_030x_bf16_with_double_quant() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(4)])
    report = quantize_model(model, QuantConfig(targets="re:\\d"))
    assert report.params == 4 * 256 * 256 and report.bytes_before == 4 * report.params  # fp32 before
    assert report.ratio_vs_bf16 <= 0.30
    assert 4.1 < report.bits_per_param < 4.2  # NF4 + double quantization: ~4.13 bits per weight
    assert weight_bytes(model) == report.bytes_after  # nothing else holds weights here
    plain = quantize_model(nn.Sequential(nn.Linear(256, 256, bias=False)), QuantConfig(targets="0", double_quant=False))
    assert plain.bits_per_param == pytest.approx(4.5)  # one fp32 scale per 64 weights


def test_quant_storage_bf16_packs_into_bf16_and_adapters_stay_fp32() -> None:
    model = mlp()
    quantize_model(model, QuantConfig(targets=["0"], quant_storage="bfloat16"))
    assert model[0].weight.dtype == torch.bfloat16 and model[0].weight.numel() == 64 * 64 // 4
    apply_lora(model, LoRAConfig(r=2, targets=["0"]))
    assert model[0].lora_A["default"].dtype == torch.float32  # not the storage dtype


def test_skips_layers_it_cannot_replace_and_says_why() -> None:
    model = tiny_gpt2()  # Conv1D everywhere except the (tied) head
    with pytest.raises(QuantizationError, match=r"(?s)left no nn.Linear layer.*Conv1D is not nn.Linear"):
        quantize_model(model)
    mha = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16))
    paths, skipped = plan_quantization(mha, QuantConfig(targets=["out_proj", "1"]))
    assert paths == ["1"] and "MultiheadAttention" in skipped[0][1]


def test_already_quantized_layers_are_skipped() -> None:
    model = mlp()
    quantize_model(model, QuantConfig(targets=["0"]))
    report = quantize_model(model, QuantConfig(targets=["0", "2"]))
    assert report.replaced == ["2"] and report.skipped == [("0", "already 4-bit")]


def test_unsupported_layers_are_named_and_nothing_changes() -> None:
    model = nn.Sequential(nn.Linear(8, 8).double(), nn.Linear(8, 8), nn.Linear(3, 3))
    before = state_snapshot(model)
    with pytest.raises(QuantizationError, match=r"(?s)'0': weight dtype torch.float64.*'2': 9 weights pack into 5 bytes"):
        quantize_model(model, QuantConfig(targets=["0", "1", "2"], quant_storage="bfloat16"))
    assert not any(is_linear4bit(m) for m in model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_meta_and_tied_weights_are_refused() -> None:
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(QuantizationError, match=r"'0': weight is on the meta device"):
        quantize_model(meta, QuantConfig(targets="0"))
    tied = tiny_llama(num_layers=1, tie=True)
    with pytest.raises(QuantizationError, match=r"'lm_head': weight is shared with \['model.embed_tokens.weight'\]"):
        quantize_model(tied, QuantConfig(targets="lm_head"))


def test_unmatched_pattern_lists_closest_names() -> None:
    with pytest.raises(TargetMatchError, match=r"quantize target pattern 'q_projj' matched no module.*q_proj"):
        quantize_model(tiny_llama(num_layers=1), QuantConfig(targets=["q_projj"]))


def test_refuses_a_model_that_already_has_lora() -> None:
    model = mlp()
    apply_lora(model, LoRAConfig(r=2, targets=["0"]))
    with pytest.raises(SurgeryError, match=r"already has LoRA layers\. Quantize the base first"):
        quantize_model(model, QuantConfig(targets=["2"]))


def test_missing_bitsandbytes_gives_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-lora\[qlora\]'.*pip install bitsandbytes"):
        quantize_model(mlp(), QuantConfig(targets="0"))


def test_importing_the_package_does_not_import_bitsandbytes() -> None:
    code = ("import sys, lightning_lora; from lightning_lora import QuantConfig, quantize_model; "
            "QuantConfig(); assert 'bitsandbytes' not in sys.modules, 'bitsandbytes imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_quant_config_from_a_yaml_config_with_jsonargparse() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--quantize", type=QuantConfig | None, default=None)
    cfg = parser.parse_string("quantize: {quant_type: fp4, blocksize: 128, exclude: [lm_head]}")
    quantize = parser.instantiate_classes(cfg).quantize
    assert quantize == QuantConfig(quant_type="fp4", blocksize=128, exclude=["lm_head"])
    with pytest.raises(Exception, match=r"Expected a typing.Literal\['nf4', 'fp4'\]. Got value: int4"):
        parser.parse_string("quantize: {quant_type: int4}")


def test_transformers_model_declares_its_4bit_layers_and_reloads(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from lightning_lora.surgery.quant.bnb4bit import keep_portable_layout_

    model = tiny_llama(num_layers=2)
    quantize_model(model, QuantConfig(exclude=["down_proj"]))
    declared = model.config.quantization_config
    assert declared.load_in_4bit and declared.bnb_4bit_quant_type == "nf4" and declared.bnb_4bit_use_double_quant
    assert declared.llm_int8_skip_modules == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    ids = input_ids()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert is_linear4bit(reloaded.model.layers[0].self_attn.q_proj)
    assert type(reloaded.model.layers[0].mlp.down_proj) is nn.Linear
    for module in reloaded.modules():
        keep_portable_layout_(module)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=0)
