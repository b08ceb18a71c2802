"""Forgetting measures on reference text: perplexity under the adapted model and KL(base || adapted) per token.

Plain PyTorch; :class:`~lightning_lora.callbacks.ForgettingMonitor` calls these at each validation.

The base distribution comes from one of two places:

* **live** (:func:`lightning_lora.disable_adapters` around a forward pass): exact, full-vocabulary KL, no second copy
  of the model; needs LoRA layers that can be switched off;
* **cached** (:func:`reference_statistics`, computed once before training): the log-probability of each reference
  token and the base's top-k tokens with their log-probabilities. For full fine-tuning or layer freezing, where
  nothing can be switched off. The KL is then taken between the two distributions coarsened to ``top-k + "rest"``
  (k + 1 outcomes): a lower bound of the full KL (coarsening never increases a KL divergence), exactly 0 when
  nothing changed, and small to keep: ``T * (2k + 1)`` numbers per reference text instead of ``T * V``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lora.surgery.lora.active import disable_adapters
from lightning_lora.surgery.lora.inventory import lora_layers


@dataclass
class ReferenceBatch:
    """Reference token ids, right-padded: ``ids`` (N, T) and ``mask`` (N, T) with 1 on real tokens."""

    ids: Tensor
    mask: Tensor


@dataclass
class ReferenceStatistics:
    """The base model's statistics on a :class:`ReferenceBatch` (see the module docstring).

    Attributes:
        token_logprobs: (N, T-1) log p_base(next reference token).
        topk_ids: (N, T-1, k) the base's k most likely next tokens.
        topk_logprobs: (N, T-1, k) their base log-probabilities.
    """

    token_logprobs: Tensor
    topk_ids: Tensor
    topk_logprobs: Tensor

    def to_dict(self) -> dict[str, Tensor]:
        """Plain tensors (safe for ``torch.load(weights_only=True)`` checkpoints)."""
        return {"token_logprobs": self.token_logprobs, "topk_ids": self.topk_ids, "topk_logprobs": self.topk_logprobs}


def make_reference_batch(token_lists: list[list[int]], pad_id: int = 0) -> ReferenceBatch:
    """Right-pad token id lists into a :class:`ReferenceBatch`."""
    length = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), length), dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, : len(tokens)] = 1
    return ReferenceBatch(ids, mask)


def next_token_logprobs(model: nn.Module, batch: ReferenceBatch) -> Tensor:
    """(N, T-1, V) fp32 log-probabilities of the next token at each position, in eval mode and without grad."""
    return _logprobs(model, batch.ids, batch.mask)[:, :-1]


def _logprobs(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            ids, mask = ids.to(device), mask.to(device)
            if "input_ids" in inspect.signature(model.forward).parameters:
                out = model(input_ids=ids, attention_mask=mask)
            else:
                out = model(ids)
            logits = out.logits if hasattr(out, "logits") else out  # (N, T, V)
            return F.log_softmax(logits.float(), dim=-1).cpu()  # (N, T, V)
    finally:
        model.train(was_training)


def reference_statistics(model: nn.Module, batch: ReferenceBatch, top_k: int = 20) -> ReferenceStatistics:
    """Compute and keep the base statistics (call before training changes the model)."""
    logprobs = next_token_logprobs(model, batch)  # (N, T-1, V)
    targets = batch.ids[:, 1:]  # (N, T-1)
    top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
    return ReferenceStatistics(logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), top.indices, top.values)


def can_disable(model: nn.Module) -> bool:
    """Whether the base can be measured live (the model has LoRA layers and none is merged)."""
    layers = lora_layers(model)
    return bool(layers) and not any(layer.merged_adapters for _, layer in layers)


def forgetting_metrics(model: nn.Module, batches: list[ReferenceBatch],
                       base: list[ReferenceStatistics] | None = None) -> dict[str, float]:
    """``{"ppl": ..., "nll": ..., "kl": ...}`` of ``model`` on the reference batches (token-weighted).

    Args:
        model: The model being trained.
        batches: The reference tokens, in small batches (each costs an (N, T, V) fp32 tensor).
        base: Cached base statistics, one per batch; None measures the base live through ``disable_adapters``.

    Returns:
        ``ppl``: perplexity of the reference tokens under ``model``; ``nll``: its log; ``kl``: mean per-token
        KL(base || model) (exact when live, top-k coarsened when cached).
    """
    nll_sum = kl_sum = 0.0
    count = 0
    for i, batch in enumerate(batches):
        adapted = next_token_logprobs(model, batch)  # (N, T-1, V)
        valid = batch.mask[:, 1:].bool()  # (N, T-1) positions whose next token is real
        nll_sum -= adapted.gather(-1, batch.ids[:, 1:].unsqueeze(-1)).squeeze(-1)[valid].sum().item()
        if base is None:
            with disable_adapters(model):
                reference = next_token_logprobs(model, batch)
            kl = (reference.exp() * (reference - adapted)).sum(-1)  # (N, T-1)
        else:
            kl = _coarse_kl(base[i], adapted)
        kl_sum += kl[valid].clamp_min(0).sum().item()
        count += int(valid.sum())
    nll = nll_sum / max(count, 1)
    return {"ppl": math.exp(nll), "nll": nll, "kl": kl_sum / max(count, 1)}


def _coarse_kl(base: ReferenceStatistics, adapted: Tensor) -> Tensor:
    p_top = base.topk_logprobs.exp()  # (N, T-1, k)
    q_top_log = adapted.gather(-1, base.topk_ids)  # (N, T-1, k)
    kl = (p_top * (base.topk_logprobs - q_top_log)).sum(-1)  # (N, T-1)
    p_rest = (1 - p_top.sum(-1)).clamp_min(0)  # (N, T-1) base mass outside its top-k
    q_rest = (1 - q_top_log.exp().sum(-1)).clamp_min(1e-12)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), torch.zeros_like(p_rest))
    return kl + rest


@torch.no_grad()
def greedy_continuations(model: nn.Module, prompts: list[list[int]], max_new_tokens: int = 24,
                         eos_id: int | None = None) -> list[list[int]]:
    """Prompt + the base model's greedy continuation, per prompt (adapters switched off if there are any)."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])  # (1, T)
        for _ in range(max_new_tokens):  # a few dozen tokens, once per run: no KV cache needed
            if can_disable(model):
                with disable_adapters(model):
                    logprobs = _logprobs(model, ids, torch.ones_like(ids))
            else:
                logprobs = _logprobs(model, ids, torch.ones_like(ids))
            token = int(logprobs[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
            if eos_id is not None and token == eos_id:
                break
        out.append(ids[0].tolist())
    return out
