"""The rules registry: every rule answers the questions the rest of saelib asks it."""
from __future__ import annotations

import pytest

from saelib.sae.core import ACTIVATIONS, SAE, SAEConfig
from saelib.sae.rules import RULES, Rule, get_rule, knob_text, register, rule_attr, rule_in
from saelib.pipeline import sweep_configs, sweep_name


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_answers_the_contract(name):
    r = get_rule(name)
    assert r.name == name and name in ACTIVATIONS
    for attr in ("label", "paper_label", "color", "saelens_name", "knob", "knob_tag"):
        assert getattr(r, attr), attr
    assert isinstance(r.competes, bool) and isinstance(r.uses_b_enc, bool) and r.linestyle
    kw = {"k": 4} if r.knob == "k" else {}
    sae = SAE(SAEConfig(d_in=8, d_sae=16, activation=name, **kw))
    assert sae.rule is r and sae.cfg.use_b_enc == r.uses_b_enc


def test_lookups_and_errors():
    assert rule_in("blocks.3-batchtopk-k8-s0") == "batchtopk" and rule_in("x-jumprelu-l00.001-s0") == "jumprelu"
    assert rule_attr("standard", "color", "grey") == "grey"  # an SAELens architecture is no rule
    assert knob_text({"activation": "topafa", "afa_coeff": 1 / 16}) == "λ=1/16"
    assert knob_text({"activation": "topk", "k": 32.0}) == "k=32"
    with pytest.raises(ValueError, match="Unknown activation"):
        get_rule("gelu")
    with pytest.raises(ValueError, match="taken"):
        register(RULES["topk"])
    with pytest.raises(ValueError, match="empty"):
        register(Rule())


def test_sweep_names_and_grid_come_from_the_rules():
    assert sweep_name("h", "topk", k=32, seed=1) == "h-topk-k32-s1"
    assert sweep_name("h", "topafa", afa_coeff=0.0625) == "h-topafa-afa0.0625-s0"
    assert sweep_name("h", "relu", l1_coeff=5.0) == "h-relu-l15-s0"
    cfgs = sweep_configs(["h"], 8, 32, topk_ks=[4], knobs={"jumprelu": [1e-3, 1e-2]})
    assert sorted(cfgs) == ["h-jumprelu-l00.001-s0", "h-jumprelu-l00.01-s0", "h-topk-k4-s0"]
    assert cfgs["h-jumprelu-l00.01-s0"].l0_coeff == 0.01 and cfgs["h-topk-k4-s0"].l0_coeff == 0.0
