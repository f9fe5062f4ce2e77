"""The public surface is curated: this test pins it, name by name."""

import funclora as fl
import funclora.distributed
import funclora.io
import funclora.rules

PUBLIC = [
    "AdapterFileError", "AdapterMismatchError", "Factor", "LayerGroup", "LoRA", "LoraConfig",
    "MaterializationError", "ParameterRule", "PeftModel", "Plan", "Rule", "RuleCheckError", "Target",
    "TargetNotFoundError", "TargetSuggestion", "UnsupportedModuleError", "distributed", "get_peft_model",
    "load_adapter", "load_adapters", "register_rule", "rules", "save_adapter", "select", "stack", "strict",
    "suggest_targets", "unregister_rule", "unstack",
]
MODULES = {
    funclora.io: ["save_adapter", "load_adapter", "load_adapters", "read_config", "read_base_weights",
                  "load_adapter_and_base_weights"],
    funclora.distributed: ["all_reduce_grads", "broadcast_adapter", "fsdp_units", "sharded_forward"],
    funclora.rules: ["Rule", "Factor", "ParameterRule", "LinearRule", "Conv1DRule", "EmbeddingRule", "ConvRule",
                     "MultiheadAttentionRule", "OutputRule", "register_rule", "unregister_rule", "find_rule",
                     "supported_types", "as_rule", "behaves_as_builtin", "overlay_is_builtin", "init_factor",
                     "LoraParts", "lora_weight", "dense_delta"],
}


def test_all_is_pinned_and_sorted():
    assert fl.__all__ == PUBLIC == sorted(PUBLIC)
    for name in fl.__all__:
        assert getattr(fl, name) is not None


def test_public_submodules_are_pinned():
    for module, names in MODULES.items():
        assert module.__all__ == names, module.__name__
        for name in names:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"


def test_top_level_names_are_the_submodules_objects():
    """One object per name: the façade, the io functions and the rule registry are not copies."""
    assert fl.save_adapter is funclora.io.save_adapter and fl.load_adapter is funclora.io.load_adapter
    assert fl.register_rule is funclora.rules.register_rule and fl.Rule is funclora.rules.Rule
    assert fl.__version__ == "0.1.0"


def test_errors_are_value_errors():
    for error in (fl.TargetNotFoundError, fl.UnsupportedModuleError, fl.AdapterMismatchError,
                  fl.AdapterFileError, fl.RuleCheckError):
        assert issubclass(error, ValueError)


def test_public_names_have_docstrings():
    missing = [n for n in fl.__all__ if isinstance(getattr(fl, n), type) or callable(getattr(fl, n))
               if not (getattr(fl, n).__doc__ or "").strip()]
    assert not missing, missing
