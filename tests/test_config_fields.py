"""funclora.core.config_fields: single LoraConfig field values checked and converted (errors name the field)."""

import dataclasses
import json
import re

import pytest

from funclora.core.config_fields import check_regex, is_index, is_number, jsonable, name_list, names_or_regex


@dataclasses.dataclass
class Point:
    x: int
    tags: tuple


# --- jsonable ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value, want", [
    ({"v_proj", "q_proj", "k_proj"}, ["k_proj", "q_proj", "v_proj"]),      # string sets sorted: stable files
    (("v_proj", "q_proj"), ["q_proj", "v_proj"]),                          # string tuples too
    ((3, 1, 2), [3, 1, 2]),                                                # other tuples keep their order
    ((1, "a"), [1, "a"]),
    ({2}, [2]),
    (set(), []),
    ({"rank": {"q": 4}, "layers": (0, 1)}, {"rank": {"q": 4}, "layers": [0, 1]}),
    (Point(1, (2, 3)), {"x": 1, "tags": (2, 3)}),                          # asdict, as dataclasses gives it
    ("all-linear", "all-linear"),
    (None, None),
    (8, 8),
    ([("b", "a")], [("b", "a")]),                                          # lists are not walked
])
def test_jsonable(value, want):
    assert jsonable(value) == want
    assert type(jsonable(value)) is type(want)


def test_jsonable_output_dumps_to_json():
    value = {"target_modules": {"q", "v"}, "layers": (1, 0), "pattern": {"a": {"b": ("y", "x")}}}
    assert json.dumps(jsonable(value), sort_keys=True) == (
        '{"layers": [1, 0], "pattern": {"a": {"b": ["x", "y"]}}, "target_modules": ["q", "v"]}')


# --- is_number / is_index ---------------------------------------------------------------------
@pytest.mark.parametrize("value, number, index", [
    (0, True, True), (8, True, True), (-1, True, False), (0.5, True, False), (2.0, True, False),
    (True, False, False), (False, False, False), ("8", False, False), (None, False, False), ([1], False, False),
])
def test_is_number_and_is_index(value, number, index):
    assert is_number(value) is number
    assert is_index(value) is index


# --- check_regex ------------------------------------------------------------------------------
def test_check_regex_accepts_valid_patterns():
    assert check_regex("rank_pattern", "q_proj", r"(.*\.)?(q_proj)$") is None
    assert check_regex("target_modules", ".*", ".*") is None


def test_check_regex_names_the_field_and_the_entry():
    with pytest.raises(ValueError) as info:
        check_regex("alpha_pattern", "layers.(0", r"(.*\.)?(layers.(0)$")
    assert str(info.value) == (
        "LoraConfig: `alpha_pattern` entry 'layers.(0' is not a valid regular expression (missing ), unterminated "
        "subpattern at position 7); escape special characters with re.escape.")
    assert info.value.__cause__ is None and info.value.__suppress_context__      # raised `from None`
    with pytest.raises(ValueError, match=re.escape("LoraConfig: `target_modules` entry '*q' is not a valid regular "
                                                   "expression (nothing to repeat at position 0)")):
        check_regex("target_modules", "*q", "*q")


# --- name_list / names_or_regex ---------------------------------------------------------------
@pytest.mark.parametrize("value, want", [
    (["q", "v"], ["q", "v"]),
    (["v", "q", "v", "q"], ["v", "q"]),        # duplicates dropped, first order kept
    (("q", "k"), ["q", "k"]),
    ({"only": 1}, ["only"]),                   # a dict's keys
    ([], []),
    ("qv", ["q", "v"]),                        # a str is iterable: names_or_regex keeps it whole instead
])
def test_name_list(value, want):
    assert name_list("modules_to_save", value) == want
    assert type(name_list("modules_to_save", value)) is list


def test_name_list_errors_name_the_field():
    with pytest.raises(TypeError) as info:
        name_list("target_parameters", 5)
    assert str(info.value) == "LoraConfig: `target_parameters` must be a list of strings, got 5."
    assert info.value.__suppress_context__
    with pytest.raises(TypeError) as info:
        name_list("modules_to_save", ["head", 3])
    assert str(info.value) == "LoraConfig: `modules_to_save` must hold strings, found 3."
    with pytest.raises(TypeError, match=re.escape("LoraConfig: `exclude_modules` must hold strings, found None.")):
        name_list("exclude_modules", ["a", None])
    with pytest.raises(TypeError, match=re.escape("LoraConfig: `x` must be a list of strings, got [['a']].") + "$"):
        name_list("x", [["a"]])  # an unhashable entry: not a list of strings


def test_names_or_regex():
    assert names_or_regex("target_modules", None) is None
    assert names_or_regex("target_modules", r".*\.q_proj") == r".*\.q_proj"
    assert names_or_regex("target_modules", "all-linear") == "all-linear"
    assert names_or_regex("target_modules", ("q_proj", "q_proj", "v_proj")) == ["q_proj", "v_proj"]
    assert names_or_regex("target_modules", {"v", "v"}) == ["v"]
    with pytest.raises(TypeError, match=re.escape("LoraConfig: `exclude_modules` must hold strings, found 1.")):
        names_or_regex("exclude_modules", [1])
    with pytest.raises(TypeError, match=re.escape("LoraConfig: `exclude_modules` must be a list of strings, got 1.")):
        names_or_regex("exclude_modules", 1)
