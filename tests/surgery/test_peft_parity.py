"""Parity with Hugging Face PEFT 0.21: same layers wrapped, same trainable parameters, same outputs, and adapter
files that load both ways.

Our ``LoRAConfig`` is translated to PEFT's ``LoraConfig`` field by field (``targets`` -> ``target_modules``,
``layers`` -> ``layers_to_transform`` resolved to non-negative indices, ``exclude`` -> ``exclude_modules``...).
Where the two deliberately differ, the test that pins the difference says so in its docstring.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import fields

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from lightning_lora.surgery import LoRAConfig, LoRALayer, TargetMatchError, apply_lora, load_adapter, save_adapter  # noqa: E402
from lightning_lora.surgery.io.peft_format import task_type_of  # noqa: E402
from lightning_lora.surgery.lora.targets import num_blocks, resolve_layers  # noqa: E402
from tests.factories import FAMILIES, input_ids, logits  # noqa: E402

# transformers 5 deprecation warning raised inside PEFT; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

CASES = {
    "llama-qv": ("llama", dict(targets=["q_proj", "v_proj"])),
    "llama-all-linear": ("llama", dict(targets="all-linear")),
    "llama-all-linear-last2": ("llama", dict(targets="all-linear", layers="-2:")),
    "llama-layers-patterns": ("llama", dict(targets=["q_proj", "k_proj", "v_proj"], layers=[0, -1],
                                             rank_pattern={"k_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 3})),
    "llama-rslora-lm_head": ("llama", dict(targets="all-linear", use_rslora=True, modules_to_save=["lm_head"])),
    "gpt2-all-linear-lora_only": ("gpt2", dict(targets="all-linear", bias="lora_only")),
    "gpt2-c_attn-bias_all-ln_f": ("gpt2", dict(targets=["c_attn"], bias="all", modules_to_save=["ln_f"])),
    "bert-qv-classifier": ("bert", dict(targets=["query", "value"], modules_to_save=["classifier"])),
    "bert-all-linear-bias_all": ("bert", dict(targets="all-linear", modules_to_save=["classifier"], bias="all")),
    "opt-all-linear-layer1-lora_only": ("opt", dict(targets="all-linear", layers=[1], bias="lora_only")),
    "opt-fc-bias_all": ("opt", dict(targets=["fc1", "fc2"], bias="all")),
    "phi-rank_pattern-lm_head": ("phi", dict(targets=["fc1", "fc2", "dense"], rank_pattern={"fc1": 8},
                                             modules_to_save=["lm_head"])),
    "phi-exclude-lora_only": ("phi", dict(targets="all-linear", exclude=["dense"], bias="lora_only")),
    "llama-regex": ("llama", dict(targets=[r"re:.*\.layers\.[12]\.self_attn\.(q|k)_proj"])),
    "phi-regex-exclude": ("phi", dict(targets="all-linear", exclude=[r"re:.*\.layers\.0\..*"], dropout=0.1)),
    # T5 reads `wo.weight` in its feed-forward: the wrapper must pass `.weight` through, as PEFT's does.
    "t5-qkvo-wi-wo": ("t5", dict(targets=["q", "k", "v", "o", "wi", "wo"])),
    "t5-all-linear": ("t5", dict(targets="all-linear")),
}


def peft_config(model: nn.Module, cfg: LoRAConfig) -> LoraConfig:
    """The PEFT config that means what ``cfg`` means on ``model``."""
    layers = resolve_layers(cfg.layers, num_blocks(model))
    targets: str | list[str] = "all-linear" if cfg.targets == ["all-linear"] else list(cfg.targets)
    if layers is not None and targets == "all-linear":
        # PEFT refuses layers_to_transform with a string target ("all-linear"); name the linear layers instead.
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALayer)})
    if len(cfg.targets) == 1 and cfg.targets[0].startswith("re:"):
        targets = cfg.targets[0][3:]  # PEFT: a string target is a full-match regex
    exclude = cfg.exclude[0][3:] if len(cfg.exclude) == 1 and cfg.exclude[0].startswith("re:") else cfg.exclude
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        exclude_modules=exclude or None, layers_to_transform=sorted(layers) if layers else None,
        rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern, use_rslora=cfg.use_rslora, bias=cfg.bias,
        modules_to_save=cfg.modules_to_save or None, task_type=task_type_of(model),
        fan_in_fan_out=any(m.codec.name == "Conv1D" for m in model.modules() if isinstance(m, LoRALayer)),
    )


def our_name(peft_param: str) -> str:
    """A PEFT parameter name as the parameter is called in our model (adapter "default" in both)."""
    name = peft_param.removeprefix("base_model.model.")
    name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.default", name)
    return name.replace(".modules_to_save.default.", ".")


def build(case: str) -> tuple[nn.Module, nn.Module, LoRAConfig]:
    family, kwargs = CASES[case]
    cfg = LoRAConfig(r=4, alpha=8, **kwargs)
    ours = FAMILIES[family]()
    apply_lora(ours, cfg)
    theirs = get_peft_model(FAMILIES[family](), peft_config(ours, cfg)).eval()  # PEFT's new dropouts start in train mode
    return ours, theirs, cfg


def train_a_little(model: nn.Module, seed: int = 1) -> None:
    """Fill every trainable tensor with seeded noise (B included: a zero B would make logit checks vacuous)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def copy_into_peft(ours: nn.Module, theirs: nn.Module) -> None:
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(params[our_name(name)])


def quiet_load(path, family: str) -> tuple[nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(FAMILIES[family](), str(path))
    messages = [str(w.message) for w in caught if "gradient_checkpointing" not in str(w.message)]  # transformers'
    return model, messages


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_wrapped_modules_and_trainable_parameters(case: str) -> None:
    ours, theirs, _ = build(case)
    wrapped = sorted(n for n, m in ours.named_modules() if isinstance(m, LoRALayer))
    peft_wrapped = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == peft_wrapped
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(our_name(n) for n, p in theirs.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_identical_weights_give_identical_logits(case: str) -> None:
    ours, theirs, _ = build(case)
    train_a_little(ours)
    copy_into_peft(ours, theirs)
    ids = input_ids()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_adapter_loads_in_peft(case: str, tmp_path) -> None:
    ours, _, _ = build(case)
    train_a_little(ours)
    save_adapter(ours, tmp_path)
    body = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(body) <= {f.name for f in fields(LoraConfig)}, "keys PEFT does not know would warn on load"
    loaded, messages = quiet_load(tmp_path, CASES[case][0])
    assert messages == []
    wrapped = sorted(n for n, m in ours.named_modules() if isinstance(m, LoRALayer))
    assert sorted(n.removeprefix("base_model.model.") for n, m in loaded.named_modules() if isinstance(m, LoraLayer)) == wrapped
    ids = input_ids()
    torch.testing.assert_close(logits(loaded, ids), logits(ours, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here(case: str, tmp_path) -> None:
    _, theirs, _ = build(case)
    train_a_little(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = FAMILIES[CASES[case][0]]()
    load_adapter(ours, tmp_path)
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, LoraLayer))
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, LoRALayer)) == wrapped
    ids = input_ids()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=0, atol=1e-5)


def test_gpt2_adapter_is_saved_as_a_causal_lm_with_fan_in_fan_out(tmp_path) -> None:
    """GPT-2's Conv1D stores weights as (in, out): PEFT needs ``fan_in_fan_out=True``, and ``GPT2LMHeadModel`` (not
    ``...ForCausalLM``) is still a causal LM, so PEFT should build a ``PeftModelForCausalLM`` (with ``generate``)."""
    model = FAMILIES["gpt2"]()
    apply_lora(model, LoRAConfig(r=2, targets=["c_attn"]))
    save_adapter(model, tmp_path)
    body = json.loads((tmp_path / "adapter_config.json").read_text())
    assert body["fan_in_fan_out"] is True and body["task_type"] == "CAUSAL_LM"
    loaded, _ = quiet_load(tmp_path, "gpt2")
    assert type(loaded).__name__ == "PeftModelForCausalLM"


# ------------------------------------------------------------------------------------------- deliberate differences
def test_difference_each_unmatched_target_pattern_is_an_error() -> None:
    """Difference: PEFT raises only when *no* target pattern matches and silently ignores the others; we raise for
    *each* pattern that matches nothing (a typo would otherwise train fewer layers than asked), listing the closest
    module names. Loading an adapter file keeps PEFT's leniency (configs written for a model family)."""
    theirs = get_peft_model(FAMILIES["llama"](), LoraConfig(r=2, target_modules=["q_proj", "v_prj"]))
    assert sum(isinstance(m, LoraLayer) for m in theirs.modules()) == 4
    with pytest.raises(TargetMatchError, match=r"'v_prj' matched no module \(closest module names: v_proj"):
        apply_lora(FAMILIES["llama"](), LoRAConfig(r=2, targets=["q_proj", "v_prj"]))


def test_difference_unmatched_exclude_pattern_is_an_error() -> None:
    """Difference: an ``exclude`` pattern that matches nothing is a warning in PEFT and an error here."""
    with pytest.warns(UserWarning, match="no modules were excluded"):
        get_peft_model(FAMILIES["llama"](), LoraConfig(r=2, target_modules=["q_proj"], exclude_modules=["o_prj"]))
    with pytest.raises(TargetMatchError, match=r"exclude pattern 'o_prj' matched no module \(closest module names: o_proj"):
        apply_lora(FAMILIES["llama"](), LoRAConfig(r=2, targets=["q_proj"], exclude=["o_prj"]))


def test_difference_all_linear_never_adapts_a_classifier_head() -> None:
    """Difference: PEFT's "all-linear" leaves out the output embedding, and the ``classifier`` / ``score`` head only
    when ``task_type="SEQ_CLS"``; ours also leaves out top-level heads named ``classifier``, ``score``,
    ``qa_outputs`` whatever the task type (train a head fully with ``modules_to_save`` instead). With
    ``task_type="SEQ_CLS"`` both agree (see the ``bert-*`` parity cases)."""
    theirs = get_peft_model(FAMILIES["bert"](), LoraConfig(r=2, target_modules="all-linear"))
    assert isinstance(theirs.base_model.model.classifier, LoraLayer)
    ours = FAMILIES["bert"]()
    report = apply_lora(ours, LoRAConfig(r=2, targets="all-linear"))
    assert "classifier" not in report.replaced and "bert.pooler.dense" in report.replaced
    assert isinstance(ours.classifier, nn.Linear)


def test_difference_seq_cls_head_is_not_trained_unless_asked() -> None:
    """Difference: PEFT's ``task_type="SEQ_CLS"`` silently adds ``classifier`` and ``score`` to ``modules_to_save``;
    we train exactly what the config lists, so a fresh classification head needs ``modules_to_save=["classifier"]``.
    Adapters saved by PEFT with that implicit list (``["classifier", "classifier", "score"]``) load here."""
    theirs = get_peft_model(FAMILIES["bert"](), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert theirs.peft_config["default"].modules_to_save == ["classifier", "score"]
    ours = FAMILIES["bert"]()
    apply_lora(ours, LoRAConfig(r=2, targets=["query"]))
    assert not ours.classifier.weight.requires_grad


def test_difference_layers_with_all_linear_negative_indices_and_slices() -> None:
    """Difference: PEFT refuses ``layers_to_transform`` with ``target_modules="all-linear"`` and takes only
    non-negative indices; we accept "all-linear" with ``layers``, negative indices and slice strings, and save the
    equivalent explicit ``target_modules`` + ``layers_to_transform`` so that PEFT loads the same adapter."""
    with pytest.raises(ValueError, match="layers_to_transform"):
        LoraConfig(r=2, target_modules="all-linear", layers_to_transform=[2, 3])
    report = apply_lora(FAMILIES["llama"](), LoRAConfig(r=2, targets="all-linear", layers="-2:"))
    assert len(report.replaced) == 14 and all(".layers.2." in n or ".layers.3." in n for n in report.replaced)
