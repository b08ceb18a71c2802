"""The LoRA configuration: a dataclass validated on construction."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from lightning_lora.surgery.errors import ConfigError, LoRAConfigError

Bias = Literal["none", "all", "lora_only"]
Init = Literal["kaiming", "gaussian"]


class ConfigDict:
    """Plain-dict round trip shared by the config dataclasses (checkpoints, logs, PEFT files)."""

    error_type: ClassVar[type[ConfigError]] = ConfigError

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (safe in a ``weights_only`` checkpoint and in hyperparameter logs)."""
        return asdict(self)

    def replace(self, **changes: Any) -> Any:
        """A validated copy with some fields changed (configs are frozen)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`; unknown keys are refused by name."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise cls.error_type(f"Unknown {cls.__name__} field(s) {unknown}; valid fields are {sorted(known)}.")
        return cls(**data)


@dataclass(frozen=True, eq=True)
class LoRAConfig(ConfigDict):
    """What to adapt and how: ``y = W x + (alpha / r) * B A dropout(x)``, with A random and B zero at the start.

    Args:
        r: Rank of the update ``B A``. Default: 16.
        alpha: Scaling numerator; the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with
            ``use_rslora``). Default: 32.
        dropout: Dropout probability on the adapter's input, in [0, 1). Default: 0.0.
        targets: Which modules get adapters. A list of module names, each matching a module path that equals it
            or ends with it (``q_proj`` matches ``model.layers.3.self_attn.q_proj``); ``"re:<regex>"`` for a
            full-match regex on the module path; or a preset: ``"all-linear"`` (every Linear / Conv1D except the
            output head), ``"attention"``, ``"mlp"``. A single string is one pattern. Default: ``["q_proj", "v_proj"]``.
        exclude: Patterns in the same syntax whose matches are removed from ``targets``. Default: none.
        layers: Which transformer blocks get adapters: a list of block indices (negative counts from the end) or a
            slice string with Python semantics (``"-8:"`` = the last eight blocks, ``"0:4"``). Block indices come
            from the module path (``layers.N.``, ``h.N.``, ``layer.N.``, ``blocks.N.``); modules outside any block
            are left out when this is set. Default: all blocks.
        use_rslora: Scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA, Kalajdzievski 2023). Default: False.
        bias: Which biases train: ``"none"``, ``"all"`` (every bias in the model) or ``"lora_only"`` (biases of
            adapted layers). Default: ``"none"``.
        modules_to_save: Module names (same matching as ``targets``) trained fully and saved with the adapter,
            e.g. a classifier head or ``lm_head``. Default: none.
        init: Initialisation of A: ``"kaiming"`` (uniform, PEFT's default) or ``"gaussian"`` (normal, std 1/r).
            B always starts at zero, so a fresh adapter changes nothing. Default: ``"kaiming"``.
        rank_pattern: Per-module rank overrides: ``{pattern: r}``; a pattern is a regex matched against the end of
            the module path (PEFT's semantics). Default: none.
        alpha_pattern: Per-module alpha overrides, same matching as ``rank_pattern``. Default: none.
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude: list[str] | str | None = None
    layers: str | list[int] | None = None
    use_rslora: bool = False
    bias: Bias = "none"
    modules_to_save: list[str] | None = None
    init: Init = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    error_type: ClassVar[type[ConfigError]] = LoRAConfigError

    def __post_init__(self) -> None:
        # Frozen: a config is a value, so a change after apply_lora cannot bypass this validation (issue 8).
        normalise = object.__setattr__
        normalise(self, "targets", _as_pattern_list(self.targets))
        normalise(self, "exclude", _as_pattern_list(self.exclude) if self.exclude is not None else [])
        normalise(self, "modules_to_save", list(self.modules_to_save or []))
        normalise(self, "rank_pattern", dict(self.rank_pattern or {}))
        normalise(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        if isinstance(self.layers, tuple):
            normalise(self, "layers", list(self.layers))
        if isinstance(self.layers, str):
            # Shells and YAML need quotes around slices such as '-8:'; accept them quoted.
            normalise(self, "layers", self.layers.strip().strip("'\"").strip())
        problems = _problems(self)
        if problems:
            raise LoRAConfigError("Invalid LoRAConfig:\n  - " + "\n  - ".join(problems))

    def __hash__(self) -> int:
        return hash(repr(self))

    def rank_for(self, module_name: str) -> int:
        """The rank for a module path, after ``rank_pattern`` overrides."""
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """The alpha for a module path, after ``alpha_pattern`` overrides."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def scale_for(self, module_name: str) -> float:
        """The multiplier of ``B A x`` for a module path: ``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA."""
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _as_pattern_list(value: list[str] | str | tuple[str, ...]) -> list[str]:
    if isinstance(value, str):
        return [value]
    return list(value)


def pattern_key_matches(key: str, module_name: str) -> bool:
    """Whether a ``rank_pattern`` / ``alpha_pattern`` key selects a module path (PEFT's ``get_pattern_key``
    semantics: the regex must match a suffix of the path at a dot boundary)."""
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    for key in patterns:
        if pattern_key_matches(key, module_name):
            return key
    return None


def _problems(cfg: LoRAConfig) -> list[str]:
    problems = []
    if not isinstance(cfg.r, int) or isinstance(cfg.r, bool) or cfg.r < 1:
        problems.append(f"r={cfg.r!r}: the rank must be a positive integer (e.g. 8, 16, 64).")
    if not _positive_finite(cfg.alpha):
        problems.append(f"alpha={cfg.alpha!r}: must be a positive number, and finite (commonly 2 * r): inf or NaN makes "
                        f"every output NaN.")
    if not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"dropout={cfg.dropout!r}: must be in [0, 1), e.g. 0.05.")
    if not cfg.targets or not all(isinstance(t, str) and t for t in cfg.targets):
        problems.append(f"targets={cfg.targets!r}: give at least one non-empty pattern, e.g. ['q_proj', 'v_proj'].")
    if cfg.bias not in ("none", "all", "lora_only"):
        problems.append(f"bias={cfg.bias!r}: must be one of 'none', 'all', 'lora_only'.")
    if cfg.init not in ("kaiming", "gaussian"):
        problems.append(f"init={cfg.init!r}: must be 'kaiming' or 'gaussian'.")
    problems += _regex_problems(cfg)
    problems += layer_problems(cfg.layers)
    problems += _pattern_value_problems(cfg)
    return problems


def _regex_problems(cfg: LoRAConfig) -> list[str]:
    problems = []
    for pattern in [*cfg.targets, *cfg.exclude, *cfg.modules_to_save]:
        if isinstance(pattern, str) and pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                problems.append(f"{pattern!r}: not a valid regular expression ({err}).")
    for name, patterns in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        for key in patterns:
            try:
                re.compile(key)
            except re.error as err:
                problems.append(f"{name} key {key!r}: not a valid regular expression ({err}).")
    return problems


def _pattern_value_problems(cfg: LoRAConfig) -> list[str]:
    problems = []
    for key, r in cfg.rank_pattern.items():
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            problems.append(f"rank_pattern[{key!r}]={r!r}: ranks must be positive integers.")
    for key, alpha in cfg.alpha_pattern.items():
        if not _positive_finite(alpha):
            problems.append(f"alpha_pattern[{key!r}]={alpha!r}: alphas must be positive numbers, and finite.")
    return problems


def _positive_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")


def layer_problems(layers: list[int] | str | None) -> list[str]:
    """Problems with a block selection (``layers=``: a list of ints or a slice string), if any; shared by configs."""
    if layers is None:
        return []
    if isinstance(layers, str):
        match = _SLICE.match(layers)
        if match is None:
            return [f"layers={layers!r}: use a slice string like '-8:' (last eight blocks) or '0:4', or a list of ints."]
        if match.group(3) is not None and int(match.group(3)) == 0:
            return [f"layers={layers!r}: a slice step cannot be zero."]
        return []
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        return [f"layers={layers!r}: give a non-empty list of block indices like [28, 29] or a slice string like '-8:'."]
    return []


def parse_layer_slice(layers: str) -> slice:
    """Turn a validated slice string such as ``"-8:"`` into a :class:`slice`."""
    match = _SLICE.match(layers)
    if match is None:  # validated in LoRAConfig; guard for direct callers
        raise LoRAConfigError(f"layers={layers!r}: use a slice string like '-8:' or '0:4'.")
    start, stop, step = (int(g) if g is not None else None for g in match.groups())
    return slice(start, stop, step)
