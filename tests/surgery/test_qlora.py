"""LoRA on a 4-bit base (QLoRA): forward parity with dense LoRA, training touches adapters only, every way of getting
a 4-bit base (quantize_model, transformers' BitsAndBytesConfig, Lightning's BitsandbytesPrecision), PEFT interop."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_lora import LoRAConfig, QuantConfig, apply_lora, merge_lora, quantize_model, save_adapter
from lightning_lora.surgery import LoRALayer, count_parameters, load_adapter, lora_layers
from lightning_lora.surgery.quant.bnb4bit import dequantize, is_linear4bit, keep_portable_layout_, to_dense_linear
from tests.factories import input_ids, logits, perturb_lora_B, state_snapshot, tiny_llama

bnb = pytest.importorskip("bitsandbytes")

QV = LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])
ALL_LINEAR = LoRAConfig(r=4, alpha=8, targets="all-linear")


def qlora_llama(config: LoRAConfig = ALL_LINEAR, seed: int = 0) -> nn.Module:
    model = tiny_llama(num_layers=2, seed=seed)
    quantize_model(model, QuantConfig())
    apply_lora(model, config)
    return model


def dense_twin(qlora: nn.Module) -> nn.Module:
    """The same model with every 4-bit base replaced by a dense nn.Linear holding dequant(W4)."""
    twin = copy.deepcopy(qlora)
    for path, module in list(twin.named_modules()):
        if is_linear4bit(module):
            parent, _, child = path.rpartition(".")
            setattr(twin.get_submodule(parent), child, to_dense_linear(module, dequantize(module)))
    return twin


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def test_adapters_are_fp32_on_a_4bit_base_and_codec_is_linear4bit() -> None:
    model = qlora_llama()
    layers = lora_layers(model)
    assert len(layers) == 2 * 7
    for _, layer in layers:
        assert layer.codec.name == "Linear4bit" and layer.codec.quantized
        assert layer.lora_A["default"].dtype == torch.float32 and layer.lora_B["default"].dtype == torch.float32


def test_qlora_forward_equals_lora_on_the_dequantized_weights() -> None:
    model = qlora_llama()
    perturb_lora_B(model, std=0.1)
    twin = dense_twin(model)
    assert not any(is_linear4bit(m) for m in twin.modules())
    ids = input_ids()
    torch.testing.assert_close(logits(model, ids), logits(twin, ids), rtol=1e-5, atol=1e-5)
    model.train()
    twin.train()
    torch.testing.assert_close(causal_lm_loss(model, ids), causal_lm_loss(twin, ids), rtol=1e-5, atol=1e-5)


def test_lora_update_is_computed_in_adapter_dtype_and_added_in_output_dtype() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    quantize_model(model, QuantConfig(targets="0", compute_dtype="bfloat16"))
    apply_lora(model, LoRAConfig(r=2, targets="0"))
    perturb_lora_B(model)
    layer = model[0]
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16  # the base returns the input's dtype; the update is cast to it once
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    update = (x.float() @ a.T @ b.T) * layer.specs["default"].scale  # fp32, as the adapters are
    torch.testing.assert_close(out, layer.base_layer(x) + update.to(torch.bfloat16))


def test_training_steps_reduce_loss_and_change_only_adapters() -> None:
    model = qlora_llama()
    model.train()
    frozen = {k: v for k, v in state_snapshot(model).items() if ".lora_" not in k}
    adapters_before = {k: v for k, v in state_snapshot(model).items() if ".lora_" in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(lora_layers(model))
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = input_ids(batch=4, seq=16)
    losses = []
    for _ in range(6):
        loss = causal_lm_loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    for key, value in frozen.items():  # packed 4-bit data, absmax, nested stats, norms, embeddings: bit for bit
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert any(k.endswith("weight.absmax") for k in frozen) and any(k.endswith("quant_state.bitsandbytes__nf4") for k in frozen)
    changed = [k for k, v in adapters_before.items() if not torch.equal(after[k], v)]
    assert sorted(changed) == sorted(k for k in adapters_before if ".lora_B." in k or ".lora_A." in k)


def test_parameter_count_counts_packed_weights_as_their_dense_size() -> None:
    dense = tiny_llama(num_layers=2)
    _, total_dense = count_parameters(dense)
    quantize_model(dense, QuantConfig())
    _, total_quantized = count_parameters(dense)
    assert total_quantized == total_dense
    report = apply_lora(dense, QV)
    assert report.total_params == total_dense + report.adapter_params
    assert report.trainable_params == report.adapter_params


@pytest.fixture(scope="module")
def hf_4bit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    # hidden 64 / MLP 128: widths that bitsandbytes' AVX512-BF16 CPU inference path also accepts
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_4bit(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu", dtype=torch.float32)


def test_lora_on_a_transformers_bitsandbytes_model(hf_4bit_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = load_4bit(hf_4bit_dir)
    assert is_linear4bit(model.model.layers[0].self_attn.q_proj)
    report = apply_lora(model, QV)
    assert len(report.replaced) == 4
    assert all(layer.codec.name == "Linear4bit" for _, layer in lora_layers(model))
    perturb_lora_B(model)
    for module in model.modules():
        keep_portable_layout_(module)  # compare exact fp32 paths whatever the CPU (see keep_portable_layout_)
    ids = input_ids(seq=12)
    twin = dense_twin(model)
    torch.testing.assert_close(logits(model, ids), logits(twin, ids), rtol=1e-5, atol=1e-5)
    model.train()
    causal_lm_loss(model, ids).backward()
    grads = [layer.lora_A["default"].grad for _, layer in lora_layers(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    reference = logits(model, ids)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALayer) or is_linear4bit(m) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), reference, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")  # a plain model now: no quantization_config left behind
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert type(reloaded.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(reloaded, ids), reference, rtol=1e-5, atol=1e-5)


def test_adapter_trained_on_4bit_loads_onto_the_full_precision_base_with_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    full = tiny_llama(num_layers=2)
    model = copy.deepcopy(full)
    quantize_model(model, QuantConfig())
    apply_lora(model, QV)
    perturb_lora_B(model)
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(full), tmp_path / "adapter").eval()
    expected = merge_lora(copy.deepcopy(model), merge_base="original", original=full)  # W_orig + s B A
    ids = input_ids()
    torch.testing.assert_close(logits(peft_model, ids), logits(expected, ids), rtol=1e-5, atol=1e-5)
    ours = copy.deepcopy(full)
    load_adapter(ours, tmp_path / "adapter")
    torch.testing.assert_close(logits(ours, ids), logits(expected, ids), rtol=1e-5, atol=1e-5)


def test_lightning_bitsandbytes_precision_converted_base_by_hand_on_cpu() -> None:
    from lightning.pytorch.plugins import BitsandbytesPrecision

    model = tiny_llama(num_layers=1)
    apply_lora(model, QV)  # LoRA first, as LoRAFinetuning does in setup; the plugin converts later
    perturb_lora_B(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.codec.name == "Linear"
    BitsandbytesPrecision(mode="nf4-dq", dtype=torch.float32, ignore_modules={"lm_head"}).convert_module(model)
    model.to("cpu")  # bitsandbytes quantizes on this move
    assert is_linear4bit(layer.base_layer) and layer.base_layer.weight.dtype == torch.uint8
    assert layer.codec.name == "Linear4bit"  # looked up again after the plugin swapped the class
    assert not is_linear4bit(layer.lora_A) and layer.lora_A["default"].dtype == torch.float32  # factors untouched
    for module in model.modules():
        keep_portable_layout_(module)
    ids = input_ids()
    reference = logits(model, ids)
    merged = merge_lora(model)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    assert not any(is_linear4bit(m) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_lightning_bitsandbytes_precision_trainer_with_lora(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.plugins import BitsandbytesPrecision

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama(num_layers=2)
            apply_lora(self.model, QV)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    module = Module()
    before = {k: v.clone() for k, v in module.state_dict().items() if ".lora_B." in k}
    data = torch.utils.data.DataLoader([input_ids(batch=1, seq=16)[0] for _ in range(4)], batch_size=2)
    trainer = pl.Trainer(accelerator="cuda", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                         plugins=BitsandbytesPrecision(mode="nf4-dq", dtype=torch.bfloat16, ignore_modules={"model.lm_head"}),
                         default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(module, data)
    layer = module.model.model.layers[0].self_attn.q_proj
    assert is_linear4bit(layer.base_layer) and layer.codec.name == "Linear4bit"
    assert layer.lora_A["default"].dtype == torch.float32
    after = module.state_dict()
    assert all(not torch.equal(after[k].cpu(), v.cpu()) for k, v in before.items())
    ids = input_ids().cuda()
    reference = logits(module.model, ids)
    merged = merge_lora(module.model)
    assert not any(is_linear4bit(m) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids).float(), reference.float(), rtol=2e-2, atol=2e-2)
