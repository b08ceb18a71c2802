"""Request validation, adapter-directory checks, text tracking and the serve command's arguments, in-process."""

from __future__ import annotations

import json

import pytest

from lightning_lora.serve.adapters import check_adapter_dir
from lightning_lora.serve.errors import ServeError
from lightning_lora.serve.protocol import RequestValidator, check_adapter_name
from lightning_lora.serve.sampling import TextTracker
from tests.tiny_lm import build_tiny_tokenizer


@pytest.fixture(scope="module")
def validator():
    return RequestValidator(build_tiny_tokenizer(), "base-model", {"a": "/x/a"}, max_context=64)


def _error(fn, *args) -> ServeError:
    with pytest.raises(ServeError) as err:
        fn(*args)
    return err.value


def test_a_valid_completion_and_chat(validator):
    parsed = validator.parse({"model": "a", "prompt": "hi", "max_tokens": 5, "temperature": 0, "stop": "x",
                              "seed": 3, "stream": True, "stream_options": {"include_usage": True}}, "completion")
    assert parsed.generation.adapter == "a" and parsed.generation.prompt_ids == tuple(validator.tokenizer("hi")["input_ids"])
    assert parsed.generation.params.stop == ("x",) and parsed.include_usage and parsed.stream
    chat = validator.parse({"model": "base-model", "messages": [{"role": "user", "content": "hi"}]}, "chat")
    assert chat.generation.adapter is None
    assert chat.generation.params.max_tokens == 64 - len(chat.generation.prompt_ids)  # chat default: the rest


def test_defaults_follow_openai(validator):
    params = validator.parse({"model": "a", "prompt": "hi"}, "completion").generation.params
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (16, 1.0, 1.0, None)


@pytest.mark.parametrize(("body", "param", "status"), [
    ({"model": "zz"}, "model", 404),
    ({"model": 3}, "model", 400),
    ({"max_tokens": True}, "max_tokens", 400),
    ({"max_tokens": -2}, "max_tokens", 400),
    ({"max_tokens": 60, "prompt": "a" * 10}, "max_tokens", 400),
    ({"temperature": "hot"}, "temperature", 400),
    ({"temperature": 2.5}, "temperature", 400),
    ({"top_p": 0}, "top_p", 400),
    ({"stop": [""]}, "stop", 400),
    ({"n": 2}, "n", 400),
    ({"best_of": 3}, "best_of", 400),
    ({"echo": True}, "echo", 400),
    ({"presence_penalty": 0.5}, "presence_penalty", 400),
    ({"prompt": ["a", "b"]}, "prompt", 400),
    ({"prompt": [1, 99999]}, "prompt", 400),
    ({"prompt": ""}, "prompt", 400),
    ({"stream_options": {"include_usage": True}}, "stream_options", 400),
    ({"colour": "red"}, "colour", 400),
])
def test_bad_fields_name_the_field(validator, body, param, status):
    err = _error(validator.parse, {"model": "a", "prompt": "hi", **body}, "completion")
    assert (err.param, err.status) == (param, status)
    assert err.body()["error"]["param"] == param and err.body()["error"]["message"]


def test_unknown_model_lists_the_served_ones(validator):
    err = _error(validator.parse, {"model": "zz", "prompt": "hi"}, "completion")
    assert "'base-model', 'a'" in err.message and err.body()["error"]["type"] == "not_found_error"


def test_chat_messages_are_checked(validator):
    assert _error(validator.parse, {"model": "a", "messages": []}, "chat").param == "messages"
    err = _error(validator.parse, {"model": "a", "messages": [{"role": "user", "content": None}]}, "chat")
    assert "messages[0].content" in err.message
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    parsed = validator.parse({"model": "a", "messages": [{"role": "user", "content": parts}]}, "chat")
    plain = validator.parse({"model": "a", "messages": [{"role": "user", "content": "hi"}]}, "chat")
    assert parsed.generation.prompt_ids == plain.generation.prompt_ids


def test_adapter_names_for_loading():
    assert check_adapter_name("new", "base", {"a": "p"}) == "new"
    for name, words in [("a", "already been loaded"), ("base", "reserved"), ("__base__", "reserved"), ("", "non-empty")]:
        assert words in _error(check_adapter_name, name, "base", {"a": "p"}).message


def test_adapter_dir_checks(tmp_path):
    root = tmp_path / "root"
    good = root / "good"
    good.mkdir(parents=True)
    assert "not a directory" in _error(check_adapter_dir, str(root / "nope")).message
    assert "no adapter_config.json" in _error(check_adapter_dir, str(good)).message
    (good / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q"]}))
    (good / "adapter_model.bin").write_bytes(b"pickle")
    assert "pickles are never read" in _error(check_adapter_dir, str(good)).message
    (good / "adapter_model.safetensors").write_bytes(b"junk")
    assert "not a readable safetensors" in _error(check_adapter_dir, str(good)).message
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert "outside the adapter root" in _error(check_adapter_dir, str(root / "link"), str(root)).message
    assert "outside the adapter root" in _error(check_adapter_dir, str(root / ".." / "outside"), str(root)).message


def test_text_tracker_holds_back_a_possible_stop_string():
    tok = build_tiny_tokenizer()
    tracker = TextTracker(tok, ("END",))
    ids = tok("abc EN")["input_ids"]
    assert tracker.update(ids) == ("abc ", False)  # "EN" might start "END"
    assert tracker.update(tok("abc ENx")["input_ids"]) == ("ENx", False)
    assert tracker.update(tok("abc ENxEND more")["input_ids"]) == ("", True)
    assert tracker.text == "abc ENx"


def test_text_tracker_waits_for_a_whole_character():
    tok = build_tiny_tokenizer()
    ids = tok("é")["input_ids"]  # two bytes, two tokens
    tracker = TextTracker(tok, ())
    assert tracker.update(ids[:1]) == ("", False)
    assert tracker.update(ids) == ("é", False)


def test_serve_command_arguments(capsys):
    from lightning_lora.cli.serve import build_parser, parse_adapters, serve_main
    from lightning_lora.serve.server import ServeConfig, run_server

    assert parse_adapters(["a=x/a", "b=y=z"]) == {"a": "x/a", "b": "y=z"}
    for bad, words in [(["a"], "NAME=PATH"), (["a=x", "a=y"], "given twice")]:
        with pytest.raises(ValueError, match=words):
            parse_adapters(bad)
    args = build_parser().parse_args(["--adapters", "a=x", "b=y", "--max_batch_size", "4"])
    assert args.adapters == ["a=x", "b=y"] and args.host == "127.0.0.1" and args.port == 8000
    parser = build_parser()
    quantized = parser.instantiate_classes(parser.parse_args(["--quantize.quant_type", "fp4"])).quantize
    assert quantized.quant_type == "fp4"
    assert ServeConfig(model="m").name == "m" and ServeConfig(model="m", served_model_name="base").name == "base"
    with pytest.raises(ValueError, match="max_batch_size=0"):
        ServeConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="host='10.0.0.1'"):
        run_server(ServeConfig(), host="10.0.0.1")
    with pytest.raises(SystemExit):
        serve_main(["--adapters", "oops"])
    assert "NAME=PATH" in capsys.readouterr().err
