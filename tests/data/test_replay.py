"""Replay mixing in InstructionDataModule: the configured share per epoch, drawn anew each epoch, seeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_lora.data.instruction import InstructionDataModule
from lightning_lora.data.reference import GENERAL_REFERENCE
from lightning_lora.data.replay import ReplaySampler
from lightning_lora.modules.smollm2 import CACHE_ENV
from tests.tiny_lm import save_tiny_causal_lm

DATES = Path(__file__).resolve().parents[2] / "examples" / "data" / "dates"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def replay_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("replay") / "general.jsonl"
    path.write_text("".join(json.dumps({"prompt": t, "response": "ok"}) + "\n" for t in GENERAL_REFERENCE))
    return path


def _module(tiny_dir: Path, replay: str, ratio: float, seed: int = 0) -> InstructionDataModule:
    dm = InstructionDataModule(str(DATES / "train.jsonl"), str(DATES / "val.jsonl"), tokenizer=str(tiny_dir),
                               replay=replay, replay_ratio=ratio, seed=seed, batch_size=16)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_each_epoch_holds_the_configured_share_of_replay(tiny_dir: Path, replay_file: Path, ratio: float) -> None:
    dm = _module(tiny_dir, str(replay_file), ratio)
    loader = dm.train_dataloader()
    n_task = len(dm.train_examples)  # 400
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # as Lightning does
        order = list(loader.sampler)
        assert sum(len(b["input_ids"]) for b in loader) == len(order)  # what the loader yields is this order
        loader.sampler.set_epoch(epoch)
        order = list(loader.sampler)
        replay = [i - n_task for i in order if i >= n_task]
        assert sorted(i for i in order if i < n_task) == list(range(n_task))  # every task example, once
        assert abs(len(replay) / len(order) - ratio) <= 1 / len(order)
        epochs.append(replay)
    assert dm.replay_report["ratio"] == pytest.approx(len(epochs[0]) / (n_task + len(epochs[0])))
    assert abs(dm.replay_report["ratio"] - ratio) < 0.01
    assert epochs[0] != epochs[1]  # a new draw each epoch
    again = _module(tiny_dir, str(replay_file), ratio).train_dataloader().sampler
    again.set_epoch(0)
    assert [i - n_task for i in again if i >= n_task] == epochs[0]  # seeded


def test_sampler_counts() -> None:
    sampler = ReplaySampler(n_task=90, n_pool=5, ratio=0.1)  # 10 replay from a pool of 5: drawn with replacement
    order = list(sampler)
    assert len(order) == 100 and sum(i >= 90 for i in order) == 10 and sampler.realised_ratio == 0.1
    assert sorted(ReplaySampler(90, 5, 0.0)) == list(range(90))  # ratio 0: the task data alone


def test_self_replay_is_generated_once_and_cached(tiny_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    dm = _module(tiny_dir, "self", 0.2)
    assert len(dm.replay_examples) == len(GENERAL_REFERENCE)
    cached = list(tmp_path.glob("replay-self-*.jsonl"))
    assert len(cached) == 1
    first = cached[0].read_text()
    assert _module(tiny_dir, "self", 0.2).replay_examples == dm.replay_examples and cached[0].read_text() == first


def test_bad_replay_options_are_named(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="replay='missing.jsonl': no such file"):
        InstructionDataModule(str(DATES / "train.jsonl"), replay="missing.jsonl")
    with pytest.raises(ValueError, match="replay_ratio=1.0"):
        InstructionDataModule(str(DATES / "train.jsonl"), replay="self", replay_ratio=1.0)
