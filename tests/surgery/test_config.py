"""LoRAConfig validation: every bad value is named, with the valid range, all problems in one error."""

from __future__ import annotations

import math

import pytest

from lightning_lora.surgery import LoRAConfig, LoRAConfigError, apply_lora, lora_layers
from tests.factories import tiny_llama, unchanged


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(r=0), r"r=0: the rank must be a positive integer"),
    (dict(r=-4), r"r=-4: the rank must be a positive integer"),
    (dict(r=2.5), r"r=2\.5: the rank must be a positive integer"),
    (dict(r=True), r"r=True: the rank must be a positive integer"),
    (dict(alpha=0), r"alpha=0: must be a positive number"),
    (dict(alpha=-1.0), r"alpha=-1\.0: must be a positive number"),
    (dict(alpha=math.nan), r"alpha=nan: must be a positive number"),
    (dict(dropout=1.0), r"dropout=1\.0: must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout=-0\.1: must be in \[0, 1\)"),
    (dict(layers="a:b"), r"layers='a:b': use a slice string like '-8:'"),
    (dict(layers="3"), r"layers='3': use a slice string like '-8:'"),
    (dict(layers="::0"), r"layers='::0': a slice step cannot be zero"),
    (dict(layers=[]), r"layers=\[\]: give a non-empty list of block indices"),
    (dict(layers=[1.5]), r"layers=\[1\.5\]: give a non-empty list of block indices"),
    (dict(layers=[True]), r"layers=\[True\]: give a non-empty list of block indices"),
    (dict(bias="some"), r"bias='some': must be one of 'none', 'all', 'lora_only'"),
    (dict(init="zeros"), r"init='zeros': must be 'kaiming' or 'gaussian'"),
    (dict(targets=[]), r"targets=\[\]: give at least one non-empty pattern"),
    (dict(targets=[""]), r"targets=\[''\]: give at least one non-empty pattern"),
    (dict(targets=["re:q_(proj"]), r"'re:q_\(proj': not a valid regular expression \(missing \)"),
    (dict(exclude="re:["), r"'re:\[': not a valid regular expression"),
    (dict(modules_to_save=["re:*"]), r"'re:\*': not a valid regular expression"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]=0: ranks must be positive integers"),
    (dict(alpha_pattern={"q_proj": -2}), r"alpha_pattern\['q_proj'\]=-2: alphas must be positive numbers"),
    (dict(rank_pattern={"(": 4}), r"rank_pattern key '\(': not a valid regular expression"),
])
def test_invalid_values_are_named_with_the_valid_range(kwargs: dict, match: str) -> None:
    model = tiny_llama(num_layers=1)
    with unchanged(model), pytest.raises(LoRAConfigError, match=match):
        apply_lora(model, LoRAConfig(**kwargs))
    assert not lora_layers(model)


def test_every_problem_is_reported_in_one_error() -> None:
    with pytest.raises(LoRAConfigError) as info:
        LoRAConfig(r=0, alpha=-1, dropout=1.5, layers="x", bias="b", init="i", targets=["re:("])
    message = str(info.value)
    assert message.startswith("Invalid LoRAConfig:")
    for field in ("r=0", "alpha=-1", "dropout=1.5", "layers='x'", "bias='b'", "init='i'", "'re:('"):
        assert f"  - {field}" in message, field


def test_config_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        LoRAConfig(r=0)


def test_normalisation_and_round_trip() -> None:
    cfg = LoRAConfig(targets="q_proj", exclude="re:.*\\.0\\..*", layers=(0, 1))
    assert cfg.targets == ["q_proj"] and cfg.exclude == ["re:.*\\.0\\..*"] and cfg.layers == [0, 1]
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_refuses_unknown_fields_by_name() -> None:
    with pytest.raises(LoRAConfigError, match=r"Unknown LoRAConfig field\(s\) \['lora_alpha'\]; valid fields are \["):
        LoRAConfig.from_dict({"r": 8, "lora_alpha": 16})


def test_scale_per_module_follows_patterns_and_rslora() -> None:
    cfg = LoRAConfig(r=4, alpha=8, rank_pattern={"q_proj": 16}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 64})
    assert cfg.scale_for("model.layers.1.self_attn.v_proj") == 2.0
    assert cfg.scale_for("model.layers.1.self_attn.q_proj") == 0.5  # 8 / 16
    assert cfg.scale_for("model.layers.0.self_attn.q_proj") == 4.0  # 64 / 16
    assert cfg.rank_for("model.layers.0.self_attn.xq_proj") == 4  # a pattern matches at a dot boundary only
    assert LoRAConfig(r=16, alpha=8, use_rslora=True).scale_for("x") == 2.0  # 8 / sqrt(16)
