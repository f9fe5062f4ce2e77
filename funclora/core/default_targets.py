"""Default LoRA targets per transformers ``config.model_type`` (PEFT 0.21's choices).

Used when ``LoraConfig.target_modules`` is None. Grouped by target list: each entry maps a
target list (or regex string) to the model types that use it. The table covers every family of
PEFT 0.21.2's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` with the same targets
(tests/test_default_targets.py pins that). For a model type it lacks (e.g. ``phi3``, which PEFT
lacks too), LoRA raises an error built from :func:`funclora.suggest_targets`: the model's linear
layers by role and a suggested ``target_modules``.
"""

from __future__ import annotations

__all__ = ["DEFAULT_TARGETS", "default_targets"]

_GROUPS: list[tuple[list[str] | str, str]] = [
    (["q", "v"], "t5 mt5"),
    (["q_proj", "v_proj"],
     "bart opt gptj gpt_neo llama llama4 mistral mixtral stablelm gemma gemma2 gemma3_text qwen2 qwen3"),
    (["c_attn"], "gpt2 gpt_bigcode"),
    (["query_key_value"], "bloom gpt_neox chatglm RefinedWebModel RefinedWeb falcon"),
    (["q", "v", "q_proj", "v_proj"], "blip-2"),
    (["query", "value"], "bert roberta xlm-roberta electra layoutlm"),
    (["query_proj", "value_proj"], "deberta-v2"),
    (["in_proj"], "deberta"),
    (["Wqkv"], "mpt"),
    (["c_proj", "c_attn"], "btlm"),
    (["qkv_proj"], "codegen"),
    (["q_proj", "v_proj", "fc1", "fc2"], "phi"),
    (r".*language_model\..*\.(q_proj|v_proj)", "gemma4"),
    (["q_proj", "k_proj", "v_proj", "o_proj"], "nemotron_h"),
    (["key", "value", "receptance", "output"], "rwkv"),
    (["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"], "rwkv7"),
]

#: ``{model_type: target_modules}``
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    model_type: targets for targets, model_types in _GROUPS for model_type in model_types.split()
}


def default_targets(model) -> list[str] | str | None:
    """The default ``target_modules`` for a transformers model, or None if its type is unknown.

    Example:
        >>> import types
        >>> from funclora.core.default_targets import default_targets
        >>> default_targets(types.SimpleNamespace(config=types.SimpleNamespace(model_type="mistral")))
        ['q_proj', 'v_proj']
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = DEFAULT_TARGETS.get(model_type)
    return list(targets) if isinstance(targets, list) else targets
