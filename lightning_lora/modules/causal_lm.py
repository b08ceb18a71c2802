"""The built-in LightningModule: a Hugging Face causal LM trained on the answer tokens of instruction data.

The model is loaded in ``configure_model`` (not ``__init__``), so a callback can wrap that hook and run LoRA
surgery right after the weights exist; the optimizer is then built over the parameters that still require
gradients.

Example:
    >>> import lightning as L
    >>> from lightning_lora.data.instruction import InstructionDataModule
    >>> module = CausalLMModule("smollm2-135m-instruct")
    >>> data = InstructionDataModule("examples/data/dates/train.jsonl", "examples/data/dates/val.jsonl",
    ...                              tokenizer="smollm2-135m-instruct")
    >>> L.Trainer(accelerator="cpu", max_steps=10).fit(module, data)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric, Metric

from lightning_lora.callbacks._model_ready import PRECISION, forget, when_model_ready
from lightning_lora.modules.loading import (
    DtypeName,
    load_causal_lm,
    load_causal_lm_on_meta,
    resolve_dtype,
    resolve_model_path,
)
from lightning_lora.modules.precision import (
    autocast_to,
    cast_frozen_,
    frozen_dtype_for_auto,
    to_float32_,
    upcast_trainable_,
)
from lightning_lora.surgery.training.sharding import is_sharded

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label the loss skips; the data module writes it on prompt and padding tokens


def default_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with lr 2e-4, the default of :class:`CausalLMModule`."""
    return torch.optim.AdamW(params, lr=2e-4)


class ExactMatch(Metric):
    """Fraction of predictions equal to their reference once surrounding whitespace is stripped."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        """Count ``predictions[i].strip() == references[i].strip()``."""
        if len(predictions) != len(references):
            raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
        self.correct += sum(p.strip() == r.strip() for p, r in zip(predictions, references))
        self.total += len(references)

    def compute(self) -> torch.Tensor:
        """The exact-match rate in [0, 1] (0 when nothing was counted)."""
        return self.correct / self.total.clamp(min=1)


_AUTO_PRECISION_KEY = "lightning_lora.modules.precision"


def _rows_in(batch: dict[str, Any]) -> int:
    """Examples in a batch: its rows, or in a packed batch the number of row starts (position id 0)."""
    if "position_ids" in batch and "attention_mask" not in batch:
        return int((batch["position_ids"] == 0).sum())
    return int(batch["input_ids"].shape[0])


def _apply_auto_precision(module: CausalLMModule) -> None:
    # Runs after LoRA surgery and freezing (priority PRECISION), before the strategy wraps the model and builds
    # the optimizer: parameter dtypes must be final by then (DDP buckets gradients by dtype).
    model = module._require_model()
    if next(model.parameters()).dtype != torch.float32:
        return  # a *-true Lightning precision set another default dtype for the load: leave it as it is
    dtype = frozen_dtype_for_auto(model)
    if dtype == torch.float32:
        rank_zero_info("dtype=auto: float32 (this machine has no faster bf16 matmul)")
        return
    n = cast_frozen_(model, dtype)
    module.frozen_dtype = dtype
    name = str(dtype).removeprefix("torch.")
    rank_zero_info(f"dtype=auto: forward under {name} autocast, frozen weights stored in {name} ({n / 1e6:.1f}M "
                   "elements) until training ends; trainable weights and optimizer state float32. HINT: "
                   "--model.dtype float32 (or LIGHTNING_LORA_AUTO_DTYPE=float32) keeps everything float32")


class CausalLMModule(L.LightningModule):
    """Fine-tune a causal LM on instruction batches (loss on answer tokens) and score greedy answers.

    Args:
        model: Model alias (``"smollm2-135m-instruct"``, the bundled 135M model), a local directory written
            by ``save_pretrained``, or a hub name ``org/name``. Default: ``"smollm2-135m-instruct"``.
        dtype: Weight dtype. ``auto``: load in float32; once LoRA / freezing have decided what trains, store the
            *frozen* weights in bfloat16 and run under bf16 autocast if this machine's bf16 matmuls are faster
            (CPUs with AMX / AVX512-BF16, confirmed by a timed probe; bf16-capable CUDA), trainable weights and
            optimizer state staying float32; otherwise everything float32. ``float32``, ``bfloat16`` or
            ``float16``: every weight (trainable ones too) in that dtype, no autocast. The environment variable
            ``LIGHTNING_LORA_AUTO_DTYPE=float32|bfloat16`` forces what ``auto`` picks. Default: ``"auto"``.
        optimizer: Builds the optimizer from the trainable parameters. Default: AdamW, lr 2e-4.
        scheduler: Builds a learning-rate scheduler from the optimizer, stepped every training step.
            Default: None.
        max_new_tokens: Tokens generated per validation prompt for exact match. Default: ``16``.
        exact_match: Generate greedily on validation prompts and log ``val_exact_match``. Default: ``True``.
        meta_init: Under ``ModelParallelStrategy`` (FSDP2), build the model on the meta device, let the callbacks
            apply LoRA and shard it, then read each process's rows of every weight from the ``save_pretrained``
            safetensors files: no process ever holds the whole model. Ignored under other strategies.
            Default: ``False``.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        dtype: DtypeName = "auto",
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 16,
        exact_match: bool = True,
        meta_init: bool = False,
    ) -> None:
        super().__init__()
        resolve_dtype(dtype)  # fail at construction on a bad name, not at fit time
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        # Optimizer callables are often lambdas or classes: not serialisable into checkpoints.
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.model_name_or_path = model
        self.load_dtype = dtype
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.max_new_tokens = max_new_tokens
        self.exact_match = exact_match
        self.meta_init = meta_init
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._packing_checked = False
        self.frozen_dtype: torch.dtype | None = None  # set by dtype="auto" once the trainable set is known
        self.val_loss_mean = MeanMetric()
        self.val_exact_match = ExactMatch()

    def configure_model(self) -> None:
        """Load the model and tokenizer, once; later calls do nothing (Lightning may call this repeatedly)."""
        if self.model is not None:
            return
        if self.meta_init and self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            self._build_on_meta()
            return
        self.model, self.tokenizer = load_causal_lm(self.model_name_or_path, self.load_dtype)
        # from_pretrained returns eval mode and Lightning >= 2.2 keeps submodule modes as found, which would
        # leave dropout (LoRA's included) off during training.
        self.model.train(self.training)

    def setup(self, stage: str) -> None:
        """With ``dtype="auto"``, arrange for the frozen weights to be cast after the callbacks' surgery."""
        if self.load_dtype == "auto":
            when_model_ready(self, _AUTO_PRECISION_KEY, PRECISION, _apply_auto_precision)

    def teardown(self, stage: str) -> None:
        """Unregister what :meth:`setup` registered."""
        forget(self, _AUTO_PRECISION_KEY)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Keep trainable weights float32: a block unfrozen mid-run (``LayerFreezing`` schedule) is upcast here."""
        if self.frozen_dtype is not None and self.model is not None:
            upcast_trainable_(self.model)

    def on_train_end(self) -> None:
        """With ``dtype="auto"`` in bf16: frozen weights back to float32 (their bf16 values) for merging / export."""
        if self.frozen_dtype is not None and self.model is not None:
            to_float32_(self.model)
            self.frozen_dtype = None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Outside a Trainer, rebuild the adapters that an adapter-only checkpoint holds.

        ``CausalLMModule.load_from_checkpoint(path)`` builds a module without adapters, then loads the checkpoint's
        state dict; Lightning runs only the module's own hooks there. So this hook loads the base model and applies
        the LoRA settings stored by :class:`~lightning_lora.callbacks.LoRAFinetuning`, checking that the base model
        is the one the adapters were trained on. Inside a Trainer (resume) the callback has done that already.
        """
        from lightning_lora.callbacks.lora_finetuning import LoRAFinetuning
        from lightning_lora.callbacks.peft_finetuning import PEFTFinetuning
        from lightning_lora.surgery.lora.inventory import adapter_configs

        found = [(cls, state) for cls in (LoRAFinetuning, PEFTFinetuning) for state in cls.states_in(checkpoint)]
        if not found or self._trainer is not None:
            return
        self.configure_model()
        for cls, state in found:
            if state.get("adapter_name") in adapter_configs(self._require_model()):
                continue
            callback = cls.from_state(state)
            callback.apply(self)
            callback.load_state_dict(state)

    def _build_on_meta(self) -> None:
        """Meta-device model now; its weights are loaded after the callbacks' surgery and sharding."""
        from lightning_lora.callbacks._model_ready import LOAD_WEIGHTS
        from lightning_lora.surgery.training.sharded_loading import materialize_and_load_

        self.model, self.tokenizer = load_causal_lm_on_meta(self.model_name_or_path, self.load_dtype)
        self.model.train(self.training)
        directory, device = resolve_model_path(self.model_name_or_path), self.trainer.strategy.root_device

        def load(module: CausalLMModule) -> None:
            read = materialize_and_load_(module.model, directory, device=device)
            log.info("rank %d read %.1f MiB of weights from %s", self.global_rank, read / 2**20, directory)

        # After LoRA and sharding when a callback registered them (the wrapper runs them right after this method);
        # without such a callback, the model is loaded whole here.
        rank_zero_info(f"CausalLMModule: built {directory} on the meta device; each process reads its shard of the "
                       "weights after the surgery and the sharding.")
        if "configure_model" in self.__dict__:
            when_model_ready(self, "CausalLMModule/load_weights", LOAD_WEIGHTS, load)
        else:
            load(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Run the wrapped model; returns its output (with ``.loss`` when ``labels`` is given)."""
        model = self._require_model()
        with autocast_to(self.frozen_dtype, self.device):
            return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Causal-LM loss on the answer tokens; logs ``train_loss``."""
        if "position_ids" in batch and not self._packing_checked:
            self._check_packing()
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=_rows_in(batch))
        return loss

    def _check_packing(self) -> None:
        from lightning_lora.data.packing import packing_problems

        problems = packing_problems(self._require_model())
        if problems:
            raise ValueError("packed batches (InstructionDataModule(packing=True)) cannot train this model:\n  - "
                             + "\n  - ".join(problems) + "\nHINT: set --data.packing false")
        self._packing_checked = True

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulate the token-weighted loss and, if the batch has ``answers``, greedy exact match."""
        loss = self._loss(batch)
        n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # the loss counts shifted labels
        self.val_loss_mean.update(loss.detach(), weight=n_tokens)
        if self.exact_match and "answers" in batch:
            predictions = self.generate_answers(batch["gen_input_ids"], batch["gen_attention_mask"])
            self.val_exact_match.update(predictions, batch["answers"])

    def on_validation_epoch_end(self) -> None:
        """Log ``val_loss``, ``val_ppl`` (exp of the mean token loss) and ``val_exact_match``."""
        self._log_eval("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """As :meth:`validation_step`; logged as ``test_loss``, ``test_ppl``, ``test_exact_match``."""
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        """Log ``test_loss``, ``test_ppl`` and ``test_exact_match``."""
        self._log_eval("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        """Greedy answers for the batch's prompts: ``[{"prediction": ..., "answer": ...}, ...]``."""
        predictions = self.generate_answers(batch["gen_input_ids"], batch["gen_attention_mask"])
        return [{"prediction": p, "answer": a} for p, a in zip(predictions, batch.get("answers", [""] * len(predictions)))]

    def _log_eval(self, prefix: str) -> None:
        if self.val_loss_mean.update_called:
            mean_loss = self.val_loss_mean.compute()
            self.log(f"{prefix}_loss", mean_loss, prog_bar=True)
            self.log(f"{prefix}_ppl", torch.exp(mean_loss))
        if self.val_exact_match.update_called:
            self.log(f"{prefix}_exact_match", self.val_exact_match.compute(), prog_bar=True)
        self.val_loss_mean.reset()
        self.val_exact_match.reset()

    def configure_optimizers(self) -> Any:
        """Build the optimizer over parameters with ``requires_grad`` only, so earlier freezing is respected."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(
                "no trainable parameters: every parameter has requires_grad=False. "
                "HINT: check the LoRA target modules, or unfreeze some parameters"
            )
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "step"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config.update(interval="epoch", monitor="val_loss")
        return {"optimizer": optimizer, "lr_scheduler": config}

    @torch.no_grad()
    def generate_answers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """Greedily continue left-padded prompts and decode only the new tokens.

        Args:
            input_ids: ``(B, T)`` prompt ids, left-padded.
            attention_mask: ``(B, T)``, 0 on padding.

        Returns:
            One decoded string per prompt, special tokens removed.
        """
        model, tokenizer = self._require_model(), self.tokenizer
        with autocast_to(self.frozen_dtype, self.device):
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                # Sharded (FSDP2): every forward is collective, so ranks keep stepping until all of them are done.
                synced_gpus=is_sharded(model),
                pad_token_id=tokenizer.pad_token_id,
            )  # (B, T + new)
        return tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)

    def evaluate_exact_match(self, dataloader: Iterable[dict[str, Any]]) -> float:
        """Exact-match rate of greedy answers over batches with ``gen_input_ids``/``answers``, outside a Trainer.

        Args:
            dataloader: E.g. ``InstructionDataModule.val_dataloader()``.

        Returns:
            The fraction of answers matched exactly (after stripping whitespace), in [0, 1].

        Raises:
            KeyError: If a batch lacks the generation keys.
        """
        self.configure_model()
        metric = ExactMatch().to(self.device)
        was_training = self.training
        try:
            for batch in dataloader:
                missing = {"gen_input_ids", "gen_attention_mask", "answers"} - set(batch)
                if missing:
                    raise KeyError(f"batch lacks {sorted(missing)}; use a validation dataloader (with_generation)")
                ids = batch["gen_input_ids"].to(self.device)
                mask = batch["gen_attention_mask"].to(self.device)
                metric.update(self.generate_answers(ids, mask), batch["answers"])
        finally:
            self.train(was_training)
        return float(metric.compute())

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        # HF shifts the labels and averages cross-entropy over the non-(-100) ones: the answer tokens. No cache in
        # training: none is needed, and transformers only keeps packed rows (position_ids, no attention mask, see
        # lightning_lora/data/packing.py) apart when there is none.
        kwargs: dict[str, Any] = {"labels": batch["labels"], "use_cache": False}
        if "position_ids" in batch:
            kwargs["position_ids"] = batch["position_ids"]
        return self(batch["input_ids"], batch.get("attention_mask"), **kwargs).loss

    def _require_model(self) -> PreTrainedModel:
        if self.model is None:
            raise RuntimeError("the model is not loaded yet: call configure_model() (the Trainer does it)")
        return self.model
