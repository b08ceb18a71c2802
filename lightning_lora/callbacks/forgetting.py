"""``ForgettingMonitor``: how far fine-tuning moves the model away from its base on general text, at each validation.

Thin over :mod:`lightning_lora.surgery.diagnostics.forgetting`. Logs ``forgetting/kl`` (mean per-token KL(base || adapted)) and
``forgetting/ppl`` (perplexity of the reference text under the adapted model) at each validation; thresholds can
warn or stop training.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_lora.callbacks._model_ready import target_module
from lightning_lora.data.reference import GENERAL_REFERENCE
from lightning_lora.surgery.diagnostics.forgetting import (
    ReferenceBatch,
    ReferenceStatistics,
    can_disable,
    forgetting_metrics,
    greedy_continuations,
    make_reference_batch,
    reference_statistics,
)

_SELF_PROMPT_TOKENS = 12


class ForgettingMonitor(Callback):
    """Measure forgetting on a reference set of general text at each validation.

    The base is measured through ``disable_adapters`` when the model has LoRA layers (exact KL, no second copy of
    the model); otherwise (full fine-tuning, layer freezing) from statistics computed once at fit start and kept
    in checkpoints: the log-probability of each reference token and the base's top-k (see
    :mod:`lightning_lora.surgery.diagnostics.forgetting`).

    Args:
        references: ``"general"`` (the shipped set, :data:`lightning_lora.data.reference.GENERAL_REFERENCE`),
            ``"self"`` (the base model's own greedy continuations of the first tokens of that set, generated once at
            fit start and cached), or a ``.txt`` (one text a line) / ``.jsonl`` (``{"text": ...}``) file.
            Default: ``"general"``.
        tokenizer: Model alias or directory to load a tokenizer from. Default: None (the module's or the
            datamodule's ``tokenizer`` attribute).
        module: Attribute path of the network inside the LightningModule. Default: ``"model"``.
        base: ``"auto"`` (live when possible), ``"live"`` or ``"cached"``. Default: ``"auto"``.
        top_k: Base tokens kept per position for the cached statistics. Default: 20.
        max_length: Tokens kept per reference text. Default: 96.
        batch_size: Reference texts per forward pass. Default: 4.
        self_new_tokens: Tokens the base generates per "self" reference. Default: 24.
        warn_kl: Warn when the KL exceeds this. Default: None.
        stop_kl: Stop training (``trainer.should_stop``) when the KL exceeds this. Default: None.
        results_file: At fit end, measure once more and write the history (JSON) here. Default: None.
    """

    def __init__(self, references: str = "general", *, tokenizer: str | None = None, module: str | None = "model",
                 base: Literal["auto", "live", "cached"] = "auto", top_k: int = 20, max_length: int = 96,
                 batch_size: int = 4, self_new_tokens: int = 24, warn_kl: float | None = None,
                 stop_kl: float | None = None, results_file: str | None = None) -> None:
        if references not in ("general", "self") and not Path(references).is_file():
            raise ValueError(f"references={references!r}: give 'general', 'self', or an existing .txt/.jsonl file.")
        if base not in ("auto", "live", "cached"):
            raise ValueError(f"base={base!r}: valid values are 'auto', 'live' and 'cached'.")
        for name, value in (("top_k", top_k), ("max_length", max_length), ("batch_size", batch_size),
                            ("self_new_tokens", self_new_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: give a positive integer.")
        self.references, self.tokenizer_name, self.module, self.base = references, tokenizer, module, base
        self.top_k, self.max_length, self.batch_size = top_k, max_length, batch_size
        self.self_new_tokens = self_new_tokens
        self.warn_kl, self.stop_kl, self.results_file = warn_kl, stop_kl, results_file
        self.history: list[dict[str, float]] = []
        self._ids: list[list[int]] | None = None
        self._stats: list[ReferenceStatistics] | None = None

    # ------------------------------------------------------------------------------------------------ before training
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = target_module(pl_module, self.module)
        if self._ids is None:
            tokenizer = self._tokenizer(trainer, pl_module)
            texts = _read_texts(self.references)
            self._ids = [tokenizer(t)["input_ids"][: self.max_length] for t in texts]
            if self.references == "self":
                prompts = [ids[:_SELF_PROMPT_TOKENS] for ids in self._ids]
                with _mixed_precision_autocast(model):
                    self._ids = greedy_continuations(model, prompts, self.self_new_tokens, tokenizer.eos_token_id)
            self._pad_id = tokenizer.pad_token_id or 0
        live = self.base == "live" or (self.base == "auto" and can_disable(model))
        if self.base == "live" and not can_disable(model):
            raise ValueError("ForgettingMonitor(base='live'): the model has no LoRA layers to switch off (or they are "
                             "merged).\nHINT: use base='cached' for full fine-tuning or layer freezing.")
        if not live and self._stats is None:
            with _mixed_precision_autocast(model):
                self._stats = [reference_statistics(model, batch, self.top_k) for batch in self._batches()]
        self._live = live

    def _tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if self.tokenizer_name is not None:
            from lightning_lora.modules.loading import load_tokenizer

            return load_tokenizer(self.tokenizer_name)
        for owner in (pl_module, getattr(trainer, "datamodule", None)):
            if getattr(owner, "tokenizer", None) is not None:
                return owner.tokenizer
        raise ValueError("ForgettingMonitor: no tokenizer found on the LightningModule or the datamodule.\n"
                         "HINT: pass tokenizer='<model alias or directory>'.")

    def _batches(self) -> list[ReferenceBatch]:
        ids = self._ids or []
        chunks = [ids[i : i + self.batch_size] for i in range(0, len(ids), self.batch_size)]
        return [make_reference_batch(chunk, getattr(self, "_pad_id", 0)) for chunk in chunks]

    # ------------------------------------------------------------------------------------------------ validation
    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._ids is None:
            return
        metrics = self.measure(pl_module)
        self.history.append({"step": trainer.global_step, **metrics})
        pl_module.log_dict({f"forgetting/{k}": v for k, v in metrics.items() if k != "nll"}, sync_dist=False)
        kl = metrics["kl"]
        if self.stop_kl is not None and kl > self.stop_kl:
            trainer.should_stop = True
            rank_zero_warn(f"ForgettingMonitor: KL(base || adapted) = {kl:.4g} per token > stop_kl={self.stop_kl} at "
                           f"step {trainer.global_step}; stopping.\nHINT: lower the learning rate or rank, or mix in "
                           "replay data (InstructionDataModule(replay=..., replay_ratio=0.1)).")
        elif self.warn_kl is not None and kl > self.warn_kl:
            rank_zero_warn(f"ForgettingMonitor: KL(base || adapted) = {kl:.4g} per token > warn_kl={self.warn_kl} at "
                           f"step {trainer.global_step}.")
        else:
            rank_zero_info(f"ForgettingMonitor: step {trainer.global_step}: KL {kl:.4g}/token, reference perplexity "
                           f"{metrics['ppl']:.4g}.")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.results_file is None or self._ids is None:
            return
        if self._live and not can_disable(target_module(pl_module, self.module)):
            rank_zero_warn("ForgettingMonitor: the adapters were merged before fit end; no final measurement.")
        else:
            self.history.append({"step": trainer.global_step, "final": True, **self.measure(pl_module)})
        if trainer.is_global_zero:
            from lightning_lora.surgery.io.atomic import atomic_file

            with atomic_file(self.results_file) as tmp:
                tmp.write_text(json.dumps({"references": self.references, "live": self._live,
                                           "history": self.history}, indent=2) + "\n")

    def measure(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """The forgetting metrics now (``ppl``, ``nll``, ``kl``); needs ``on_fit_start`` to have run."""
        model = target_module(pl_module, self.module)
        with _mixed_precision_autocast(model):
            return forgetting_metrics(model, self._batches(), None if self._live else self._stats)

    # ------------------------------------------------------------------------------------------------ resume
    @override
    def state_dict(self) -> dict[str, Any]:
        # Plain types and tensors only: checkpoints are read with weights_only=True.
        return {"ids": self._ids, "pad_id": getattr(self, "_pad_id", 0),
                "stats": [s.to_dict() for s in self._stats] if self._stats is not None else None,
                "history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ids, self._pad_id = state_dict.get("ids"), state_dict.get("pad_id", 0)
        stats = state_dict.get("stats")
        self._stats = [ReferenceStatistics(**s) for s in stats] if stats is not None else None
        self.history = list(state_dict.get("history", []))


def _mixed_precision_autocast(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Autocast to the model's low-precision dtype when it mixes that with float32 (``dtype="auto"``: a bf16 frozen
    base beside fp32 trainable blocks), as the module's own steps do; a no-op for a model of one dtype."""
    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    low = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
    if not low or torch.float32 not in dtypes:
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=low[0])


def _read_texts(references: str) -> list[str]:
    if references in ("general", "self"):
        return list(GENERAL_REFERENCE)
    path = Path(references)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [str(json.loads(line)["text"]) for line in lines]
    return lines


__all__ = ["ForgettingMonitor"]
