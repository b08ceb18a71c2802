"""Bad LoRA input ends as a clear error naming the value and the fix, with the model unchanged (issue 10)."""

from __future__ import annotations

import math

import pytest

from lightning_lora.surgery import (
    LoRAConfig,
    LoRAConfigError,
    SurgeryError,
    apply_lora,
    merge_lora,
)
from tests.factories import perturb_lora_B, tiny_llama, unchanged


@pytest.mark.parametrize("alpha", [math.inf, -math.inf, math.nan])
def test_non_finite_alpha_is_refused(alpha: float) -> None:
    with pytest.raises(LoRAConfigError, match=rf"alpha={alpha!r}: must be a positive number, and finite"):
        LoRAConfig(alpha=alpha)


@pytest.mark.parametrize("alpha", [math.inf, math.nan])
def test_non_finite_alpha_pattern_is_refused(alpha: float) -> None:
    with pytest.raises(LoRAConfigError, match=r"alpha_pattern\['q_proj'\]=(inf|nan): alphas must be positive numbers, "
                                              r"and finite"):
        LoRAConfig(alpha_pattern={"q_proj": alpha})


def test_rank_pattern_typo_names_the_key_and_the_closest_names() -> None:
    model = tiny_llama(num_layers=1)
    with unchanged(model), pytest.raises(LoRAConfigError, match=r"q_prj(.|\n)*q_proj"):
        apply_lora(model, LoRAConfig(r=2, targets=["q_proj", "v_proj"], rank_pattern={"q_prj": 4}))


def test_apply_while_another_adapter_is_merged_changes_nothing() -> None:
    model = tiny_llama(num_layers=1)
    apply_lora(model, LoRAConfig(r=2, targets=["q_proj", "v_proj"]), name="a")
    perturb_lora_B(model)
    merge_lora(model, unload=False)
    with unchanged(model), pytest.raises(SurgeryError, match=r"merged"):
        apply_lora(model, LoRAConfig(r=2, targets=["q_proj", "k_proj"]), name="b")
