"""Recipe cards (docs/recipes.yaml, rendered as docs/RECIPES.md): every published config has a card, every
recipe-defining value on it equals the config's resolved value, and every value names its source."""
import copy
import os

import pytest

from fastcl.lab import recipes
from fastcl.config import load_config

CARDS = recipes.load_cards()
EXP = recipes.exp_configs()


@pytest.mark.parametrize("name", sorted(EXP))
def test_shipped_config_matches_its_card(name):
    assert name in CARDS["cards"], f"configs/exp/{name}.yaml has no card in docs/recipes.yaml"
    problems = recipes.check_card(load_config(EXP[name]), CARDS["cards"][name], CARDS["sources"])
    assert not problems, "\n".join(problems)


def test_every_card_has_a_config_and_every_config_a_card():
    assert recipes.check_all(CARDS) == {}


def test_recipes_md_is_the_rendering_of_the_yaml():
    with open(recipes.MD_PATH) as f:
        assert f.read() == recipes.render(CARDS), "docs/RECIPES.md is stale: run `python -m fastcl.lab.recipes`"


def test_every_source_id_is_a_link():
    for sid, s in CARDS["sources"].items():
        assert s["url"].startswith(("https://", "../")) and s["what"], sid


# ------------------------------------------------------------------------------ the check can fail

def test_a_changed_config_value_fails_its_card():
    name = "cifar10_mocov2"
    card = CARDS["cards"][name]
    for over, key in (["optim.lr=0.03"], "optim.lr"), (["model.proj_bn=true"], "model.proj_bn"), \
                     (["data.aug.views.1.scale=[0.2,1.0]"], "data.aug.views.1"), (["method.tau=0.2"], "method.tau"):
        problems = recipes.check_card(load_config(EXP[name], over), card, CARDS["sources"])
        assert any(p.startswith(f"{key}:") and "card says" in p for p in problems), (over, problems)


def test_a_missing_card_or_key_or_source_fails():
    cards = copy.deepcopy(CARDS)
    del cards["cards"]["cifar10_sce"]
    cards["cards"]["cifar10_simclr"]["values"].pop("optim.base_batch")
    cards["cards"]["imagenet_sce"]["values"]["method.sce.tau_m"]["source"] = "from the paper"
    cards["cards"]["imagenet_mocov2"]["values"]["method.tau"]["source"] = "[no-such-source] flag"
    cards["cards"]["cifar10_sane"]["values"]["method.ema"]["source"] = "our choice:"
    cards["cards"]["ghost"] = {"values": {}}
    got = recipes.check_all(cards)
    assert "no card" in got["cifar10_sce"][0]
    assert got["cifar10_simclr"] == ["optim.base_batch: not on the card"]
    assert got["imagenet_sce"] == ["method.sce.tau_m: source cites no [source id] and is not marked "
                                   "'our choice: <reason>'"]
    assert "unknown source id" in got["imagenet_mocov2"][0]
    assert "without a reason" in got["cifar10_sane"][0]
    assert "no config" in got["ghost"][0]


def test_required_keys_cover_the_method_section_and_every_view():
    cfg = load_config(EXP["imagenet_sce_multicrop"])
    keys = recipes.required_keys(cfg)
    assert [k for k in keys if k.startswith("data.aug.views.")] == [f"data.aug.views.{i}" for i in range(6)]
    assert {"method.sce.lam", "method.sce.tau_m", "optim.lars_eta", "model.shuffle_bn"} <= set(keys)
    assert "method.ifnd.levels" in recipes.required_keys(load_config(EXP["cifar10_ifnd"]))


def test_value_comparison():
    assert recipes.same(1, 1.0) and recipes.same([0.2, 1], [0.2, 1.0]) and not recipes.same(True, 1)
    assert not recipes.same(0.06, 0.03) and not recipes.same({"a": 1}, {"a": 1, "b": 2})
    assert os.path.isfile(recipes.CARDS_PATH)
