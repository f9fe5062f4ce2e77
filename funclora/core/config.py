"""``LoraConfig``: PEFT's LoRA fields, defaults and validation; JSON in and out.

The field names, defaults and meanings are PEFT 0.21's (see ``PEFT_LORA_SEMANTICS.md``), so a
PEFT ``adapter_config.json`` reads into this class and back. A PEFT field funclora does not
implement is accepted only at its default value: any other value is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from .. import _files as files
from ..errors import AdapterFileError
from .config_fields import check_regex, is_index, is_number, jsonable, name_list, names_or_regex
from .registry import as_rule, rules_in_metadata, with_rules

__all__ = ["LoraConfig"]

_KNOWN_INITS = ("pissa", "olora", "orthogonal", "loftq", "eva", "corda", "lora_ga", "mica")

# PEFT fields that funclora does not implement, with the default each must keep.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}

# PEFT's TaskType values (peft.utils.peft_types.TaskType).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# Fields that describe the file or the training run and change no numerics here.
_INERT = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
          "revision", "inference_mode", "runtime_config")


@dataclass
class LoraConfig:
    """PEFT's ``LoraConfig``, the fields funclora implements plus PEFT's others at their defaults.

    Args:
        r: rank of the update (``lora_A``: ``(r, in_features)``, ``lora_B``: ``(out_features, r)``).
        lora_alpha: scaling numerator; the update is ``(lora_alpha / r)·B@A``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the LoRA branch's input, in training only.
        target_modules: list = module names matched exactly or as a dotted suffix
            (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); str = a regex that must
            match the whole module path; ``"all-linear"`` = every ``nn.Linear`` / ``Conv1D``
            except a transformers model's output head; ``None`` = the default table for a
            transformers ``config.model_type``.
        exclude_modules: same matching as ``target_modules``; matches are never targeted.
        modules_to_save: modules trained in full (a copy of their parameters lives in the adapter).
        bias: ``"none"``, ``"all"`` (every bias in the model is trained) or ``"lora_only"``
            (biases of targeted modules).
        init_lora_weights: ``True`` (kaiming-uniform A, zero B), ``"gaussian"`` or ``False``.
        use_rslora: scale by ``lora_alpha / sqrt(r)``.
        rank_pattern, alpha_pattern: ``{regex: value}``; the first key (in insertion order) that
            matches a dotted suffix of a module path sets that module's ``r`` / ``lora_alpha``.
        layers_to_transform, layers_pattern: only adapt layers with these indices (list targets).
        fan_in_fan_out: PEFT's flag for weights stored ``(in, out)``; funclora derives the layout
            from the layer type (transformers ``Conv1D`` is always ``(in, out)``).
        target_parameters: parameter names (exact or dotted suffix, e.g. ``"lstm.weight_ih_l0"``)
            of any ≥2-D ``nn.Parameter`` to adapt.

    Example:
        >>> import funclora as fl
        >>> config = fl.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])
        >>> config.r, config.lora_alpha
        (8, 8)
    """

    task_type: str | None = None
    peft_type: str | None = "LORA"
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: Any = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    use_dora: bool = False
    velora_config: Any = None
    alora_invocation_tokens: Any = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: Any = None
    runtime_config: Any = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False

    def __post_init__(self):
        self._custom_modules: dict = {}
        self.target_modules = names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = names_or_regex("exclude_modules", self.exclude_modules)
        if isinstance(self.modules_to_save, str):  # one module name, as PEFT reads it (not its letters)
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = name_list("modules_to_save", self.modules_to_save)
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str):
                raise TypeError("LoraConfig: `target_parameters` must be a list of strings or None.")
            self.target_parameters = name_list("target_parameters", self.target_parameters)
        self._validate()

    def _validate(self):
        self._check_values()
        self._check_patterns()
        self._check_combinations()

    def _check_values(self):
        """Each field alone: its type and range (PEFT options funclora lacks must keep their default)."""
        for name, default in _UNSUPPORTED_DEFAULTS.items():
            value = getattr(self, name)
            if value != default and not (default is None and value in ({}, [], False)):
                raise ValueError(
                    f"LoraConfig: `{name}={value!r}` is a PEFT option funclora does not implement "
                    f"(expected the default {default!r}). Remove it, or use PEFT for this adapter."
                )
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoraConfig: `r` must be a positive int, got {self.r!r}.")
        if not is_number(self.lora_alpha) or not math.isfinite(self.lora_alpha):
            raise ValueError(f"LoraConfig: `lora_alpha` must be a finite number, got {self.lora_alpha!r}.")
        for name in ("use_rslora", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoraConfig: `{name}` must be True or False, got {getattr(self, name)!r} "
                                 f"(a {type(getattr(self, name)).__name__}; a string such as 'false' would read as true).")
        for name in ("base_model_name_or_path", "revision", "peft_version"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"LoraConfig: `{name}` must be a str or None, got {getattr(self, name)!r}.")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"LoraConfig: Invalid task type: {self.task_type!r}. Must be one of the following "
                             f"task types: {', '.join(TASK_TYPES)} (or None).")
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"LoraConfig: `{name}` must be a dict {{regex: value}}, got {getattr(self, name)!r}.")
        for key, value in self.rank_pattern.items():
            check_regex("rank_pattern", key, rf"(.*\.)?({key})$")
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LoraConfig: rank_pattern[{key!r}] must be a positive int, got {value!r}.")
        for key, value in self.alpha_pattern.items():
            check_regex("alpha_pattern", key, rf"(.*\.)?({key})$")
            if not is_number(value) or not math.isfinite(value):
                raise ValueError(f"LoraConfig: alpha_pattern[{key!r}] must be a finite number, got {value!r}.")
        if not is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig: `lora_dropout` must be a number in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig: `bias` must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        init = self.init_lora_weights
        if init not in (True, False, "gaussian"):
            if isinstance(init, str) and (init in _KNOWN_INITS or init.startswith("pissa_niter_")):
                raise ValueError(
                    f"LoraConfig: `init_lora_weights={init!r}` is a PEFT initialisation funclora does "
                    "not implement; use True, 'gaussian' or False."
                )
            raise ValueError(f"Unknown initialization init_lora_weights={init!r}: funclora takes True "
                             "(kaiming-uniform A, zero B), 'gaussian' or False.")

    def _check_patterns(self):
        """The regexes and layer selectors: each compiles as PEFT will use it."""
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "all-linear":
                check_regex(name, value, value)
        for name in self.modules_to_save or []:
            check_regex("modules_to_save", name, rf"(^|.*\.){name}($|\..*)")
        layers = self.layers_to_transform
        if layers is not None and not (is_index(layers) or (isinstance(layers, list) and all(map(is_index, layers)))):
            raise ValueError(f"LoraConfig: `layers_to_transform` must be a layer index (int ≥ 0), a list of them or "
                             f"None, got {layers!r}.")
        patterns = self.layers_pattern
        if patterns not in (None, []):
            if isinstance(patterns, str):
                patterns = [patterns]
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"LoraConfig: `layers_pattern` must be a str, a list of str or None, got "
                                 f"{self.layers_pattern!r}.")
            for pattern in patterns:
                check_regex("layers_pattern", pattern, rf"(?:.*?\.)?(?:{pattern})\.(\d+)\.")

    def _check_combinations(self):
        """Fields that PEFT refuses together."""
        if isinstance(self.target_modules, str):
            if self.layers_to_transform is not None:
                raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
            if self.layers_pattern not in (None, []):
                raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern not in (None, []) and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        if self.target_parameters:
            if self.lora_dropout:
                raise ValueError(
                    f"LoraConfig: `lora_dropout={self.lora_dropout}` cannot be used with "
                    "`target_parameters` (the parameter's update is merged into the weight for the "
                    "module's forward, so there is no LoRA branch input to drop). Set lora_dropout=0."
                )

    # --- custom rules -------------------------------------------------------------------------
    def register_custom_module(self, mapping: dict) -> None:
        """Use your own rules for these module types with this config: ``{nn.LSTM: MyRule()}``.

        Rules given here win over :func:`funclora.register_rule` and the built-ins. A rule class
        (not an instance) is instantiated with no arguments, so the seed guide's
        ``config._register_custom_module({nn.LSTM: MyLoraLSTMLayer})`` works.

        The mapping is not saved in ``adapter_config.json`` (as in PEFT): register it again on a
        loaded config. A full LSTM rule is in :mod:`funclora.rules`.

        Example:
            >>> import torch, funclora as fl
            >>> class Scaled(torch.nn.Linear):
            ...     pass
            >>> config = fl.LoraConfig(target_modules=["0"], r=2)
            >>> config.register_custom_module({Scaled: fl.rules.LinearRule()})
            >>> fl.LoRA(torch.nn.Sequential(Scaled(4, 3)), config).plan.targets["0"].rule
            LinearRule()
        """
        for module_type, rule in mapping.items():
            if not isinstance(module_type, type):
                raise TypeError(
                    f"register_custom_module: keys must be module types such as nn.LSTM, got {module_type!r}."
                )
            self._custom_modules[module_type] = as_rule(rule, module_type)

    _register_custom_module = register_custom_module

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The config as PEFT writes it in ``adapter_config.json`` (JSON-ready values).

        Example:
            >>> import funclora as fl
            >>> d = fl.LoraConfig(target_modules=["q_proj", "v_proj"], r=16).to_dict()
            >>> d["peft_type"], d["r"], d["target_modules"]
            ('LORA', 16, ['q_proj', 'v_proj'])
        """
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "runtime_config":
                continue
            out[f.name] = jsonable(value)
        out["peft_type"] = "LORA"
        return out

    def to_json_string(self) -> str:
        """``to_dict()`` as PEFT formats it (indent 2, sorted keys).

        Example:
            >>> import funclora as fl
            >>> fl.LoraConfig(target_modules=["fc"]).to_json_string().splitlines()[0]
            '{'
        """
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "LoraConfig":
        """Build a config from a PEFT ``adapter_config.json`` dict.

        Keys this version does not know (newer PEFT fields) are ignored with one warning.

        Example:
            >>> import funclora as fl
            >>> config = fl.LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "target_modules": ["fc"]})
            >>> config.r, config.lora_alpha, config.target_modules
            (4, 8, ['fc'])
        """
        if not isinstance(data, dict):
            raise ValueError(f"LoraConfig.from_dict: {source} must hold a JSON object, found {type(data).__name__}.")
        peft_type = data.get("peft_type", "LORA")
        if peft_type not in (None, "LORA"):
            raise ValueError(
                f"LoraConfig.from_dict: {source} has peft_type={peft_type!r}; funclora reads LoRA "
                "adapters only (peft_type 'LORA')."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(
                f"LoraConfig.from_dict: {source} has keys this funclora version does not know and "
                f"ignores: {unknown}.",
                UserWarning,
                stacklevel=2,
            )
        kwargs = {k: v for k, v in data.items() if k in names and k != "runtime_config"}
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            if source == "config":
                raise
            raise type(e)(f"{e} (in {source})") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None) -> "LoraConfig":
        """Read ``adapter_config.json`` from a folder (PEFT's or funclora's).

        Example:
            >>> import tempfile, torch, funclora as fl
            >>> lora = fl.LoRA(torch.nn.Sequential(torch.nn.Linear(4, 2)), fl.LoraConfig(target_modules=["0"], r=2))
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     fl.save_adapter(folder, lora.init(), lora=lora)
            ...     fl.LoraConfig.from_pretrained(folder).r
            2
        """
        folder = os.path.join(path, subfolder) if subfolder else path
        return read_config_folder(folder, "LoraConfig.from_pretrained")


# --- adapter_config.json, and the custom rules an adapter file records ---------------------------
def read_config_folder(path, fn: str) -> LoraConfig:
    """The :class:`LoraConfig` of an adapter folder (``path`` or its only named adapter).

    Custom rules recorded in the folder's safetensors metadata are registered on the config
    when they can be imported; others must be registered by hand (``config.register_custom_module``).
    """
    folder = files.adapter_folder(path, None, fn)
    config = read_config_file(folder, fn)
    file = os.path.join(folder, files.WEIGHTS_NAME)
    try:
        header, _ = files.read_header(file, fn)
        rules = rules_in_metadata(header.get("__metadata__", {}), file, fn)
    except (OSError, AdapterFileError):
        return config  # reading the weights reports their problems
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the user registers the others by hand, as in PEFT
        return with_rules(config, rules, required=False, file=file, fn=fn)


def read_config_file(folder: str, fn: str) -> LoraConfig:
    """``folder/adapter_config.json`` as a :class:`LoraConfig`; errors name the file."""
    file = os.path.join(folder, files.CONFIG_NAME)
    data = files.read_json(file, fn)
    if data.get("peft_type", "LORA") not in ("LORA", None):
        raise AdapterFileError(f"{fn}: {file!r} is a {data['peft_type']!r} adapter; funclora reads LoRA adapters "
                               "only (peft_type 'LORA').")
    try:
        return LoraConfig.from_dict(data, source=file)
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"{fn}: {file!r} holds a config funclora cannot use: {e}") from None
