"""Build and run the server: LitServe's server and queue, our spec (HTTP) and loop (worker), one model, many adapters.

Example:
    >>> config = ServeConfig(model="smollm2-135m-instruct", adapters={"dates": "out/demo/adapter"})  # doctest: +SKIP
    >>> run_server(config, port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
from dataclasses import dataclass, field
from typing import Any

import litserve as ls
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightning_lora.serve.adapters import check_adapter_dir
from lightning_lora.serve.errors import ServeError, error_body
from lightning_lora.serve.loop import ContinuousBatchingLoop
from lightning_lora.serve.protocol import check_adapter_name
from lightning_lora.serve.spec import ServeSpec

log = logging.getLogger(__name__)

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe 0.2.19's run() accepts
_OPEN_PATHS = ("/health",)


@dataclass(frozen=True)
class ServeConfig:
    """What to serve and how.

    Args:
        model: Base model: alias (``smollm2-135m-instruct``), ``save_pretrained`` directory, or hub name.
        adapters: Adapters to load at start, name -> PEFT adapter directory.
        served_model_name: The ``model`` value that selects the bare base. Default: ``model``.
        dtype: Weight dtype of the base (``auto`` is float32 on CPU). Default: ``"auto"``.
        quantize: Quantize the base to 4 bits first (serve QLoRA adapters from the base they trained on).
        max_batch_size: Most requests decoded together; 1 turns batching off. Default: 16.
        batch_timeout: Seconds an idle server waits for more requests before starting a batch. Default: 0.01.
        api_key: If set, every endpoint but ``/health`` needs ``Authorization: Bearer <api_key>``.
        adapter_root: If set, adapters are only read from directories inside it.
    """

    model: str = "smollm2-135m-instruct"
    adapters: dict[str, str] = field(default_factory=dict)
    served_model_name: str | None = None
    dtype: str = "auto"
    quantize: Any = None  # QuantConfig | None (imported lazily: it pulls in the surgery package)
    max_batch_size: int = 16
    batch_timeout: float = 0.01
    api_key: str | None = None
    adapter_root: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            problems.append(f"max_batch_size={self.max_batch_size!r} must be a positive integer (1 turns batching off)")
        if not isinstance(self.batch_timeout, (int, float)) or not 0 <= self.batch_timeout <= 10:
            problems.append(f"batch_timeout={self.batch_timeout!r} must be between 0 and 10 seconds")
        if self.api_key is not None and not self.api_key:
            problems.append("api_key is empty; give a key or leave it out")
        if problems:
            raise ValueError("invalid serve settings:\n  " + "\n  ".join(problems))

    @property
    def name(self) -> str:
        """The name the base model is served under."""
        return self.served_model_name or self.model


class LoRAServeAPI(ls.LitAPI):
    """The LitAPI: loads the model and adapters in the inference worker and runs control operations there."""

    def __init__(self, config: ServeConfig, spec: ServeSpec, log_level: str = "info") -> None:
        super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout,
                         api_path="/v1/completions", stream=True, loop=ContinuousBatchingLoop(), spec=spec)
        self.config = config
        self.log_level = log_level
        self.engine = None

    def setup(self, device: str) -> None:
        """Load the base once (quantized if asked) and every start-up adapter beside it."""
        from lightning_lora import load_adapter
        from lightning_lora.modules.loading import load_causal_lm
        from lightning_lora.serve.engine import Engine

        configure_logging(self.log_level)  # this is a fresh (spawned) process
        model, tokenizer = load_causal_lm(self.config.model, self.config.dtype)
        model = model.to(device).eval()
        if self.config.quantize is not None:
            from lightning_lora import quantize_model

            quantize_model(model, self.config.quantize)
        for name, path in self.config.adapters.items():
            load_adapter(model, path, name=name)
        self.engine = Engine(model.eval(), tokenizer, max_batch_size=self.config.max_batch_size)
        log.info("serving %s with adapters %s", self.config.name, sorted(self.config.adapters) or "none")

    def control(self, op: str, payload: dict) -> dict:
        """Load or unload an adapter (runs in the worker, between decode steps)."""
        from lightning_lora import load_adapter

        if op == "unload":
            self.engine.unload_later(payload["name"])
            return {"ok": True}
        try:
            load_adapter(self.engine.model, payload["path"], name=payload["name"])
        except Exception as err:  # whatever the file does, the worker (and every other row) lives on
            known = isinstance(err, (ValueError, RuntimeError, OSError, KeyError))  # AdapterLoadError, SurgeryError...
            if not known:
                log.exception("loading adapter %r failed", payload["name"])
            return {"ok": False, "error": f"cannot load adapter {payload['name']!r} from {payload['path']!r}: {err}",
                    "status": 400 if known else 500}
        self.engine.model.eval()
        self.engine.adapters_changed()
        return {"ok": True}

    def authorize(self, request: Request) -> None:
        """Require ``Authorization: Bearer <api_key>`` when an API key is set (``/health`` stays open)."""
        key = self.config.api_key
        if key is None or request.url.path in _OPEN_PATHS:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise StarletteHTTPException(401, "Missing or wrong API key; send the header 'Authorization: Bearer <key>' "
                                              "with the key the server was started with (--api_key).")

    def predict(self, x: Any) -> Any:  # the loop drives the engine; LitServe's predict is not used
        raise NotImplementedError


def configure_logging(level: str) -> None:
    """Send this package's log records (adapter loads, cancelled rows) to stderr at ``level``."""
    package = logging.getLogger("lightning_lora")
    package.setLevel(level.upper())
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        package.addHandler(handler)
        package.propagate = False  # LitServe configures the root logger too: do not print twice


def build_server(config: ServeConfig, log_level: str = "info") -> ls.LitServer:
    """Check the model and adapters, then build the LitServer (nothing is loaded into memory yet).

    Raises:
        ServeError: If a start-up adapter directory is refused (outside ``adapter_root``, not LoRA, not safetensors...).
        FileNotFoundError: If the model cannot be found.
    """
    from transformers import AutoConfig

    from lightning_lora.modules.loading import load_tokenizer, resolve_model_path

    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(config.model)
    max_context = int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 2048))
    adapters: dict[str, str] = {}
    for name, adapter_path in config.adapters.items():
        check_adapter_name(name, config.name, adapters)
        adapters[name] = str(check_adapter_dir(adapter_path, config.adapter_root))
    config = ServeConfig(**{**config.__dict__, "adapters": adapters})
    spec = ServeSpec(tokenizer, config.name, path, max_context, adapters, config.adapter_root)
    # With an API key, FastAPI's /docs and /openapi.json (which LitServe leaves without auth) are switched off.
    server = ls.LitServer(LoRAServeAPI(config, spec, log_level), accelerator="auto", devices=1, timeout=False,
                          disable_openapi_url=config.api_key is not None)
    server.app.add_exception_handler(StarletteHTTPException, _http_error)
    server.uvicorn_graceful_timeout = 5  # open streams get 5 s to finish at shutdown, not LitServe's 30
    return server


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Build the server and serve until Ctrl+C or SIGTERM.

    Raises:
        ValueError: If ``host`` is not one LitServe can bind, or ``port`` is out of range.
    """
    if host not in HOSTS:
        raise ValueError(f"host={host!r}: LitServe binds one of {', '.join(HOSTS)}; use 127.0.0.1 (this machine only, "
                         f"the default) or 0.0.0.0 (every interface, put it behind a proxy with --api_key)")
    if not 1024 <= port <= 65535:
        raise ValueError(f"port={port!r} must be between 1024 and 65535")
    configure_logging(log_level)
    server = build_server(config, log_level)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _interrupt)  # a graceful shutdown (LitServe handles KeyboardInterrupt)
    server.run(host=host, port=port, num_api_servers=1, generate_client_file=False, log_level=log_level)


_MAIN_PID = -1


def _interrupt(signum: int, frame: Any) -> None:
    if os.getpid() != _MAIN_PID:  # a forked HTTP process (uvicorn re-raises the signal after its own shutdown)
        raise SystemExit(0)
    raise KeyboardInterrupt


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(exc.detail), exc.status_code), exc.status_code, headers=exc.headers)


__all__ = ["HOSTS", "LoRAServeAPI", "ServeConfig", "ServeError", "build_server", "run_server"]
