"""``CausalLMModule.load_from_checkpoint`` on an adapter-only checkpoint, and the base name saved adapters record."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_lora import LoRAConfig, save_adapter
from lightning_lora.callbacks import LoRAFinetuning
from lightning_lora.data.instruction import InstructionDataModule
from lightning_lora.modules import loading
from lightning_lora.modules.causal_lm import CausalLMModule
from lightning_lora.surgery.lora.inventory import adapter_configs
from tests.tiny_lm import save_tiny_causal_lm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def test_load_from_checkpoint_rebuilds_the_adapters_of_an_adapter_only_checkpoint(tiny_dir: Path, tmp_path: Path) -> None:
    data = InstructionDataModule(tokenizer=str(tiny_dir), train_file=str(REPO / "examples/data/dates/train.jsonl"),
                                 val_file=str(REPO / "examples/data/dates/val.jsonl"), batch_size=2)
    lora = LoRAFinetuning(LoRAConfig(r=4, targets=["q_proj", "v_proj"]), module="model")
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[lora])
    trained = CausalLMModule(model=str(tiny_dir))
    trainer.fit(trained, data)
    ckpt = trainer.checkpoint_callback.best_model_path
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert saved and all("lora_" in k for k in saved)  # adapter-only: no base weights in the file

    loaded = CausalLMModule.load_from_checkpoint(ckpt)
    assert set(adapter_configs(loaded.model)) == {"default"}
    state = loaded.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    trained.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, rtol=0, atol=0)


def test_an_alias_is_recorded_as_the_adapters_base_model(tiny_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(loading.MODEL_ALIASES, "tiny-test-model", lambda: tiny_dir)
    model, _ = loading.load_causal_lm("tiny-test-model")
    from lightning_lora import apply_lora

    apply_lora(model, LoRAConfig(r=2))
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-test-model"  # not the directory it resolved to
    model, _ = loading.load_causal_lm(str(tiny_dir))
    assert model.config.name_or_path == str(tiny_dir)  # a path stays the path the user gave
