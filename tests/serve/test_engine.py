"""The continuous-batching engine in-process: rows join and leave between steps, each with its own adapter."""

from __future__ import annotations

import pytest
import torch

from lightning_lora import list_adapters, use_adapters
from lightning_lora.serve.engine import Engine
from lightning_lora.serve.protocol import GenerationRequest, SamplingParams
from tests.serve.helpers import offline, tiny_model_with_adapters

PROMPTS = ["Hello world", "The capital of France is", "abc", "A much longer prompt that pads the other rows out"]


@pytest.fixture(scope="module")
def setup():
    return tiny_model_with_adapters()


def _run(engine: Engine, first: list | None = None) -> dict[str, dict]:
    results: dict[str, dict] = {}
    pending = list(first or [])
    while engine.busy or pending:
        outs, pending = pending + (engine.step() if engine.busy else []), []
        for out in outs:
            row = results.setdefault(out.uid, {"text": ""})
            row["text"] += out.text
            if out.finish_reason:
                row.update(finish_reason=out.finish_reason, tokens=out.completion_tokens)
    return results


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_greedy_rows_equal_generate_alone_while_joining_and_leaving(setup):
    model, tok = setup
    engine = Engine(model, tok, max_batch_size=3)  # 7 requests, 3 at a time: rows join as others leave
    adapters = ["a", "b", None, "c", "a", "b", None]
    requests = {}
    for i, adapter in enumerate(adapters):
        ids = tok(PROMPTS[i % len(PROMPTS)])["input_ids"]
        requests[f"r{i}"] = (adapter, ids, 5 + 9 * i)
        engine.submit(f"r{i}", GenerationRequest(tuple(ids), adapter, _greedy(5 + 9 * i)))
    results = _run(engine)
    for uid, (adapter, ids, n) in requests.items():
        assert results[uid] == offline(model, tok, adapter, ids, n), (uid, adapter)
    assert engine.kv.rows == 0 and not engine.running


def test_request_submitted_mid_run_joins_between_steps(setup):
    model, tok = setup
    engine = Engine(model, tok, max_batch_size=4)
    long_ids, short_ids = tok(PROMPTS[3])["input_ids"], tok(PROMPTS[0])["input_ids"]
    engine.submit("long", GenerationRequest(tuple(long_ids), "a", _greedy(40)))
    results: dict[str, dict] = {}
    for _ in range(5):
        for out in engine.step():
            results.setdefault(out.uid, {"text": ""})["text"] += out.text
    engine.submit("short", GenerationRequest(tuple(short_ids), "b", _greedy(6)))
    steps_for_short = 0
    while engine.busy:
        steps_for_short += "short" in {r.uid for r in engine.running} or bool(engine.waiting)
        for out in engine.step():
            row = results.setdefault(out.uid, {"text": ""})
            row["text"] += out.text
            if out.finish_reason:
                row.update(finish_reason=out.finish_reason, tokens=out.completion_tokens)
    assert results["long"] == offline(model, tok, "a", long_ids, 40)
    assert results["short"] == offline(model, tok, "b", short_ids, 6)
    assert steps_for_short <= 6  # it finished in about its own decode time, not the long row's


def test_stop_string_cuts_the_answer(setup):
    model, tok = setup
    ids = tok(PROMPTS[1])["input_ids"]
    reference = offline(model, tok, "a", ids, 30)["text"]
    stop = reference[5:7]
    engine = Engine(model, tok)
    engine.submit("s", GenerationRequest(tuple(ids), "a", _greedy(30, stop=(stop,))))
    result = _run(engine)["s"]
    assert result["finish_reason"] == "stop"
    assert result["text"] == reference[: reference.find(stop)]


def test_seeded_sampling_repeats_and_differs_from_greedy(setup):
    model, tok = setup
    ids = tuple(tok(PROMPTS[0])["input_ids"])
    engine = Engine(model, tok)
    params = SamplingParams(max_tokens=20, temperature=1.5, top_p=0.9, seed=7)
    engine.submit("x", GenerationRequest(ids, "b", params))
    engine.submit("y", GenerationRequest(ids, "b", params))
    engine.submit("g", GenerationRequest(ids, "b", _greedy(20)))
    results = _run(engine)
    assert results["x"]["text"] == results["y"]["text"]
    assert results["x"]["text"] != results["g"]["text"]


def test_cancel_frees_the_row_and_others_go_on(setup):
    model, tok = setup
    engine = Engine(model, tok)
    ids = tok(PROMPTS[2])["input_ids"]
    engine.submit("gone", GenerationRequest(tuple(ids), "a", _greedy(100)))
    engine.submit("kept", GenerationRequest(tuple(ids), "c", _greedy(12)))
    first = engine.step()
    assert engine.cancel("gone").finish_reason == "cancelled"
    results = _run(engine, first)
    assert "gone" not in results or results["gone"].get("finish_reason") is None
    assert results["kept"] == offline(model, tok, "c", ids, 12)


def test_unload_waits_for_the_rows_using_the_adapter(setup):
    model, tok = tiny_model_with_adapters(("a", "b", "d"))
    engine = Engine(model, tok)
    ids = tok(PROMPTS[0])["input_ids"]
    reference = offline(model, tok, "d", ids, 15)
    engine.submit("r", GenerationRequest(tuple(ids), "d", _greedy(15)))
    first = engine.step()
    engine.unload_later("d")
    assert "d" in list_adapters(model)  # still in use
    assert _run(engine, first)["r"] == reference
    assert "d" not in list_adapters(model)


def test_base_model_without_any_adapter():
    from tests.tiny_lm import build_tiny_causal_lm

    model, tok = build_tiny_causal_lm()
    ids = tok(PROMPTS[1])["input_ids"]
    engine = Engine(model, tok)
    engine.submit("r", GenerationRequest(tuple(ids), None, _greedy(9)))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=9, do_sample=False)
    assert _run(engine)["r"]["text"] == tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_qlora_base_serves_from_4_bit():
    pytest.importorskip("bitsandbytes")
    from lightning_lora import QuantConfig, quantize_model
    from tests.serve.helpers import add_adapters
    from tests.tiny_lm import build_tiny_causal_lm

    model, tok = build_tiny_causal_lm()
    quantize_model(model, QuantConfig(compute_dtype="float32"))
    add_adapters(model, ("a", "b"))
    engine = Engine(model, tok)
    requests = {"r0": ("a", PROMPTS[0], 12), "r1": ("b", PROMPTS[1], 9), "r2": (None, PROMPTS[2], 7)}
    for uid, (adapter, prompt, n) in requests.items():
        engine.submit(uid, GenerationRequest(tuple(tok(prompt)["input_ids"]), adapter, _greedy(n)))
    results = _run(engine)
    for uid, (adapter, prompt, n) in requests.items():
        assert results[uid] == offline(model, tok, adapter, tok(prompt)["input_ids"], n), uid


def test_gpt2_conv1d_rows_equal_generate_alone():
    from lightning_lora import LoRAConfig, apply_lora
    from tests.tiny_lm import build_tiny_causal_lm

    model, tok = build_tiny_causal_lm("gpt2")
    for i, name in enumerate(["a", "b"]):
        apply_lora(model, LoRAConfig(r=4, targets=["c_attn", "c_fc"]), name=name)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f"lora_B.{name}" in pname:
                    param.normal_(0.0, 0.5, generator=generator)
    model.eval()
    engine = Engine(model, tok)
    requests = {"r0": ("a", PROMPTS[0], 12), "r1": ("b", PROMPTS[1], 20), "r2": (None, PROMPTS[2], 9)}
    for uid, (adapter, prompt, n) in requests.items():
        engine.submit(uid, GenerationRequest(tuple(tok(prompt)["input_ids"]), adapter, _greedy(n)))
    results = _run(engine)
    for uid, (adapter, prompt, n) in requests.items():
        assert results[uid] == offline(model, tok, adapter, tok(prompt)["input_ids"], n), uid


def test_end_of_sequence_token_ends_the_row_without_text(setup):
    model, tok = setup
    ids = tok(PROMPTS[1])["input_ids"]
    with torch.no_grad(), use_adapters(model, "b"):
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    engine = Engine(model, tok)
    engine.eos_ids = {greedy[3]}  # pretend the 4th token is the end of the sequence
    engine.submit("r", GenerationRequest(tuple(ids), "b", _greedy(20)))
    engine.submit("ignore", GenerationRequest(tuple(ids), "b", _greedy(6, ignore_eos=True)))
    results = _run(engine)
    first = greedy.index(greedy[3])
    assert results["r"]["finish_reason"] == "stop" and results["r"]["tokens"] == first + 1
    assert results["r"]["text"] == tok.decode(greedy[:first], skip_special_tokens=True)
    assert results["ignore"]["finish_reason"] == "length" and results["ignore"]["tokens"] == 6
