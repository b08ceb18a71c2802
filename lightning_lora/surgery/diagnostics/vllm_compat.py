"""Would vLLM serve this LoRA adapter? The rules of vLLM 0.11, read from its source.

Encoded from ``vllm/lora/peft_helper.py`` (``PEFTHelper._validate_features`` / ``validate_legal``) and
``vllm/config/lora.py`` (``MaxLoRARanks``) of vLLM 0.11 (the release whose ``LoRAConfig`` deprecates
``lora_extra_vocab_size`` "for removal in v0.12.0"):

* ``max_lora_rank`` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16); an adapter of rank ``r`` needs
  ``--max-lora-rank`` >= ``r``;
* ``modules_to_save`` must be empty ("vLLM only supports modules_to_save being None");
* DoRA is refused ("vLLM does not yet support DoRA");
* ``bias != "none"`` needs ``--enable-lora-bias``;
* one scale ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) for every module: ``rank_pattern`` / ``alpha_pattern``
  are not read, so modules they change are scaled differently than in training;
* LoRA applies to the linear projections of the model (vLLM's ``*WithLoRA`` layers); embeddings and ``lm_head``
  only for models that list them in ``embedding_modules``.

All findings are warnings: the adapter is fine for transformers / PEFT / lightning-lora either way.
"""

from __future__ import annotations

from lightning_lora.surgery.lora.config import LoRAConfig

VLLM_VERSION = "0.11"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_VLLM_DEFAULT_MAX_RANK = 16


def vllm_findings(config: LoRAConfig, ranks: dict[str, int], layer_kinds: dict[str, str]) -> list[str]:
    """What vLLM |version| would refuse or serve differently, one line each (empty: vLLM would serve it as trained).

    Args:
        config: The adapter's config.
        ranks: Rank of each adapted module, by path (from the tensors).
        layer_kinds: Base layer class name of each adapted module, by path (e.g. ``"Linear"``, ``"Embedding"``).
    """
    findings = []
    top = max(ranks.values(), default=config.r)
    fits = [r for r in VLLM_MAX_LORA_RANKS if r >= top]
    if not fits:
        findings.append(f"vLLM {VLLM_VERSION}: rank {top} exceeds the largest max_lora_rank it supports "
                        f"({VLLM_MAX_LORA_RANKS[-1]}).")
    elif top > _VLLM_DEFAULT_MAX_RANK:
        findings.append(f"vLLM {VLLM_VERSION}: rank {top} needs `--max-lora-rank {fits[0]}` (default "
                        f"{_VLLM_DEFAULT_MAX_RANK}).")
    if config.modules_to_save:
        findings.append(f"vLLM {VLLM_VERSION}: modules_to_save={config.modules_to_save!r} is refused "
                        "(vLLM only supports modules_to_save being None).")
    if getattr(config, "use_dora", False):
        findings.append(f"vLLM {VLLM_VERSION}: DoRA is refused.")
    if config.bias != "none":
        findings.append(f"vLLM {VLLM_VERSION}: bias={config.bias!r} needs `--enable-lora-bias`.")
    if config.rank_pattern or config.alpha_pattern:
        findings.append(f"vLLM {VLLM_VERSION}: rank_pattern / alpha_pattern are not read; every module is scaled by "
                        f"lora_alpha / r = {config.alpha}/{config.r}, so the modules they change behave differently "
                        "than in training.")
    other = sorted(path for path, kind in layer_kinds.items() if kind not in ("Linear", "Conv1D", "Linear4bit"))
    if other:
        findings.append(f"vLLM {VLLM_VERSION}: LoRA on non-linear layers {other[:4]} is served only for models that "
                        "list them in embedding_modules.")
    heads = sorted(path for path in layer_kinds if path.rsplit(".", 1)[-1] == "lm_head")
    if heads:
        findings.append(f"vLLM {VLLM_VERSION}: LoRA on {heads[0]} is served only for models that list lm_head in "
                        "embedding_modules.")
    return findings


vllm_findings.__doc__ = (vllm_findings.__doc__ or "").replace("|version|", VLLM_VERSION)
