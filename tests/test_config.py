"""Config schema: YAML composition, dotted overrides, strict keys, value checks, every shipped config loads."""
import glob
import os

import pytest

from fastcl.config import ConfigError, load_config, save_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "exp", "*.yaml")))
                         + [os.path.join(REPO, "configs", "test", "tiny.yaml")])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.method.name and cfg.model.arch


def test_defaults_compose_and_override():
    cfg = load_config(os.path.join(REPO, "configs/exp/cifar10_mocov2.yaml"), ["optim.lr=0.1", "data.aug.views.1.size=24"])
    assert cfg.model.cifar_stem is True  # from configs/data/cifar10.yaml via defaults
    assert cfg.method.tau == 0.1  # the MoCo CIFAR demo's, set by the exp over configs/method/mocov2.yaml's 0.2
    assert load_config(os.path.join(REPO, "configs/exp/cifar10_ifnd.yaml")).method.tau == 0.1  # inherits the base's
    assert cfg.optim.lr == 0.1 and cfg.data.aug.views[1].size == 24 and cfg.data.aug.views[0].size == 32
    assert cfg.data.aug.views[0].blur_p == 0.0 and cfg.data.aug.views[0].gray_p == 0.2  # schema default filled in


@pytest.mark.parametrize("override,needle", [
    (["optim.lrr=0.1"], "did you mean optim.lr"),
    (["lr=0.1"], "optim.lr"),
    (["data.aug.views.0.sizee=3"], "data.aug.views.*.size"),
    (["optim.lr=abc"], "optim.lr"),
    (["method.name=simclrr"], "method.name"),
    (["model.arch=resnet101"], "model.arch"),
    (["method.tau=0"], "method.tau"),
    (["optim.batch_size=-4"], "optim.batch_size"),
    (["optim.lr"], "key=value"),
])
def test_bad_overrides_fail_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim.learning_rate.*bad.yaml"):
        load_config(str(p))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(os.path.join(REPO, "configs/test/tiny.yaml"), ["optim.lr=0.2"])
    save_config(cfg, str(tmp_path / "c.yaml"))
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg
