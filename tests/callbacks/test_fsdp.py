"""FSDP2 (ModelParallelStrategy) with LoRA: one real 2-process CPU launch (gloo) checked against one-process runs.

The one-process reference trains the same tiny Llama with the same global batch (8) in this process, and writes
the 2-step checkpoint that the 2-process launch resumes (1 -> 2). This process then resumes the launch's 2-step
checkpoint on one process (2 -> 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_lora.callbacks import LoRAFinetuning
from lightning_lora.surgery import ShardConfigError, SurgeryError
from lightning_lora.surgery.training.sharding import (
    ShardConfig,
    check_can_shard,
    find_blocks,
)
from tests.callbacks.fsdp_script import (
    LORA,
    QUANT,
    FSDPLlama,
    checkpointer,
    make_trainer,
)
from tests.callbacks.models import TinyNet
from tests.factories import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
TOL = {"rtol": 1e-4, "atol": 1e-6}  # fp32: the two runs reduce the same sums in another order


def adapters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if ".lora_" in n}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    torch.manual_seed(0)
    reference = FSDPLlama(batch_size=8)
    make_trainer(out, [LoRAFinetuning(LORA, module="model"), checkpointer(out / "one")], devices=1).fit(reference)
    qlora = FSDPLlama(batch_size=8)
    make_trainer(out / "qlora_one", [LoRAFinetuning(LORA, quantize=QUANT, module="model")], devices=1,
                 max_steps=2).fit(qlora)
    save_meta_model(out / "meta_model")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "callbacks" / "fsdp_script.py"), str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    two_to_one = FSDPLlama(batch_size=8)
    make_trainer(out / "two_to_one", [LoRAFinetuning(LORA, module="model")], devices=1).fit(
        two_to_one, ckpt_path=out / "ckpt" / "epoch=0-step=2.ckpt")
    return {"out": out, "reference": adapters(reference), "two_to_one": adapters(two_to_one), "qlora": adapters(qlora),
            "ranks": [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]}


def save_meta_model(path: Path) -> None:
    """A Llama of ~45M parameters (180 MB fp32), large against the noise of a process's RSS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_lm import build_tiny_tokenizer

    config = LlamaConfig(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected) and len(actual) == 8  # 2 blocks x (q, v) x (A, B)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, **TOL, msg=name)
    assert all(expected[n].abs().sum() > 0 for n in expected if ".lora_B." in n)  # trained: B left zero


def test_sharded_training_matches_one_process_and_touches_only_adapters(runs: dict) -> None:
    assert_close(load_file(runs["out"] / "fit_adapters.safetensors"), runs["reference"])
    for rank in runs["ranks"]:
        assert rank["strategy"] == "AdapterModelParallelStrategy"  # switched by LoRAFinetuning
        assert rank["base_unchanged"] and not rank["grads_on_base"]
        assert 0.45 <= rank["local_base"] / rank["logical_base"] <= 0.55  # each rank holds ~half of the base
        assert rank["rank_bytes"] < 0.6 * rank["logical_weight_bytes"]  # TrainableParameters: bytes per rank


def test_adapter_only_checkpoint_resumes_on_two_and_one_processes(runs: dict) -> None:
    out = runs["out"]
    checkpoint = torch.load(out / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)  # one file, plain types
    assert sorted(checkpoint["state_dict"]) == sorted(runs["reference"])  # adapters only, whole tensors
    assert [len(g["param_names"]) for g in checkpoint["optimizer_states"][0]["param_groups"]] == [8]
    fit = load_file(out / "fit_adapters.safetensors")
    resumed = load_file(out / "resume_adapters.safetensors")
    assert all(torch.equal(resumed[n], fit[n]) for n in fit) and sorted(resumed) == sorted(fit)  # 2 -> 2 bitwise
    assert_close(runs["two_to_one"], runs["reference"])  # 2 -> 1
    assert_close(load_file(out / "resume_one_adapters.safetensors"), runs["reference"])  # 1 -> 2


def test_merged_export_of_sharded_model_loads_and_matches_unmerged(runs: dict) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = runs["out"] / "export"
    expected = load_file(runs["out"] / "fit_logits.safetensors")["logits"]
    probe = torch.arange(24).reshape(2, 12) % 128
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert len(list((out / "merged").glob("model-*.safetensors"))) == 3  # one file per block + the rest
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, expected, rtol=1e-4, atol=1e-5)
        peft = PeftModel.from_pretrained(tiny_llama(num_layers=2, seed=0), str(out / "adapter")).eval()
        torch.testing.assert_close(peft(input_ids=probe).logits, expected, rtol=1e-4, atol=1e-5)


def test_lora_with_gradient_checkpointing_and_layer_freezing_under_fsdp(runs: dict) -> None:
    for rank in runs["ranks"]:
        assert rank["mixed_checkpointing"]
        assert rank["mixed_block1_changed"] == rank["mixed_block1_tensors"] == 9  # the block LayerFreezing trains
        assert rank["mixed_block0_changed"] == 0  # embeddings, block 0, norm, head: frozen


def test_qlora_with_float32_quant_storage_trains_sharded_like_one_process(runs: dict) -> None:
    assert_close(load_file(runs["out"] / "qlora_adapters.safetensors"), runs["qlora"])


def test_meta_init_loads_each_ranks_rows_without_the_whole_model(runs: dict) -> None:
    from transformers import AutoModelForCausalLM

    from lightning_lora.surgery.training.fingerprint import model_identity

    for rank in runs["ranks"]:
        assert rank["meta_base_equal"]  # every base weight, gathered, equals the file bitwise
        assert rank["meta_full_bytes"] > 150e6
        # Built on meta, each rank only ever held its shards (~half) plus one slice: well below the whole model.
        assert rank["meta_peak_increase"] < 0.8 * rank["meta_full_bytes"], rank["meta_peak_increase"]
    unsharded = AutoModelForCausalLM.from_pretrained(runs["out"] / "meta_model")
    identity = model_identity(unsharded)
    assert runs["ranks"][0]["meta_identity"]["values_sha256"] == identity["values_sha256"]
    assert runs["ranks"][0]["meta_identity"] == {**identity, "name": runs["ranks"][0]["meta_identity"]["name"]}


def test_mixed_precision_policy_and_no_reshard_take_effect(runs: dict) -> None:
    """bf16 compute changes the trained adapters a little (so the policy was applied), fp32 reduction keeps them close."""
    options = load_file(runs["out"] / "options_adapters.safetensors")
    reference = torch.load(runs["out"] / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)["state_dict"]  # fp32
    assert sorted(options) == sorted(reference)
    diffs = [float((options[n] - reference[n]).abs().max()) for n in reference if ".lora_B." in n]
    assert 0 < max(diffs) < 0.2 * max(float(reference[n].abs().max()) for n in reference if ".lora_B." in n)


def test_refuses_tensor_parallel_and_a_model_sharded_before_the_surgery(runs: dict) -> None:
    for rank in runs["ranks"]:
        assert rank["tensor_parallel"].startswith("SurgeryError") and "tensor_parallel_size=2" in rank["tensor_parallel"]
        assert "data_parallel_size=<number of devices>" in rank["tensor_parallel"]
        assert rank["pre_sharded"].startswith("SurgeryError") and "sharded already" in rank["pre_sharded"]


def test_default_blocks_and_shard_config_errors() -> None:
    assert [p for p, _ in find_blocks(tiny_llama(num_layers=2))] == ["model.layers.0", "model.layers.1"]
    assert [p for p, _ in find_blocks(TinyNet())] == ["layers.0", "layers.1"]  # the class repeated in a ModuleList
    assert [p for p, _ in find_blocks(TinyNet(), lambda path, _: path in ("layers.1", "layers.1.mlp"))] == ["layers.1"]
    with pytest.raises(ShardConfigError, match=r"no module of class \['GPT2Block'\].*LlamaForCausalLM"):
        find_blocks(tiny_llama(num_layers=2), "GPT2Block")
    with pytest.raises(ShardConfigError, match=r"param_dtype='fp8': use one of"):
        ShardConfig(param_dtype="fp8")
    with pytest.raises(SurgeryError, match="tensor_parallel_size=4"):
        check_can_shard(TinyNet(), tensor_parallel_size=4)
    with pytest.raises(TypeError, match="shard=3"):
        LoRAFinetuning(shard=3)  # type: ignore[arg-type]
    assert LoRAFinetuning(shard="LlamaDecoderLayer").shard == ShardConfig(blocks="LlamaDecoderLayer")
    assert LoRAFinetuning(shard={"reshard_after_forward": False}).shard == ShardConfig(reshard_after_forward=False)
    with pytest.raises(ShardConfigError, match="no module chosen by"):
        find_blocks(TinyNet(), lambda path, module: False)


def test_fsdp_example_config_runs_on_two_cpu_processes(tmp_path: Path) -> None:
    """``lightning-lora fit --config examples/fsdp.yaml --trainer.accelerator cpu --trainer.devices 2``, tiny model."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_lm import save_tiny_causal_lm

    model = save_tiny_causal_lm(tmp_path / "tiny-llama")
    data = ROOT / "examples" / "data" / "dates"
    command = [sys.executable, "-m", "lightning_lora.cli", "fit", "--config", str(ROOT / "examples" / "fsdp.yaml"),
               "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--model.model", str(model),
               "--data.train_file", str(data / "train.jsonl"), "--data.val_file", str(data / "val.jsonl"),
               "--trainer.max_steps", "10", "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "sharded over 2 processes" in result.stderr + result.stdout
    assert "on the meta device; each process reads its shard" in result.stderr + result.stdout  # meta_init: true
    (checkpoint,) = (tmp_path / "out/fsdp/checkpoints").iterdir()
    state = torch.load(checkpoint, weights_only=True)["state_dict"]  # one file, adapters only
    assert state and all(".lora_" in k for k in state)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out/fsdp/export/merged")
    assert (tmp_path / "out/fsdp/export/adapter/adapter_config.json").is_file()
    assert merged.config.num_hidden_layers == AutoModelForCausalLM.from_pretrained(model).config.num_hidden_layers


def test_qlora_refuses_a_base_on_the_meta_device() -> None:
    from transformers import AutoModelForCausalLM

    from lightning_lora.surgery.training.sharded_loading import parameters_on_meta

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(tiny_llama(num_layers=1).config)
    with pytest.raises(SurgeryError, match="meta device"):
        LoRAFinetuning(LORA, quantize=QUANT).apply(model)
    assert not any(".lora_" in n for n, _ in model.named_parameters())  # unchanged


def test_sharded_merged_export_refuses_4bit_bases_and_plain_modules() -> None:
    from lightning_lora import apply_lora, quantize_model
    from lightning_lora.surgery.training.sharded_export import check_sharded_export

    model = tiny_llama(num_layers=1)
    quantize_model(model, QUANT)
    apply_lora(model, LORA)
    with pytest.raises(SurgeryError, match=r"Linear layers only; found \['Linear4bit'\]"):
        check_sharded_export(model, "default")
    net = TinyNet()
    apply_lora(net, LORA)
    with pytest.raises(SurgeryError, match="needs a transformers model; got TinyNet"):
        check_sharded_export(net, "default")
    with pytest.raises(SurgeryError, match=r"no LoRA adapter named 'other'.*\['default'\]"):
        check_sharded_export(net, "other")
