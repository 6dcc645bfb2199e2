from __future__ import annotations

import pytest

from tod_deploy.errors import UserError
from tod_deploy.recipes import load_recipe, parse_input_size
from tod_deploy.registry import get_method


def test_thumbdet_recipe_defaults_and_variants() -> None:
    base = load_recipe("thumbdet")
    assert base.input_size == (800, 1333) and base.model["scale"] == 4 and base.top_k == 100
    assert load_recipe("thumbdet", "2x").model["scale"] == 2
    assert load_recipe("thumbdet", "1x").paper["gmacs"] == 172.9


@pytest.mark.parametrize(("text", "size"), [("800x1333", (800, 1333)), ("640", (640, 640)), ([512, 640], (512, 640))])
def test_parse_input_size(text: object, size: tuple[int, int]) -> None:
    assert parse_input_size(text) == size


@pytest.mark.parametrize("text", ["800x", "axb", "0x800", "1x2x3"])
def test_parse_input_size_rejects(text: str) -> None:
    with pytest.raises(UserError, match="HEIGHTxWIDTH"):
        parse_input_size(text)


def test_unknown_method_variant_and_keys() -> None:
    with pytest.raises(UserError, match="unknown method 'yolo'"):
        get_method("yolo")
    with pytest.raises(UserError, match="no recipe for method 'yolo'"):
        load_recipe("yolo")
    with pytest.raises(UserError, match="no variant '3x'"):
        load_recipe("thumbdet", "3x")
    with pytest.raises(UserError, match="unknown keys"):
        load_recipe("thumbdet", overrides={"inptu_size": "800x800"})


def test_size_rules() -> None:
    with pytest.raises(UserError, match="below this model's minimum of 256"):
        load_recipe("thumbdet", overrides={"input_size": "128x800"})
    with pytest.raises(UserError, match="not divisible by 32"):
        load_recipe("thumbdet", overrides={"input_size": "800x1333", "size_divisor": 32})
    with pytest.raises(UserError, match="batch must be"):
        load_recipe("thumbdet", overrides={"batch": "0"})


def test_droneswarms_keeps_1000_rpn_proposals() -> None:
    recipe = load_recipe("sr_tod", "droneswarms")
    assert (recipe.model["rpn_nms_pre"], recipe.model["rpn_max_per_img"], recipe.top_k) == (1000, 1000, 100)
    assert load_recipe("sr_tod", "aitod").model["rpn_max_per_img"] == 3000
