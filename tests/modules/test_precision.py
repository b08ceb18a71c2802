"""dtype="auto" with a real Trainer: where bf16 is chosen, the frozen base is bf16 while adapters, trained blocks and
optimizer state stay fp32; where it is not, everything stays fp32."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_lora import LoRAConfig
from lightning_lora.callbacks import LayerFreezing, LoRAFinetuning
from lightning_lora.data.instruction import InstructionDataModule
from lightning_lora.modules.causal_lm import CausalLMModule
from lightning_lora.modules.precision import cast_frozen_
from lightning_lora.surgery.quant.cpu_precision import ENV_VAR
from tests.tiny_lm import build_tiny_causal_lm, save_tiny_causal_lm

DATES = Path(__file__).resolve().parents[2] / "examples" / "data" / "dates"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


class DuringTraining(L.Callback):
    """Snapshot parameter and optimizer-state dtypes, and the module's autocast dtype, after the last step."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.params = {n: p.dtype for n, p in pl_module.model.named_parameters()}
        self.trainable = {n for n, p in pl_module.model.named_parameters() if p.requires_grad}
        self.state = optimizer_state_dtypes(trainer)
        self.frozen_dtype = pl_module.frozen_dtype


def fit(tiny_dir: Path, *callbacks: L.Callback, steps: int = 2) -> tuple[CausalLMModule, L.Trainer]:
    module = CausalLMModule(model=str(tiny_dir), max_new_tokens=2)
    data = InstructionDataModule(str(DATES / "train.jsonl"), str(DATES / "val.jsonl"), tokenizer=str(tiny_dir),
                                 batch_size=4, eval_batch_size=4, max_eval_samples=4)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, val_check_interval=steps, callbacks=list(callbacks))  # fmt: skip
    trainer.fit(module, data)
    return module, trainer


def optimizer_state_dtypes(trainer: L.Trainer) -> set[torch.dtype]:
    (optimizer,) = trainer.optimizers
    return {v.dtype for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.ndim}


def test_bf16_base_keeps_adapters_and_optimizer_state_fp32(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "bfloat16")  # what auto picks on a CPU with fast bf16
    torch.manual_seed(0)
    seen = DuringTraining()
    module, trainer = fit(tiny_dir, LoRAFinetuning(LoRAConfig(r=4, targets=["q_proj", "v_proj"])), seen)
    assert seen.frozen_dtype == torch.bfloat16
    adapters = {n for n in seen.params if "lora_" in n}
    assert adapters and adapters == seen.trainable and all(seen.params[n] == torch.float32 for n in adapters)
    assert all(dtype == torch.bfloat16 for n, dtype in seen.params.items() if n not in adapters)
    assert seen.state == {torch.float32}
    params = dict(module.model.named_parameters())
    assert any(params[n].abs().sum() > 0 for n in adapters if "lora_B" in n)  # B starts at 0: it trained
    # After training the frozen weights are float32 again, holding exactly their bf16 values (for merge / export).
    assert module.frozen_dtype is None and {p.dtype for p in params.values()} == {torch.float32}
    reference = dict(build_tiny_causal_lm()[0].named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(params["model.layers.0.mlp.up_proj.weight"], reference.to(torch.bfloat16).float())
    assert math.isfinite(trainer.callback_metrics["train_loss"].item())
    assert 0.0 <= trainer.callback_metrics["val_exact_match"].item() <= 1.0  # generation ran under autocast


def test_bf16_base_with_a_trained_block_keeps_that_block_fp32(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "bfloat16")
    reference, _ = build_tiny_causal_lm()  # the saved weights, to check the trained block was never rounded
    seen = DuringTraining()
    module, _ = fit(tiny_dir, LayerFreezing(blocks="-1:", module="model"), seen, steps=1)
    trained = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert trained and all(".layers.1." in n and seen.params[n] == torch.float32 for n in trained)
    assert seen.state == {torch.float32}
    assert seen.params["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    # fp32 master weights: one AdamW step from the exact fp32 values (lr 2e-4 moves each weight by at most ~2e-4).
    before = dict(reference.named_parameters())["model.layers.1.mlp.up_proj.weight"]
    after = trained["model.layers.1.mlp.up_proj.weight"]
    assert 0 < (after - before).abs().max() <= 3e-4


def test_fp32_choice_leaves_every_weight_fp32(tiny_dir: Path) -> None:  # the suite pins auto to float32
    module, _ = fit(tiny_dir, LoRAFinetuning(LoRAConfig(r=4, targets=["q_proj"])), steps=1)
    assert module.frozen_dtype is None
    assert {p.dtype for p in module.model.parameters()} == {torch.float32}


def test_cast_frozen_skips_trainable_and_keeps_tied_weights_tied() -> None:
    model, _ = build_tiny_causal_lm()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.model.norm.weight.requires_grad_(True)
    for name, param in model.named_parameters():
        param.requires_grad_(name == "model.norm.weight")
    cast_frozen_(model, torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
