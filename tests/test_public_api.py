"""The public surface is curated: this test pins it."""

import funclora as fl


def test_all_is_pinned_and_sorted():
    assert fl.__all__ == sorted(fl.__all__)
    for name in fl.__all__:
        assert getattr(fl, name) is not None
    assert {"LoRA", "LoraConfig", "get_peft_model", "stack", "unstack", "select", "register_rule",
            "TargetNotFoundError", "UnsupportedModuleError", "AdapterMismatchError"} <= set(fl.__all__)


def test_errors_are_value_errors():
    for error in (fl.TargetNotFoundError, fl.UnsupportedModuleError, fl.AdapterMismatchError):
        assert issubclass(error, ValueError)


def test_public_names_have_docstrings():
    missing = [n for n in fl.__all__ if isinstance(getattr(fl, n), type) or callable(getattr(fl, n))
               if not (getattr(fl, n).__doc__ or "").strip()]
    assert not missing, missing
