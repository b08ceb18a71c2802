"""MultiAdapterEvaluation and named-adapter training with a real Trainer on a tiny causal LM."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_lora import (
    LoRAConfig,
    UnknownAdapterError,
    apply_lora,
    disable_adapters,
    get_active_adapters,
    set_active_adapters,
)
from lightning_lora.callbacks import LoRAFinetuning, MultiAdapterEvaluation
from lightning_lora.data.instruction import InstructionDataModule
from lightning_lora.modules.causal_lm import CausalLMModule
from lightning_lora.surgery.lora.inventory import lora_layers
from tests.factories import perturb_lora_B
from tests.tiny_lm import save_tiny_causal_lm

DATES = Path(__file__).resolve().parents[2] / "examples" / "data" / "dates"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


def _data(tiny_dir: Path) -> InstructionDataModule:
    return InstructionDataModule(str(DATES / "train.jsonl"), str(DATES / "val.jsonl"), tokenizer=str(tiny_dir),
                                 batch_size=4, eval_batch_size=4, max_eval_samples=8)


def _trainer(**kwargs: object) -> L.Trainer:
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**options, **kwargs})


def _module_with_adapters(tiny_dir: Path) -> CausalLMModule:
    module = CausalLMModule(model=str(tiny_dir), exact_match=False)
    module.configure_model()
    apply_lora(module.model, LoRAConfig(r=4, targets=["q_proj", "v_proj"]), name="a")
    apply_lora(module.model, LoRAConfig(r=2, targets="all-linear"), name="b")
    perturb_lora_B(module.model, std=0.5)
    return module


def _val_loss(module: CausalLMModule, tiny_dir: Path) -> float:
    (metrics,) = _trainer().validate(module, _data(tiny_dir), verbose=False)
    return metrics["val_loss"]


def test_logs_every_adapter_and_the_base_side_by_side(tiny_dir):
    module = _module_with_adapters(tiny_dir)
    set_active_adapters(module.model, "a")
    callback = MultiAdapterEvaluation(["a", "b"], include_base=True)
    (metrics,) = _trainer(callbacks=[callback]).validate(module, _data(tiny_dir), verbose=False)
    assert {"val_loss", "val_loss/a", "val_loss/b", "val_loss/base"} <= set(metrics)
    assert get_active_adapters(module.model) == ["a"]  # restored after every batch
    assert metrics["val_loss/a"] == pytest.approx(metrics["val_loss"], rel=1e-5)  # token-weighted like the module
    set_active_adapters(module.model, "b")
    assert metrics["val_loss/b"] == pytest.approx(_val_loss(module, tiny_dir), rel=1e-5)
    with disable_adapters(module.model):
        assert metrics["val_loss/base"] == pytest.approx(_val_loss(module, tiny_dir), rel=1e-5)
    assert len({round(metrics[k], 4) for k in ("val_loss/a", "val_loss/b", "val_loss/base")}) == 3


def test_default_is_every_adapter_and_custom_loss(tiny_dir):
    module = _module_with_adapters(tiny_dir)
    set_active_adapters(module.model, "b")
    calls = []

    def loss_fn(pl_module, batch):
        calls.append(get_active_adapters(pl_module))
        return pl_module(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss

    callback = MultiAdapterEvaluation(include_base=False, loss_fn=loss_fn, prefix="score")
    (metrics,) = _trainer(callbacks=[callback], limit_val_batches=1).validate(module, _data(tiny_dir), verbose=False)
    assert {"score/a", "score/b"} <= set(metrics) and "score/base" not in metrics
    assert calls == [["a"], ["b"]]
    assert metrics["score/b"] == pytest.approx(metrics["val_loss"], rel=1e-5)  # one batch: plain mean == token mean


def test_trains_a_named_adapter_while_others_stay_frozen(tiny_dir):
    module = _module_with_adapters(tiny_dir)  # "a" and "b" exist; LoRAFinetuning adds and trains "c"
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    finetuning = LoRAFinetuning(LoRAConfig(r=4, targets=["q_proj", "v_proj"]), module="model", adapter_name="c")
    evaluation = MultiAdapterEvaluation(["a", "c"])
    trainer = _trainer(callbacks=[finetuning, evaluation], max_steps=3, limit_val_batches=1, val_check_interval=3)
    trainer.fit(module, _data(tiny_dir))
    after = dict(module.model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())  # the base, "a" and "b" are untouched
    trained = [p for n, p in after.items() if n.endswith("lora_B.c")]
    assert trained and all(p.abs().sum() > 0 for p in trained)  # B starts at zero: "c" did train
    (optimizer,) = trainer.optimizers
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in after.items() if n.endswith(".c")}
    assert {"val_loss/a", "val_loss/c", "val_loss/base"} <= set(trainer.callback_metrics)
    assert all("c" in layer.specs for _, layer in lora_layers(module.model) if "a" in layer.specs)


def test_unknown_adapter_fails_before_the_first_batch(tiny_dir):
    module = _module_with_adapters(tiny_dir)
    with pytest.raises(UnknownAdapterError, match=r"MultiAdapterEvaluation: no adapter named 'zz'.*\['a', 'b'\]"):
        _trainer(callbacks=[MultiAdapterEvaluation(["a", "zz"])]).validate(module, _data(tiny_dir), verbose=False)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"adapters": []}, "non-empty list"),
    ({"adapters": ["a", "base"]}, "include_base=True"),
    ({"prefix": ""}, "non-empty metric prefix"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiAdapterEvaluation(**kwargs)


def test_default_loss_needs_dict_batches(tiny_dir):
    from lightning_lora.callbacks.multi_adapter import causal_lm_loss

    with pytest.raises(TypeError, match="dict batches with 'input_ids' and 'labels'.*loss_fn="):
        causal_lm_loss(_module_with_adapters(tiny_dir), (torch.zeros(1), torch.zeros(1)))
