"""PEFTFinetuning with a real Trainer for every non-LoRA method: only the adapter trains, checkpoints hold only it,
resuming from them is bitwise exact, TrainableParameters reports the method, and a 4-bit base works."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lora import (
    BottleneckConfig,
    LoRAConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    adapter_parameters,
)
from lightning_lora.callbacks import CheckpointMismatchError, LoRAFinetuning, PEFTFinetuning, TrainableParameters
from tests.callbacks.models import TinyLlamaModule, trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIGS = {
    "bottleneck": BottleneckConfig(size=4, nonlinearity="gelu"),
    "prompt": PromptTuningConfig(num_virtual_tokens=3, init="vocab"),
    "p_tuning": PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8),
    "prefix": PrefixTuningConfig(num_virtual_tokens=3),
}


def _fit(tmp_path: Path, config, epochs: int, *, ckpt_path: str | None = None, save: bool = False,
         extra: list | None = None) -> tuple[TinyLlamaModule, L.Trainer]:
    L.seed_everything(0, verbose=False)
    module = TinyLlamaModule(lr=0.05)
    callbacks = [PEFTFinetuning(config, module="model"), *(extra or [])]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0))
    t = trainer(tmp_path, callbacks, max_steps=-1, max_epochs=epochs, enable_checkpointing=save)
    t.fit(module, ckpt_path=ckpt_path)
    return module, t


@pytest.mark.parametrize("method", list(CONFIGS))
def test_trains_only_the_adapter_and_resumes_exactly_from_adapter_only_checkpoints(tmp_path, method):
    config = CONFIGS[method]
    report = TrainableParameters(module="model", log=False)
    straight, _ = _fit(tmp_path / "a", config, 2, extra=[report])
    assert list(report.summary.by_method) == [config.method]
    assert report.summary.trainable == report.summary.by_method[config.method] > 0
    first, _ = _fit(tmp_path / "b", config, 1, save=True)
    checkpoint = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    adapter_keys = {f"model.{k}" for k in adapter_parameters(first.model, "default")}
    assert set(checkpoint["state_dict"]) == adapter_keys  # adapter-only: no base tensor
    resumed, t = _fit(tmp_path / "c", config, 2, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert t.global_step == 8
    expected, got, halfway = (adapter_parameters(m.model, "default") for m in (straight, resumed, first))
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert any(not torch.equal(halfway[n], got[n]) for n in got)  # the resumed run did train on
    base = TinyLlamaModule().model.state_dict()
    for name, value in resumed.model.state_dict().items():
        if name in base:
            assert torch.equal(value, base[name]), name  # the base never changed


def test_resume_with_another_method_says_what_differs(tmp_path):
    _fit(tmp_path / "b", CONFIGS["prompt"], 1, save=True)
    # The state-dict guard runs first (Lightning loads the weights before the callbacks' state): other tensors.
    with pytest.raises(CheckpointMismatchError, match=r"(?s)does not fit this model's adapter 'default'.*"
                                                      r"peft_virtual_tokens.encoders.default.embedding.weight"):
        _fit(tmp_path / "c", CONFIGS["prefix"], 2, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    callback = PEFTFinetuning(CONFIGS["prefix"], module="model")
    state = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    with pytest.raises(CheckpointMismatchError, match=r"(?s)prefix tuning config.*class: checkpoint "
                                                      r"'PromptTuningConfig', this run 'PrefixTuningConfig'"):
        callback.load_state_dict(next(iter(state.values())))


def test_from_checkpoint_rebuilds_the_method(tmp_path):
    _fit(tmp_path / "b", CONFIGS["p_tuning"], 1, save=True)
    callback = PEFTFinetuning.from_checkpoint(tmp_path / "b" / "ckpt" / "last.ckpt")
    assert callback.config == CONFIGS["p_tuning"]


def test_lora_finetuning_is_the_lora_form():
    assert issubclass(LoRAFinetuning, PEFTFinetuning) and LoRAFinetuning().config == LoRAConfig()
    with pytest.raises(TypeError, match="HINT: for the other methods use PEFTFinetuning"):
        LoRAFinetuning(CONFIGS["prompt"])
    with pytest.raises(TypeError, match=r"expected one of \['BottleneckConfig'"):
        PEFTFinetuning({"r": 2})


def test_prompt_tuning_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lightning_lora import QuantConfig

    L.seed_everything(0, verbose=False)
    module = TinyLlamaModule(lr=0.05)
    callback = PEFTFinetuning(CONFIGS["prompt"], module="model", quantize=QuantConfig())
    before = None

    class Remember(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = {k: v.detach().clone() for k, v in adapter_parameters(pl_module.model).items()}

    trainer(tmp_path, [callback, Remember()], max_steps=2).fit(module)
    assert type(module.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    after = adapter_parameters(module.model)
    assert all(not torch.equal(before[k], after[k]) for k in after)


def test_merge_and_export_writes_the_adapter_and_says_why_nothing_is_merged(tmp_path, caplog):
    from lightning_lora import load_adapter
    from lightning_lora.callbacks import MergeAndExport

    L.seed_everything(0, verbose=False)
    module = TinyLlamaModule(lr=0.05)
    export = MergeAndExport(tmp_path / "out", module="model")
    with caplog.at_level("INFO"):
        trainer(tmp_path, [PEFTFinetuning(CONFIGS["bottleneck"], module="model"), export], max_steps=2).fit(module)
    assert "no merged model is written because the nonlinearity" in caplog.text
    assert not (tmp_path / "out" / "merged").exists()
    again = TinyLlamaModule().model
    load_adapter(again, tmp_path / "out" / "adapter")
    for name, value in adapter_parameters(module.model).items():
        assert torch.equal(adapter_parameters(again)[name], value)


def test_constructor_is_jsonargparse_friendly():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callback", type=PEFTFinetuning)
    cfg = parser.parse_string(
        "callback:\n  class_path: lightning_lora.callbacks.PEFTFinetuning\n  init_args:\n    module: model\n"
        "    config:\n      class_path: lightning_lora.BottleneckConfig\n      init_args:\n        size: 8\n"
        "        placement: pfeiffer\n")
    callback = parser.instantiate(cfg).callback
    assert callback.config == BottleneckConfig(size=8, placement="pfeiffer") and callback.module == "model"


def test_prefix_tuning_with_gradient_checkpointing_is_refused_before_training(tmp_path):
    from lightning_lora import SurgeryError
    from lightning_lora.callbacks import GradientCheckpointing

    module = TinyLlamaModule()
    callbacks = [PEFTFinetuning(CONFIGS["prefix"], module="model"), GradientCheckpointing(module="model")]
    t = trainer(tmp_path, callbacks, max_steps=1)
    with pytest.raises(SurgeryError, match=r"Prefix tuning cannot train under gradient checkpointing.*HINT"):
        t.fit(module)
    assert t.global_step == 0
