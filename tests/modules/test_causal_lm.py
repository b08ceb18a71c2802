"""Tests for CausalLMModule and model loading, with a tiny random-init Llama on CPU and a real Trainer."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_lora.data.instruction import InstructionDataModule
from lightning_lora.modules.causal_lm import CausalLMModule, ExactMatch
from lightning_lora.modules.loading import load_causal_lm, resolve_dtype, resolve_model_path
from tests.tiny_lm import save_tiny_causal_lm

DATES = Path(__file__).resolve().parents[2] / "examples" / "data" / "dates"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


def datamodule(tiny_dir: Path) -> InstructionDataModule:
    return InstructionDataModule(str(DATES / "train.jsonl"), str(DATES / "val.jsonl"), tokenizer=str(tiny_dir),
                                 batch_size=4, eval_batch_size=4, max_eval_samples=8)  # fmt: skip


def trainer(**kwargs: object) -> L.Trainer:
    options = dict(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    return L.Trainer(**{**options, **kwargs})


def test_model_is_loaded_in_configure_model_once(tiny_dir: Path) -> None:
    module = CausalLMModule(model=str(tiny_dir))
    assert module.model is None and module.tokenizer is None
    module.configure_model()
    first = module.model
    module.configure_model()
    assert module.model is first and module.model.training
    assert module.tokenizer.pad_token_id is not None
    assert dict(module.hparams) == {"model": str(tiny_dir), "dtype": "auto", "max_new_tokens": 16, "exact_match": True,
                                   "meta_init": False}


def test_fit_and_validate_log_loss_perplexity_and_exact_match(tiny_dir: Path) -> None:
    module = CausalLMModule(model=str(tiny_dir), max_new_tokens=4)
    dm = datamodule(tiny_dir)
    fit_trainer = trainer(limit_val_batches=1)
    fit_trainer.fit(module, dm)
    assert fit_trainer.global_step == 3
    assert math.isfinite(fit_trainer.callback_metrics["train_loss"].item())
    (metrics,) = trainer().validate(module, dm, verbose=False)
    assert set(metrics) == {"val_loss", "val_ppl", "val_exact_match"}
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-5)
    assert 0.0 <= metrics["val_exact_match"] <= 1.0


def test_exact_match_can_be_turned_off(tiny_dir: Path) -> None:
    (metrics,) = trainer().validate(CausalLMModule(model=str(tiny_dir), exact_match=False), datamodule(tiny_dir),
                                    verbose=False)  # fmt: skip
    assert set(metrics) == {"val_loss", "val_ppl"}


def test_optimizer_holds_only_trainable_parameters(tiny_dir: Path) -> None:
    module = CausalLMModule(model=str(tiny_dir))
    module.configure_model()
    for name, param in module.model.named_parameters():
        param.requires_grad_(".layers.1." in name)
    trainable = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in trainable.items()}
    fit_trainer = trainer(limit_val_batches=0)
    fit_trainer.fit(module, datamodule(tiny_dir))
    (optimizer,) = fit_trainer.optimizers
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in trainable.values()}
    params = dict(module.model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in frozen_before.items())
    assert any(not torch.equal(params[n], before) for n, before in trained_before.items())


def test_no_trainable_parameters_is_refused(tiny_dir: Path) -> None:
    module = CausalLMModule(model=str(tiny_dir))
    module.configure_model()
    module.model.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"no trainable parameters: every parameter has requires_grad=False"):
        module.configure_optimizers()


def test_scheduler_is_stepped_every_step(tiny_dir: Path) -> None:
    module = CausalLMModule(
        model=str(tiny_dir),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    )
    module.configure_model()
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD)
    assert config["lr_scheduler"]["interval"] == "step"


def test_exact_match_metric_strips_whitespace() -> None:
    metric = ExactMatch()
    metric.update([" 2021-03-03\n", "2021-03-04", "x"], ["2021-03-03", "2021-03-05", "x "])
    assert metric.compute().item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"got 1 predictions for 2 references"):
        metric.update(["a"], ["a", "b"])


def test_evaluate_exact_match_outside_the_trainer(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = CausalLMModule(model=str(tiny_dir), max_new_tokens=3)
    dm = datamodule(tiny_dir)
    dm.setup("validate")
    score = module.evaluate_exact_match(dm.val_dataloader())
    assert 0.0 <= score <= 1.0 and module.training  # the mode is restored
    batch = next(iter(dm.val_dataloader()))
    generated = module.generate_answers(batch["gen_input_ids"], batch["gen_attention_mask"])
    # Only the new tokens are decoded; one byte-level token decodes to at most one character.
    assert len(generated) == 4 and all(len(g) <= 3 for g in generated)
    answers = {tuple(b["gen_input_ids"][0].tolist()): b["answers"] for b in dm.val_dataloader()}
    monkeypatch.setattr(module, "generate_answers", lambda ids, mask: answers[tuple(ids[0].tolist())])
    assert module.evaluate_exact_match(dm.val_dataloader()) == 1.0
    with pytest.raises(KeyError, match=r"batch lacks \['answers', 'gen_attention_mask', 'gen_input_ids'\]"):
        module.evaluate_exact_match(dm.train_dataloader())


def test_bad_constructor_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'; valid: 'auto', 'float32'"):
        CausalLMModule(dtype="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1, got 0"):
        CausalLMModule(max_new_tokens=0)


def test_resolve_model_path_and_errors(tiny_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_path(str(tiny_dir)) == str(tiny_dir)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError, match=r"model 'no/such/model/dir' not found: no such directory\. Accepted: "
                                                r"an alias \('smollm2-135m-instruct', 'smollm2'\)"):  # fmt: skip
        resolve_model_path("no/such/model/dir")
    with pytest.raises(FileNotFoundError, match=r"is a directory but holds no config\.json"):
        resolve_model_path(str(tmp_path))


def test_unreachable_hub_name_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def offline(*args: object, **kwargs: object) -> None:  # no network in tests: fail as the hub client does
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(FileNotFoundError, match=r"'nobody/no-such-model' is not a local directory, and loading it "
                                                r"from the Hugging Face Hub failed"):  # fmt: skip
        load_causal_lm("nobody/no-such-model")


def test_dtype_auto_follows_the_default_dtype(tiny_dir: Path) -> None:
    assert resolve_dtype("auto") == torch.float32
    model, _ = load_causal_lm(str(tiny_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
