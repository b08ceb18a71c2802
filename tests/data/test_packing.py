"""Packed batches: the collation, the padding report, and that packed training equals unpacked training."""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_lora.data.instruction import (
    IGNORE_INDEX,
    InstructionDataModule,
    collate_examples,
)
from lightning_lora.data.packing import collate_packed, pad_fraction
from lightning_lora.modules.causal_lm import CausalLMModule
from tests.tiny_lm import build_tiny_causal_lm, save_tiny_causal_lm

DATES = Path(__file__).resolve().parents[2] / "examples" / "data" / "dates"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


def datamodule(tiny_dir: Path, packing: bool) -> InstructionDataModule:
    dm = InstructionDataModule(str(DATES / "train.jsonl"), str(DATES / "val.jsonl"), tokenizer=str(tiny_dir),
                               batch_size=4, eval_batch_size=4, max_eval_samples=4, packing=packing)  # fmt: skip
    dm.setup("fit")
    return dm


def test_collate_packed_restarts_positions_and_masks_each_row_start(tiny_dir: Path) -> None:
    examples = datamodule(tiny_dir, True).train_examples[:3]
    batch = collate_packed(examples)
    lengths = [len(e.input_ids) for e in examples]
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: the padding-free convention
    assert batch["input_ids"].shape == (1, sum(lengths))
    starts = [sum(lengths[:i]) for i in range(3)]
    assert torch.nonzero(batch["position_ids"][0] == 0).flatten().tolist() == starts
    assert batch["input_ids"][0].tolist() == [t for e in examples for t in e.input_ids]
    for start, example in zip(starts, examples):
        assert batch["labels"][0, start] == IGNORE_INDEX
        assert batch["labels"][0, start + 1 : start + len(example.labels)].tolist() == example.labels[1:]


def test_pad_fraction_before_and_after() -> None:
    assert pad_fraction([2, 4, 3], [[0, 1], [2]], packed=False) == pytest.approx(1 - 9 / 11)
    assert pad_fraction([2, 4, 3], [[0, 1], [2]], packed=True) == 0.0


def test_padding_stats_report_the_training_batches(tiny_dir: Path) -> None:
    stats = datamodule(tiny_dir, True).padding_stats()
    assert 0 < stats["unpacked"] < 1 and stats["packed"] == 0.0


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Mean next-token loss of each row (rows = examples), on its answer tokens."""
    shifted = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none")  # (B, T-1)
    mask = labels[:, 1:] != IGNORE_INDEX
    return ((shifted * mask).sum(1) / mask.sum(1)).tolist()


def test_loss_per_example_matches_unpacked_on_a_tiny_llama(tiny_dir: Path) -> None:
    examples = datamodule(tiny_dir, True).train_examples[:4]
    model, tokenizer = build_tiny_causal_lm()
    padded = collate_examples(examples, tokenizer.pad_token_id)
    packed = collate_packed(examples)
    with torch.no_grad():
        reference = per_example_losses(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                                             use_cache=False).logits, padded["labels"])  # fmt: skip
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        crossing = model(input_ids=packed["input_ids"], use_cache=False).logits  # rows attend to each other
    lengths = [len(e.input_ids) for e in examples]
    bounds = [sum(lengths[:i]) for i in range(len(lengths) + 1)]

    def split(full: torch.Tensor) -> list[float]:
        return [per_example_losses(full[:, a:b], packed["labels"][:, a:b])[0] for a, b in itertools.pairwise(bounds)]

    assert split(logits) == pytest.approx(reference, abs=1e-5)
    assert split(crossing)[1:] != pytest.approx(reference[1:], abs=1e-3)  # the check can tell rows apart


def test_packed_training_matches_unpacked_training(tiny_dir: Path) -> None:
    def train(packing: bool) -> tuple[dict[str, torch.Tensor], float]:
        torch.manual_seed(0)
        module = CausalLMModule(model=str(tiny_dir), exact_match=False)
        trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
        trainer.fit(module, datamodule(tiny_dir, packing))
        params = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        return params, trainer.callback_metrics["train_loss"].item()

    unpacked, unpacked_loss = train(False)
    packed, packed_loss = train(True)
    assert packed_loss == pytest.approx(unpacked_loss, abs=1e-5)
    for name, value in unpacked.items():
        torch.testing.assert_close(packed[name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert not torch.equal(unpacked["model.layers.0.mlp.up_proj.weight"], build_tiny_causal_lm()[0].state_dict()[
        "model.layers.0.mlp.up_proj.weight"])  # it trained


def test_packing_is_refused_for_virtual_token_methods_and_allowed_for_lora() -> None:
    from lightning_lora import LoRAConfig, PrefixTuningConfig, PromptTuningConfig, apply_lora, apply_peft
    from lightning_lora.data.packing import packing_problems
    from tests.factories import tiny_llama

    lora = tiny_llama(num_layers=1)
    apply_lora(lora, LoRAConfig(r=2, targets=["q_proj"]))
    assert packing_problems(lora) == []
    for config in (PromptTuningConfig(num_virtual_tokens=2), PrefixTuningConfig(num_virtual_tokens=2)):
        model = tiny_llama(num_layers=1)
        apply_peft(model, config, name="v")
        problems = packing_problems(model)
        assert len(problems) == 1 and "prepends virtual tokens (adapters ['v']" in problems[0]
