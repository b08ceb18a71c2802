"""Tiny, seeded transformers models built from configs (never downloaded), shared by the tests.

Every factory returns an fp32 model in eval mode whose weights depend only on the seed, so two calls with the same
arguments give bit-identical models (parity tests build one for us and one for PEFT).

``FAMILIES`` maps a family name to its factory, for tests parametrized over every supported model family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 128
HIDDEN = 32


def _build(model_cls: type[PreTrainedModel], config: object, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = model_cls(config)
    return model.float().eval()


def tiny_llama(num_layers: int = 4, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """A Llama causal LM: hidden 32, 4 heads / 2 KV heads, MLP 64, vocab 128.

    Modules: ``model.layers.N.self_attn.{q,k,v,o}_proj``, ``model.layers.N.mlp.{gate,up,down}_proj``, ``lm_head``.

    Args:
        num_layers: Number of decoder blocks. Default: 4.
        tie: Tie ``lm_head`` to the input embedding. Default: False.
        seed: Seed of the random initialisation. Default: 0.
    """
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return _build(LlamaForCausalLM, config, seed)


def tiny_gpt2(num_layers: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    """A GPT-2 LM (Conv1D layers): ``transformer.h.N.attn.{c_attn,c_proj}``, ``transformer.h.N.mlp.{c_fc,c_proj}``.

    Args:
        num_layers: Number of blocks. Default: 2.
        seed: Seed of the random initialisation. Default: 0.
    """
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=num_layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=VOCAB - 1,
                        eos_token_id=VOCAB - 1)
    return _build(GPT2LMHeadModel, config, seed)


def tiny_bert(num_layers: int = 2, num_labels: int = 3, seed: int = 0) -> BertForSequenceClassification:
    """A BERT sequence classifier: ``bert.encoder.layer.N.attention.self.{query,key,value}``,
    ``...attention.output.dense``, ``...intermediate.dense``, ``...output.dense``, ``bert.pooler.dense``, ``classifier``.

    Args:
        num_layers: Number of encoder blocks. Default: 2.
        num_labels: Classifier outputs. Default: 3.
        seed: Seed of the random initialisation. Default: 0.
    """
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _build(BertForSequenceClassification, config, seed)


def tiny_opt(num_layers: int = 2, seed: int = 0) -> OPTForCausalLM:
    """An OPT causal LM: ``model.decoder.layers.N.self_attn.{q,k,v,out}_proj``, ``model.decoder.layers.N.fc{1,2}``.

    Args:
        num_layers: Number of decoder blocks. Default: 2.
        seed: Seed of the random initialisation. Default: 0.
    """
    config = OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=4,
                       ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=HIDDEN, dropout=0.0,
                       attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return _build(OPTForCausalLM, config, seed)


def tiny_phi(num_layers: int = 2, seed: int = 0) -> PhiForCausalLM:
    """A Phi causal LM: ``model.layers.N.self_attn.{q,k,v}_proj`` + ``.dense``, ``model.layers.N.mlp.fc{1,2}``.

    Args:
        num_layers: Number of decoder blocks. Default: 2.
        seed: Seed of the random initialisation. Default: 0.
    """
    config = PhiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=num_layers,
                       num_attention_heads=4, max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0,
                       attention_dropout=0.0)
    return _build(PhiForCausalLM, config, seed)


def tiny_t5(num_layers: int = 2, seed: int = 0) -> T5ForConditionalGeneration:
    """A T5 encoder-decoder: ``{encoder,decoder}.block.N.layer.M.SelfAttention.{q,k,v,o}``,
    ``...DenseReluDense.{wi,wo}``; its feed-forward reads ``wo.weight`` directly (wrappers must pass it through).

    Args:
        num_layers: Blocks in the encoder and in the decoder. Default: 2.
        seed: Seed of the random initialisation. Default: 0.
    """
    config = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=num_layers, num_heads=4,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return _build(T5ForConditionalGeneration, config, seed)


FAMILIES: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "opt": tiny_opt,
    "phi": tiny_phi,
    "t5": tiny_t5,
}


def input_ids(batch: int = 2, seq: int = 8, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids of shape ``(batch, seq)`` in ``[3, vocab)`` (ids 0-2 are often special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=generator)


def forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids`` with autograd as it is (encoder-decoders get ``ids`` as decoder input too)."""
    extra = {"decoder_input_ids": ids} if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else {}
    return model(input_ids=ids, **extra).logits


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids`` under ``no_grad`` (causal LMs, sequence classifiers, and encoder-decoders,
    which get ``ids`` as decoder input too)."""
    with torch.no_grad():
        return forward(model, ids)


def perturb_lora_B(model: nn.Module, std: float = 0.1, seed: int = 0, adapter: str | None = None) -> int:
    """Fill every LoRA B factor with seeded N(0, std) noise, in place (B starts at zero, so a fresh adapter is a no-op
    and merge tests would prove nothing).

    Works on our :class:`~lightning_lora.LoRALayer` (``lora_B`` is a ParameterDict) and on PEFT's LoRA layers
    (``lora_B`` is a ModuleDict of ``nn.Linear``), visiting modules and adapters in a fixed order.

    Args:
        model: A model with LoRA layers.
        std: Standard deviation of the noise. Default: 0.1.
        seed: Seed of the noise. Default: 0.
        adapter: Only this adapter name. Default: every adapter.

    Returns:
        How many B tensors were changed.
    """
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for _, module in model.named_modules():
            factors = getattr(module, "lora_B", None)
            if not isinstance(factors, (nn.ParameterDict, nn.ModuleDict)):
                continue
            for name in sorted(factors.keys()):
                if adapter is not None and name != adapter:
                    continue
                tensor = factors[name].weight if isinstance(factors[name], nn.Module) else factors[name]
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std
                tensor.copy_(noise.to(tensor.dtype))
                changed += 1
    return changed


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict, for bitwise before / after comparisons."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Assert the model's state dict has the same keys as ``before`` and bit-identical values."""
    after = model.state_dict()
    assert list(after) == list(before), f"keys changed: +{sorted(set(after) - set(before))} -{sorted(set(before) - set(after))}"
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), f"{key} changed"


def lora_structure(model: nn.Module) -> list[tuple[str, list[str], list[str], list[str]]]:
    """Every LoRA wrapper with its adapters, active adapters and merged adapters (for "nothing changed" checks)."""
    from lightning_lora.surgery.lora.layer import LoRALayer

    return [(n, sorted(m.specs), list(m.active_adapters), list(m.merged_adapters))
            for n, m in model.named_modules() if isinstance(m, LoRALayer)]


@contextmanager
def unchanged(model: nn.Module) -> Iterator[None]:
    """Assert that the block leaves the model exactly as it was: state dict keys and values (bitwise), LoRA wrappers
    and their adapters, and every parameter's ``requires_grad``.

    Put it outside ``pytest.raises`` so that the check runs after the expected exception was caught::

        with unchanged(model), pytest.raises(TargetMatchError, match="q_prj"):
            apply_lora(model, LoRAConfig(targets=["q_prj"]))
    """
    before = state_snapshot(model)
    structure = lora_structure(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    yield
    assert_same_state(before, model)
    assert lora_structure(model) == structure
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
