"""LoRAFinetuning with a real Trainer on CPU: surgery timing, the optimizer guard, adapter-only checkpoints, resume."""

from __future__ import annotations

import types
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lora import LoRAConfig, SurgeryError
from lightning_lora.callbacks import CheckpointMismatchError, LoRAFinetuning, OptimizerSetupError
from lightning_lora.surgery.lora.layer import LoRALayer
from tests.callbacks.models import TinyModule, adapter_tensors, trainer

CFG = LoRAConfig(r=4, targets=["q_proj", "v_proj"])




def test_optimizer_holds_exactly_the_adapters_and_only_they_change(tmp_path: Path) -> None:
    module = TinyModule()
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    t = trainer(tmp_path, [LoRAFinetuning(CFG, module="model")])
    t.fit(module)
    adapters = {n: p for n, p in module.named_parameters() if ".lora_" in n}
    assert len(adapters) == 8  # 2 blocks x (q, v) x (A, B)
    held = [p for g in t.optimizers[0].param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in adapters.values()} and len(held) == len(adapters)
    for name, param in module.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(param, base[name.replace(".base_layer.", ".")]), name
    assert all(adapters[n].abs().sum() > 0 for n in adapters if ".lora_B." in n)  # trained away from B = 0


def test_model_built_in_configure_model_gets_adapters_before_the_optimizer(tmp_path: Path) -> None:
    module = TinyModule(build_in="configure_model")
    assert module.model is None
    callback = LoRAFinetuning(CFG, module="model")
    t = trainer(tmp_path, [callback])
    t.fit(module)
    assert isinstance(module.model.layers[0].q_proj, LoRALayer)
    assert callback.report is not None and callback.report.replaced == [
        "layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert sum(len(g["params"]) for g in t.optimizers[0].param_groups) == 8
    # The module's own configure_model is back in place after fit; a second fit does not apply LoRA twice.
    assert "configure_model" not in module.__dict__
    trainer(tmp_path, [callback]).fit(module)
    assert len(module.model.layers[0].q_proj.specs) == 1


def test_optimizer_built_before_the_surgery_is_an_error(tmp_path: Path) -> None:
    # What LightningCLI's automatic optimizer does: build the optimizer from model.parameters() when the CLI starts,
    # then patch configure_optimizers to return it.
    module = TinyModule()
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.01)
    module.configure_optimizers = types.MethodType(lambda self: optimizer, module)
    t = trainer(tmp_path, [LoRAFinetuning(CFG, module="model")])
    with pytest.raises(OptimizerSetupError, match=r"(?s)8 trainable parameter\(s\) are in no optimizer.*LightningCLI.*HINT"):
        t.fit(module)


def test_frozen_parameters_in_the_optimizer_warn(tmp_path: Path) -> None:
    t = trainer(tmp_path, [LoRAFinetuning(CFG, module="model")], max_steps=1)
    with pytest.warns(UserWarning, match=r"(?s)optimizer holds \d+ frozen parameter.*HINT"):
        t.fit(TinyModule(optimizer_params="all"))


def test_parameters_outside_the_target_module_are_frozen(tmp_path: Path) -> None:
    module = TinyModule()
    module.extra = torch.nn.Linear(2, 2)  # outside `model`
    callback = LoRAFinetuning(CFG, module="model")
    callback.apply(module)
    assert not any(p.requires_grad for p in module.extra.parameters())
    assert {n for n, p in module.named_parameters() if p.requires_grad} == set(adapter_tensors(module))


def test_bad_module_path_and_conflicting_adapter_are_refused() -> None:
    with pytest.raises(ValueError, match=r"(?s)module='modle'.*no submodule.*\['model'\].*HINT"):
        LoRAFinetuning(CFG, module="modle").apply(TinyModule())
    module = TinyModule()
    LoRAFinetuning(CFG, module="model").apply(module)
    assert LoRAFinetuning(CFG, module="model").apply(module) is None  # same config: nothing to do
    with pytest.raises(SurgeryError, match=r"(?s)already has a LoRA adapter 'default' with another config.*r: .*HINT"):
        LoRAFinetuning(LoRAConfig(r=8), module="model").apply(module)


def test_constructor_is_jsonargparse_friendly() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LoRAFinetuning, "lora")
    cfg = parser.parse_string("lora:\n  config: {r: 4, alpha: 8, targets: [q_proj], layers: '-1:'}\n  module: model\n"
                              "  quantize: {quant_type: fp4}\n")
    callback = parser.instantiate_classes(cfg).lora
    assert isinstance(callback, LoRAFinetuning)
    assert callback.config == LoRAConfig(r=4, alpha=8, targets=["q_proj"], layers="-1:")
    assert callback.module == "model" and callback.quantize.quant_type == "fp4"
    assert LoRAFinetuning({"r": 2}).config.r == 2 and LoRAFinetuning().config == LoRAConfig()


# ---------------------------------------------------------------------------------------------------- checkpoints
def _train(tmp_path: Path, steps: int, *, ckpt_path: str | None = None, save: bool = False, seed: int = 0,
           module: TinyModule | None = None, callback: LoRAFinetuning | None = None,
           **trainer_kwargs) -> tuple[TinyModule, L.Trainer]:
    L.seed_everything(0, verbose=False)
    module = module or TinyModule(seed=seed, scheduler=True, resumable=True)
    callbacks = [callback or LoRAFinetuning(CFG, module="model")]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0))
    t = trainer(tmp_path, callbacks, **{"max_steps": steps, "enable_checkpointing": save, **trainer_kwargs})
    t.fit(module, ckpt_path=ckpt_path)
    return module, t


@pytest.mark.parametrize("stop", ["mid-epoch", "epoch-end"])
def test_resume_from_adapter_only_checkpoint_is_bitwise_exact(tmp_path: Path, stop: str) -> None:
    """N steps, stop, resume a fresh module for M more == N + M steps: adapters, AdamW state and LR schedule."""
    straight, t_straight = _train(tmp_path / "a", 8)
    if stop == "mid-epoch":  # N = 3, saved after fit: the loader's position is in the checkpoint too
        first, t_first = _train(tmp_path / "b", 3)
        t_first.save_checkpoint(tmp_path / "b" / "stop.ckpt")
        resumed, t_resumed = _train(tmp_path / "c", 8, ckpt_path=str(tmp_path / "b" / "stop.ckpt"))
    else:  # N = 4 = one epoch with a plain DataLoader and ModelCheckpoint's last.ckpt. Epoch counts, not
        # max_steps: a run stopped by max_steps at an epoch's end replays a batch on resume (Lightning issue #19617).
        first, _ = _train(tmp_path / "b", -1, max_epochs=1, save=True, module=TinyModule(scheduler=True))
        resumed, t_resumed = _train(tmp_path / "c", -1, max_epochs=2, module=TinyModule(scheduler=True),
                                    ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert t_resumed.global_step == 8
    expected, got = adapter_tensors(straight), adapter_tensors(resumed)
    assert list(got) == list(expected) and len(got) == 8
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
        assert not torch.equal(adapter_tensors(first)[name], got[name]), name  # the resumed run did train on
    sched_a, sched_c = (t.lr_scheduler_configs[0].scheduler for t in (t_straight, t_resumed))
    assert sched_c.last_epoch == sched_a.last_epoch == 8 and sched_c.get_last_lr() == sched_a.get_last_lr()
    state_a, state_c = (t.optimizers[0].state_dict()["state"] for t in (t_straight, t_resumed))
    for i in state_a:
        assert torch.equal(state_a[i]["exp_avg"], state_c[i]["exp_avg"]) and torch.equal(state_a[i]["step"], state_c[i]["step"])


def test_checkpoint_holds_only_trainable_tensors_optimizer_state_and_a_few_kb(tmp_path: Path) -> None:
    big = LoRAConfig(r=2, targets=["q_proj"])
    _train(tmp_path, 2, save=True, module=TinyModule(hidden=64, resumable=True), callback=LoRAFinetuning(big, module="model"))
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert sorted(checkpoint["state_dict"]) == [f"model.layers.{i}.q_proj.lora_{f}.default" for i in (0, 1) for f in "AB"]
    adapter_bytes = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
    base_bytes = sum(p.numel() * 4 for p in TinyModule(hidden=64).parameters())
    size = path.stat().st_size
    assert size <= 3 * adapter_bytes + 24 * 1024  # adapters + AdamW's two states + metadata
    assert size < base_bytes / 4
    state = checkpoint["callbacks"]["LoRAFinetuning{'adapter_name': 'default', 'module': 'model'}"]
    # tensors: embed, 2 x (q, v, mlp: weight + bias; norm: 2), head: 2
    assert state["config"] == big.to_dict() and state["identity"]["tensors"] == 19


def test_full_checkpoints_when_asked(tmp_path: Path) -> None:
    _train(tmp_path, 1, save=True, callback=LoRAFinetuning(CFG, module="model", adapter_only_checkpoints=False))
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert "model.embed.weight" in checkpoint["state_dict"]


@pytest.fixture
def adapter_checkpoint(tmp_path: Path) -> Path:
    _train(tmp_path / "run", 4, save=True)
    return tmp_path / "run" / "ckpt" / "last.ckpt"


def test_resume_into_another_base_fails_with_what_differs(tmp_path: Path, adapter_checkpoint: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"(?s)another base model.*base weights: same architecture.*HINT"):
        _train(tmp_path / "x", 8, ckpt_path=str(adapter_checkpoint), seed=1)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)8 key\(s\) with another shape.*\(4, 32\), model \(4, 48\).*HINT"):
        _train(tmp_path / "y", 8, ckpt_path=str(adapter_checkpoint), module=TinyModule(hidden=48, resumable=True))
    with pytest.raises(CheckpointMismatchError, match=r"LoRA config alpha: checkpoint 32, this run 8"):
        _train(tmp_path / "z", 8, ckpt_path=str(adapter_checkpoint),
               callback=LoRAFinetuning(LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]), module="model"))


def test_checkpoint_missing_adapter_keys_fails(tmp_path: Path, adapter_checkpoint: Path) -> None:
    checkpoint = torch.load(adapter_checkpoint, weights_only=True)
    del checkpoint["state_dict"]["model.layers.1.v_proj.lora_B.default"]
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)1 key\(s\) missing.*\n    model.layers.1.v_proj.lora_B.default"):
        _train(tmp_path / "x", 8, ckpt_path=str(broken))
    # ... even when the module asks for non-strict loading: adapters must never stay silently at zero
    module = TinyModule(scheduler=True, resumable=True)
    module.strict_loading = False
    with pytest.raises(CheckpointMismatchError, match="missing from the checkpoint"):
        _train(tmp_path / "y", 8, ckpt_path=str(broken), module=module)


def test_adapter_only_checkpoint_outside_a_trainer(adapter_checkpoint: Path) -> None:
    trained = torch.load(adapter_checkpoint, weights_only=True)["state_dict"]
    # LightningModule.load_from_checkpoint builds a module without adapters: it cannot load the checkpoint.
    with pytest.raises(RuntimeError, match="Unexpected key"):
        TinyModule.load_from_checkpoint(adapter_checkpoint)
    # The supported way: rebuild the callback from the checkpoint, apply the same surgery to a new module, load.
    callback = LoRAFinetuning.from_checkpoint(adapter_checkpoint)
    hparams = torch.load(adapter_checkpoint, weights_only=True)["hyper_parameters"]
    module = callback.load_checkpoint(TinyModule(**hparams), adapter_checkpoint)
    for name, value in adapter_tensors(module).items():
        assert torch.equal(value, trained[name]), name
    with pytest.raises(CheckpointMismatchError, match="base weights"):
        callback.load_checkpoint(TinyModule(**{**hparams, "seed": 3}), adapter_checkpoint)


def test_from_checkpoint_needs_a_lora_state(tmp_path: Path) -> None:
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "callbacks": {}}, path)
    with pytest.raises(ValueError, match=r"(?s)expected one LoRAFinetuning state.*HINT"):
        LoRAFinetuning.from_checkpoint(path)


# ---------------------------------------------------------------------------------------------------- other modules
def test_lightning_demo_transformer_trains_only_its_adapters(tmp_path: Path) -> None:
    """A LightningModule this project did not write: Lightning's demo Transformer (nn.Transformer inside)."""
    from lightning.pytorch.demos.transformer import LightningTransformer
    from torch.utils.data import DataLoader, TensorDataset

    L.seed_everything(0, verbose=False)
    module = LightningTransformer(vocab_size=50)
    module.prepare_data = lambda: None  # it would download WikiText2; random tokens instead (no network in tests)
    tokens = torch.randint(0, 50, (8, 11), generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback = LoRAFinetuning(LoRAConfig(r=4, targets=["linear1", "linear2"]), module="model")
    t = trainer(tmp_path, [callback], max_steps=3)
    with pytest.warns(UserWarning, match="frozen parameter"):  # its optimizer is SGD(self.model.parameters())
        t.fit(module, data)
    assert len(callback.report.replaced) == 8  # 2 encoder + 2 decoder layers x (linear1, linear2)
    adapters = adapter_tensors(module)
    assert len(adapters) == 16
    for name, param in module.named_parameters():
        if name in adapters:
            assert ".lora_A." in name or param.abs().sum() > 0, name  # B trained away from zero
        else:
            assert torch.equal(param, before[name.replace(".base_layer.", ".")]), name


def test_qlora_quantizes_before_the_surgery_and_resumes_exactly(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from lightning_lora.surgery.quant.config import QuantConfig

    quant = QuantConfig(targets=["q_proj", "v_proj"], compute_dtype="float32")

    def run(name: str, steps: int, ckpt: Path | None = None) -> tuple[TinyModule, L.Trainer, LoRAFinetuning]:
        callback = LoRAFinetuning(CFG, module="model", quantize=quant)
        module, t = _train(tmp_path / name, steps, ckpt_path=str(ckpt) if ckpt else None, callback=callback,
                           module=TinyModule(hidden=64, scheduler=True, resumable=True))
        return module, t, callback

    straight, _, callback = run("a", 6)
    layer = straight.model.layers[0].q_proj
    assert isinstance(layer, LoRALayer) and type(layer.base_layer).__name__ == "Linear4bit"
    assert callback.state_dict()["quantize"]["quant_type"] == "nf4"
    assert callback.identity["params"] == sum(p.numel() for p in TinyModule(hidden=64).parameters())  # dense base
    _, t_first, _ = run("b", 3)
    t_first.save_checkpoint(tmp_path / "q.ckpt")
    assert all(".lora_" in k for k in torch.load(tmp_path / "q.ckpt", weights_only=True)["state_dict"])
    resumed, _, _ = run("c", 6, tmp_path / "q.ckpt")  # the 4-bit base is rebuilt, not read from the checkpoint
    expected = adapter_tensors(straight)
    assert all(torch.equal(t, expected[n]) for n, t in adapter_tensors(resumed).items())
    assert expected["model.layers.0.q_proj.lora_B.default"].abs().sum() > 0


def test_lora_config_that_does_not_fit_fails_before_quantizing() -> None:
    pytest.importorskip("bitsandbytes")
    from lightning_lora import TargetMatchError
    from lightning_lora.surgery.quant.config import QuantConfig

    module = TinyModule(hidden=64)
    callback = LoRAFinetuning(LoRAConfig(targets=["q_prj"]), module="model", quantize=QuantConfig(targets=["q_proj"]))
    with pytest.raises(TargetMatchError, match=r"target pattern 'q_prj' matched no module.*q_proj"):
        callback.apply(module)
    assert type(module.model.layers[0].q_proj) is torch.nn.Linear  # not left half-changed (quantized, no adapters)
