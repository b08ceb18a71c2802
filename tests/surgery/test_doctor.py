"""The adapter doctor: flags untrained, NaN, mis-configured and wrong-base adapters, passes a trained one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_lora import LoRAConfig, apply_lora, save_adapter
from lightning_lora.cli import main
from lightning_lora.surgery import lora_layers
from lightning_lora.surgery.diagnostics.doctor import diagnose_adapter
from lightning_lora.surgery.diagnostics.vllm_compat import vllm_findings
from tests.tiny_lm import build_tiny_causal_lm, save_tiny_causal_lm

ROOT = Path(__file__).resolve().parents[2]
CONFIG = LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])


def _train(model: torch.nn.Module, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("doctor")
    base = save_tiny_causal_lm(root / "base")
    model, _ = build_tiny_causal_lm()
    apply_lora(model, CONFIG)
    save_adapter(model, root / "untrained")
    _train(model.train())
    save_adapter(model, root / "trained")
    tensors = load_file(root / "trained" / "adapter_model.safetensors")
    (root / "nan").mkdir()
    (root / "nan" / "adapter_config.json").write_text((root / "trained" / "adapter_config.json").read_text())
    key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_B" in k)
    tensors[key][0, 0] = math.nan
    save_file(tensors, str(root / "nan" / "adapter_model.safetensors"))
    (root / "badconfig").mkdir()
    config = json.loads((root / "trained" / "adapter_config.json").read_text())
    config["r"] = 8
    (root / "badconfig" / "adapter_config.json").write_text(json.dumps(config))
    weights = (root / "trained" / "adapter_model.safetensors").read_bytes()
    (root / "badconfig" / "adapter_model.safetensors").write_bytes(weights)
    other = LlamaOther()
    apply_lora(other, CONFIG)
    for _, layer in lora_layers(other):
        torch.nn.init.normal_(layer.lora_B["default"])
    save_adapter(other, root / "otherbase")
    return {"root": root, "base": base}


def LlamaOther() -> torch.nn.Module:  # a factory: same module names, hidden 32 instead of 64
    from tests.factories import tiny_llama

    return tiny_llama(num_layers=2)


@pytest.fixture(scope="module")
def base() -> tuple[torch.nn.Module, object]:
    return build_tiny_causal_lm()


def test_trained_adapter_is_healthy_and_model_left_as_it_was(setup: dict, base: tuple) -> None:
    model, tokenizer = base
    report = diagnose_adapter(model, setup["root"] / "trained", tokenizer=tokenizer, max_new_tokens=4)
    assert report.healthy, str(report)
    assert len(report.layers) == 4 and all(r.update > 0 and not r.b_zero for r in report.layers)
    assert [r.a_shape for r in report.layers] == [(4, 64)] * 4
    assert len(report.probes) == 3 and all(p.kl > 0 for p in report.probes)
    assert lora_layers(model) == []  # the doctor's adapter was removed again


def test_untrained_adapter_is_a_problem(setup: dict, base: tuple) -> None:
    report = diagnose_adapter(base[0], setup["root"] / "untrained", tokenizer=base[1], max_new_tokens=2)
    assert not report.healthy and "untrained: every layer's B is all zero" in report.problems[0]
    assert all(p.kl == 0 and p.base == p.adapted for p in report.probes)  # exactly the base model


def test_nan_adapter_names_the_tensor(setup: dict, base: tuple) -> None:
    report = diagnose_adapter(base[0], setup["root"] / "nan")
    assert not report.healthy
    assert "inf or NaN" in report.problems[0] and "layers.1.self_attn.v_proj.lora_B" in report.problems[0]


def test_wrong_base_is_detected_from_shapes(setup: dict, base: tuple) -> None:
    report = diagnose_adapter(base[0], setup["root"] / "otherbase")
    assert not report.healthy and "does not fit this model (trained on another base model?)" in report.problems[0]
    assert "shape mismatch" in report.problems[0] and str(setup["root"] / "otherbase") in report.problems[0]


def test_config_that_contradicts_its_tensors_is_named(setup: dict, base: tuple) -> None:
    report = diagnose_adapter(base[0], setup["root"] / "badconfig")
    assert "config r=8, tensor rank 4" in report.problems[0]


def test_tied_lm_head_is_warned(tmp_path: Path) -> None:
    from tests.factories import tiny_llama

    model = tiny_llama(num_layers=1, tie=True)
    apply_lora(model, LoRAConfig(r=4, targets=["q_proj", "lm_head"]))
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["default"])
    save_adapter(model, tmp_path / "a")
    report = diagnose_adapter(tiny_llama(num_layers=1, tie=True), tmp_path / "a")
    assert report.healthy
    assert any("lm_head's weight is tied to model.embed_tokens" in w for w in report.warnings)
    assert any("vLLM 0.11: LoRA on lm_head" in w for w in report.warnings)


def test_vllm_rules() -> None:
    assert vllm_findings(LoRAConfig(r=8), {"a": 8}, {"a": "Linear"}) == []
    found = vllm_findings(LoRAConfig(r=64, modules_to_save=["score"], bias="all", rank_pattern={"q_proj": 8}),
                          {"a": 64}, {"a": "Linear", "e": "Embedding"})
    assert any("--max-lora-rank 64" in f for f in found) and any("modules_to_save" in f for f in found)
    assert any("--enable-lora-bias" in f for f in found) and any("rank_pattern" in f for f in found)
    assert any("non-linear layers ['e']" in f for f in found)
    assert any("exceeds" in f for f in vllm_findings(LoRAConfig(r=1024), {"a": 1024}, {"a": "Linear"}))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "lightning_lora.cli", "doctor", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def test_cli_exit_codes_in_real_processes(setup: dict) -> None:
    root, model = setup["root"], str(setup["base"])
    healthy = _cli("--model", model, "--adapter", str(root / "trained"), "--max_new_tokens", "2")
    assert healthy.returncode == 0, healthy.stderr[-2000:]
    assert "healthy" in healthy.stdout and "model.layers.0.self_attn.q_proj" in healthy.stdout
    usage = _cli("--model", model, "--adapter", str(root / "missing"))
    assert usage.returncode == 2 and "--adapter" in usage.stderr and "no such directory" in usage.stderr


def test_cli_problem_and_usage_exit_codes_in_process(setup: dict, capsys: pytest.CaptureFixture[str]) -> None:
    root, model = setup["root"], str(setup["base"])
    with pytest.raises(SystemExit) as untrained:
        main(["doctor", "--model", model, "--adapter", str(root / "untrained"), "--max_new_tokens", "1", "--json", "true"])
    assert untrained.value.code == 1 and json.loads(capsys.readouterr().out)["healthy"] is False
    with pytest.raises(SystemExit) as nan:
        main(["doctor", "--model", model, "--adapter", str(root / "nan"), "--prompts", "[]"])
    assert nan.value.code == 1
    with pytest.raises(SystemExit) as usage:
        main(["doctor", "--adapter"])
    assert usage.value.code == 2
