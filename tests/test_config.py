import pytest

from aurl.config import Config, config_from_dict, load_config, write_config
from aurl.errors import ConfigError


def test_defaults_and_preset_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  d_model: 64\ntraining:\n  lr: 0.01\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntraining:\n  max_steps: 7\n")
    cfg = load_config(child, preset="tiny", overrides=["training.lr=1e-3", "model.attention=local"])
    assert cfg.model.d_model == 64  # file beats preset
    assert cfg.model.n_layers == 2  # from the preset
    assert cfg.training.max_steps == 7
    assert cfg.training.lr == pytest.approx(1e-3)  # override beats file
    assert cfg.model.attention == "local"


@pytest.mark.parametrize(
    "override, words",
    [
        ("training.lrr=1", "training.lrr"),
        ("model.attention=foo", "full"),
        ("training.lr=-1", "out of range"),
        ("training.seed=-1", "training.seed: -1 is out of range"),  # was numpy's traceback
        ("training.seed=18446744073709551616", "training.seed"),  # 2**64: torch's overflow
        ("training.max_steps=abc", "integer"),
        ("nosection.x=1", "nosection"),
        ("vocab.pitch_min=110", "pitch_max"),
    ],
)
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(overrides=[override])


def test_every_number_in_the_config_has_a_range():
    """A numeric key without bounds reaches the code unchecked (``training.seed=-1`` was a
    traceback from numpy's seeding); every int and float field declares its range."""
    import dataclasses
    import typing

    sections = typing.get_type_hints(Config)  # generation included: its seed was bounded
    unbounded = []
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(sections[section.name])
        for f in dataclasses.fields(sections[section.name]):
            if hints[f.name] in (int, float) and "range" not in f.metadata:
                unbounded.append(f"{section.name}.{f.name}")
    assert unbounded == [], unbounded


def test_round_trip_through_dict(tmp_path):
    cfg = load_config(preset="small", overrides=["data.curriculum=[[0, 128], [100, 256]]"])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.data.curriculum == ((0, 128), (100, 256))
    path = write_config(cfg, tmp_path)
    assert load_config(path) == cfg


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="tiny"):
        load_config(preset="huge")


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().training.lr = 1.0  # type: ignore[misc]
