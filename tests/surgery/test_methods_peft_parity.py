"""Prompt tuning, P-tuning and prefix tuning against Hugging Face PEFT 0.21, on Llama, GPT-2 and Phi.

* Files both ways: a file we save loads in PEFT with identical logits on the real tokens (fp32, <= 1e-5), and a file
  PEFT saves loads in ours with identical logits.
* Generation: our ``generate`` (KV cache, left padding) equals greedy decoding step by step through PEFT's
  ``forward`` for each row alone, unpadded (PEFT 0.21's own ``generate`` is broken for these methods with
  transformers 5, see ENVIRONMENT.md, so it is not the reference).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import (  # noqa: E402
    PeftModel,
    PromptEncoderConfig,
    get_peft_model,  # noqa: E402
)
from peft import PrefixTuningConfig as PeftPrefix
from peft import PromptTuningConfig as PeftPrompt

from lightning_lora.surgery import (  # noqa: E402
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    apply_peft,
    load_adapter,
    save_adapter,
)
from tests.factories import input_ids, tiny_gpt2, tiny_llama, tiny_phi  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "phi": tiny_phi}
N = 3
OURS = {
    "prompt": PromptTuningConfig(num_virtual_tokens=N),
    "p_tuning": PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=16),
    "prefix": PrefixTuningConfig(num_virtual_tokens=N),
    "prefix_projection": PrefixTuningConfig(num_virtual_tokens=N, projection=True, projection_hidden_size=16),
}
PEFT = {
    "prompt": lambda: PeftPrompt(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "p_tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16),
    "prefix": lambda: PeftPrefix(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "prefix_projection": lambda: PeftPrefix(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True,
                                            encoder_hidden_size=16),
}


@pytest.fixture(scope="module")
def bases() -> dict[str, torch.nn.Module]:
    return {name: factory() for name, factory in FAMILIES.items()}


def _ours_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _peft_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return logits[:, -ids.shape[1]:]  # prompt / P-tuning: PEFT keeps the virtual positions in front


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(OURS))
def test_our_file_loads_in_peft_with_identical_logits(bases, tmp_path, family, method):
    ours = copy.deepcopy(bases[family])
    apply_peft(ours, OURS[method])
    save_adapter(ours, tmp_path / "a")
    body = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert body["peft_type"] == {"prompt": "PROMPT_TUNING", "p_tuning": "P_TUNING"}.get(method, "PREFIX_TUNING")
    theirs = PeftModel.from_pretrained(copy.deepcopy(bases[family]), str(tmp_path / "a"))
    ids = input_ids()
    expected = _peft_logits(theirs, ids)
    torch.testing.assert_close(_ours_logits(ours.eval(), ids), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, _ours_logits(bases[family], ids), atol=1e-3)  # the adapter does something


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(OURS))
def test_peft_file_loads_in_ours_with_identical_logits(bases, tmp_path, family, method):
    torch.manual_seed(1)
    theirs = get_peft_model(copy.deepcopy(bases[family]), PEFT[method]()).eval()
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = copy.deepcopy(bases[family])
    load_adapter(ours, tmp_path / "p")
    ids = input_ids(seed=3)
    torch.testing.assert_close(_ours_logits(ours, ids), _peft_logits(theirs, ids), atol=1e-5, rtol=0)


def test_sidecar_keeps_the_encoder_so_training_can_continue(bases, tmp_path):
    ours = copy.deepcopy(bases["llama"])
    apply_peft(ours, OURS["p_tuning"])
    save_adapter(ours, tmp_path / "a")
    again = copy.deepcopy(bases["llama"])
    load_adapter(again, tmp_path / "a", trainable=True)
    names = sorted(n for n, p in again.named_parameters() if p.requires_grad)
    assert names == sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    for (n1, p1), (n2, p2) in zip(sorted(ours.state_dict().items()), sorted(again.state_dict().items())):
        assert n1 == n2 and torch.equal(p1, p2)


def _peft_greedy_row(model: torch.nn.Module, row: list[int], steps: int) -> list[int]:
    ids = torch.tensor([row])
    out: list[int] = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            nxt = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generate_with_left_padding_equals_peft_forward_greedy(bases, tmp_path, family, method):
    ours = copy.deepcopy(bases[family])
    apply_peft(ours, OURS[method])
    ours.eval()
    save_adapter(ours, tmp_path / "a")
    theirs = PeftModel.from_pretrained(copy.deepcopy(bases[family]), str(tmp_path / "a")).eval()
    rows = [[5, 9, 17, 33, 40, 41], [7, 8, 90]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    steps = 6
    with torch.no_grad():
        generated = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
    for i, row in enumerate(rows):
        assert generated[i, width:].tolist() == _peft_greedy_row(theirs, row, steps), f"row {i}"
