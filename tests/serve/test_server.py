"""`lightning-lora serve` as a real process, talked to with the official `openai` client (one server per module)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("litserve")

from safetensors.torch import load_file, save_file

from lightning_lora.modules.loading import load_causal_lm
from tests.serve.helpers import add_adapters, chat_ids, offline, save_all
from tests.tiny_lm import save_tiny_causal_lm

KEY = "test-key"
PROMPTS = ["Hello world", "The capital of France is", "abc", "Once upon a time", "x = 1 + 2", "Lightning"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bad_adapters(root: Path, good: Path) -> dict[str, Path]:
    """Adapter directories that must be refused, each for another reason."""
    bad = {name: root / name for name in ("missing", "wrong_base", "nan", "pickle", "not_lora")}
    bad["missing"].mkdir()
    (bad["missing"] / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    other = add_adapters(_wider(), ("w",))
    from lightning_lora import save_adapter

    save_adapter(other, bad["wrong_base"], name="w")
    bad["nan"].mkdir()
    (bad["nan"] / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = load_file(str(good / "adapter_model.safetensors"))
    first = min(tensors)
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(bad["nan"] / "adapter_model.safetensors"))
    bad["pickle"].mkdir()
    (bad["pickle"] / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    torch.save(load_file(str(good / "adapter_model.safetensors")), bad["pickle"] / "adapter_model.bin")
    bad["not_lora"].mkdir()
    config = json.loads((good / "adapter_config.json").read_text())
    (bad["not_lora"] / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    (bad["not_lora"] / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    return bad


def _wider():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Start the server once: a tiny Llama, adapters a and b at start, c and bad ones to load later."""
    root = tmp_path_factory.mktemp("serve")
    save_tiny_causal_lm(root / "model")
    model, tok = load_causal_lm(str(root / "model"))
    add_adapters(model)
    paths = save_all(model, root / "adapters")
    bad = _bad_adapters(root / "adapters", paths["a"])
    port = _free_port()
    log = (root / "server.log").open("w")
    cmd = [sys.executable, "-m", "lightning_lora.cli", "serve", "--model", str(root / "model"),
           "--adapters", f"a={paths['a']}", f"b={paths['b']}", "--port", str(port), "--api_key", KEY,
           "--adapter_root", str(root / "adapters"), "--max_batch_size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, root / "server.log")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        yield {"url": url, "client": client, "model": model, "tok": tok, "paths": paths, "bad": bad, "root": root,
               "base": str(root / "model"), "log": root / "server.log"}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert not (root / "client.py").exists()  # LitServe's client.py is not written


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if _request(url, "GET", "/health", key=None).status_code == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not become healthy:\n{log.read_text()[-3000:]}")


def _ask(s, adapter: str | None, prompt: str, n: int) -> dict:
    got = s["client"].completions.create(model=adapter or s["base"], prompt=prompt, max_tokens=n, temperature=0)
    choice = got.choices[0]
    return {"text": choice.text, "tokens": got.usage.completion_tokens, "finish_reason": choice.finish_reason}


def _want(s, adapter: str | None, prompt: str, n: int) -> dict:
    """The offline answer. Not from several threads at once: use_adapters switches the shared model's adapters."""
    return offline(s["model"], s["tok"], adapter, s["tok"](prompt)["input_ids"], n)


def _complete(s, adapter: str | None, prompt: str, n: int) -> tuple[dict, dict]:
    return _ask(s, adapter, prompt, n), _want(s, adapter, prompt, n)


class _Response:
    def __init__(self, status_code: int, text: str) -> None:
        self.status_code, self.text = status_code, text

    def json(self) -> dict:
        return json.loads(self.text)


def _request(url: str, method: str, path: str, body: object = None, key: str | None = KEY) -> _Response:
    """A plain HTTP request (stdlib), for what the openai client does not send: raw bodies, missing keys."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return _Response(response.status, response.read().decode())
    finally:
        conn.close()


def _post(s, path: str, body: object, key: str | None = KEY) -> _Response:
    return _request(s["url"], "POST", path, body, key)


# ------------------------------------------------------------------------------------------------ happy paths
def test_models_lists_base_and_adapters(served):
    ids = [m.id for m in served["client"].models.list().data]
    assert ids[0] == served["base"] and {"a", "b"} <= set(ids)


def test_completion_per_adapter_equals_offline_greedy(served):
    for adapter in ("a", "b", None):
        got, want = _complete(served, adapter, PROMPTS[1], 24)
        assert got == want, adapter
    assert _complete(served, "a", PROMPTS[1], 24)[0] != _complete(served, "b", PROMPTS[1], 24)[0]


def test_chat_completion_uses_the_chat_template(served):
    messages = [{"role": "user", "content": "What is LoRA?"}]
    got = served["client"].chat.completions.create(model="b", messages=messages, max_tokens=20, temperature=0)
    want = offline(served["model"], served["tok"], "b", chat_ids(served["tok"], messages), 20)
    assert got.choices[0].message.content == want["text"]
    assert got.usage.prompt_tokens == len(chat_ids(served["tok"], messages))


def test_streaming_completion_and_chat(served):
    client, tok = served["client"], served["tok"]
    stream = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    want = offline(served["model"], tok, "a", tok(PROMPTS[0])["input_ids"], 30)
    assert text == want["text"] and chunks[-1].usage.completion_tokens == want["tokens"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want["finish_reason"]
    messages = [{"role": "user", "content": "hi"}]
    parts = client.chat.completions.create(model="b", messages=messages, max_tokens=12, temperature=0, stream=True)
    text = "".join(p.choices[0].delta.content or "" for p in parts)
    assert text == offline(served["model"], tok, "b", chat_ids(tok, messages), 12)["text"]


def test_concurrent_clients_on_different_adapters(served):
    jobs = [(adapter, PROMPTS[i % len(PROMPTS)], 10 + 6 * i) for i, adapter in enumerate(["a", "b", None, "a", "b", None])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: _ask(served, *job), jobs))
    for job, got in zip(jobs, results):
        assert got == _want(served, *job), job


def test_load_and_unload_while_others_run(served):
    client, paths = served["client"], served["paths"]
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(_ask, served, "a", PROMPTS[3], 150)
        time.sleep(0.3)
        assert _post(served, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(paths["c"])}).status_code == 200
        got, want = _complete(served, "c", PROMPTS[4], 20)
        assert got == want
        assert "c" in [m.id for m in client.models.list().data]
        assert _post(served, "/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
        assert "c" not in [m.id for m in client.models.list().data]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="c", prompt="x", max_tokens=2)
        assert running.result() == _want(served, "a", PROMPTS[3], 150)


def test_unloading_an_adapter_in_use_lets_its_requests_finish(served):
    path = str(served["paths"]["c"])
    assert _post(served, "/v1/load_lora_adapter", {"lora_name": "c2", "lora_path": path}).status_code == 200
    body = {"model": "c2", "prompt": PROMPTS[3], "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    reference = _post(served, "/v1/completions", body).json()["choices"][0]["text"]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_post, served, "/v1/completions", body)
        time.sleep(0.3)
        assert _post(served, "/v1/unload_lora_adapter", {"lora_name": "c2"}).status_code == 200
        response = running.result()
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == reference  # c2 stayed until its last request was done
    assert response.json()["usage"]["completion_tokens"] == 200
    assert _post(served, "/v1/completions", {"model": "c2", "prompt": "x"}).status_code == 404


def test_seed_stop_and_sampling_over_http(served):
    client = served["client"]
    kwargs = {"model": "a", "prompt": PROMPTS[2], "max_tokens": 20, "temperature": 0.9, "top_p": 0.95}
    first = client.completions.create(seed=11, **kwargs).choices[0].text
    assert client.completions.create(seed=11, **kwargs).choices[0].text == first
    assert len({client.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2, 3)} | {first}) > 1
    reference = _want(served, "a", PROMPTS[0], 30)["text"]
    stop = reference[4:6]
    got = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop])
    assert got.choices[0].text == reference[: reference.find(stop)] and got.choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_adapter_is_404_naming_the_adapters(served):
    with pytest.raises(openai.NotFoundError) as err:
        served["client"].completions.create(model="nope", prompt="x", max_tokens=2)
    body = err.value.body
    assert "'nope'" in body["message"] and "'a'" in body["message"] and "'b'" in body["message"]
    assert body["param"] == "model"


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"max_tokens": "5"}, "max_tokens", "must be an int"),
    ({"max_tokens": 0}, "max_tokens", "at least 1"),
    ({"temperature": -1}, "temperature", "out of range"),
    ({"n": 2}, "n", "not supported"),
    ({"logprobs": 2}, "logprobs", "not supported"),
    ({"max_tokens": 500, "prompt": "y" * 100}, "max_tokens", "maximum context length is 512 tokens"),
    ({"prompt": 5}, "prompt", "non-empty string"),
    ({"frobnicate": 1}, "frobnicate", "unsupported field"),
])
def test_bad_fields_are_400_naming_the_field(served, body, param, words):
    response = _post(served, "/v1/completions", {"model": "a", "prompt": "hi", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_context_overflow_gives_the_numbers(served):
    response = _post(served, "/v1/completions", {"model": "a", "prompt": "y" * 100, "max_tokens": 500})
    assert "600 tokens (100 in the prompt, 500 in the completion)" in response.json()["error"]["message"]


def test_malformed_json_and_bad_messages_are_400(served):
    assert _post(served, "/v1/completions", b"{not json").status_code == 400
    response = _post(served, "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": 3}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_bad_requests_do_not_affect_a_running_one(served):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_ask, served, "b", PROMPTS[5], 120)
        for body in ({"max_tokens": -1}, {"temperature": -2}, {"model": "zzz"}, {"n": 3}):
            assert _post(served, "/v1/completions", {"model": "a", "prompt": "hi", **body}).status_code in (400, 404)
        assert running.result() == _want(served, "b", PROMPTS[5], 120)


@pytest.mark.parametrize("case", ["missing", "wrong_base", "nan", "pickle", "not_lora", "outside_root", "nowhere"])
def test_bad_adapter_directories_are_refused_and_serving_goes_on(served, case, tmp_path):
    path = {"outside_root": str(served["paths"]["a"].parent.parent / "model"), "nowhere": str(tmp_path / "no")}.get(
        case, str(served["bad"].get(case, "")))
    response = _post(served, "/v1/load_lora_adapter", {"lora_name": f"bad_{case}", "lora_path": path})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
    got, want = _complete(served, "a", PROMPTS[2], 6)
    assert got == want
    assert f"bad_{case}" not in [m.id for m in served["client"].models.list().data]


def test_loading_an_existing_name_and_unloading_an_unknown_one(served):
    path = str(served["paths"]["a"])
    assert _post(served, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": path}).status_code == 400
    assert _post(served, "/v1/unload_lora_adapter", {"lora_name": "zzz"}).status_code == 404


# ------------------------------------------------------------------------------------------------ safety
def test_api_key_is_required_except_for_health(served):
    assert _post(served, "/v1/completions", {"model": "a", "prompt": "x"}, key=None).status_code == 401
    response = _post(served, "/v1/completions", {"model": "a", "prompt": "x"}, key="wrong")
    assert response.status_code == 401 and "Authorization: Bearer" in response.json()["error"]["message"]
    assert _request(served["url"], "GET", "/v1/models", key=None).status_code == 401
    assert _request(served["url"], "GET", "/health", key=None).status_code == 200
    assert _request(served["url"], "GET", "/openapi.json", key=None).status_code == 404  # no schema without a key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served['url']}/v1", api_key="wrong", max_retries=0).models.list()


def test_binds_localhost_only(served):
    port = int(served["url"].rsplit(":", 1)[1])
    addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for address in addresses:
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex((address, port)) != 0, address


def _cancelled(served) -> int:
    return served["log"].read_text().count("cancelled (client went away)")


def _wait_cancelled(served, count: int) -> int:
    deadline = time.monotonic() + 20
    while _cancelled(served) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return _cancelled(served)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_the_row(served, stream):
    before = _cancelled(served)
    host, port = served["url"].removeprefix("http://").split(":")
    body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "stream": stream,
            "ignore_eos": True}
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    if stream:
        assert conn.getresponse().readline().startswith(b"data: ")
    else:
        time.sleep(0.2)
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away before the answer is complete
    conn.close()
    assert _wait_cancelled(served, before + 1) == before + 1
    got, want = _complete(served, "b", PROMPTS[1], 8)
    assert got == want
