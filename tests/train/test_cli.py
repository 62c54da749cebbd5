"""``python -m train`` argument parsing, presets and config validation."""

from __future__ import annotations

import dataclasses

import pytest

from train import __main__ as cli
from train import config as config_lib


def test_presets_exist_for_attention():
    names = config_lib.preset_names()
    assert {"tiny", "mqar-attention", "text-attention"} <= set(names)
    mqar = config_lib.get_preset("mqar-attention")
    assert (mqar.data.seq_len, mqar.data.num_kv_pairs, mqar.data.vocab_size) == (128, 16, 8192)
    assert mqar.model.num_layers == 2 and mqar.data.task == "mqar"
    assert config_lib.get_preset("text-attention").data.task == "text"


def test_overrides_are_applied():
    cfg = cli.parse(
        [
            "--preset",
            "tiny",
            "--steps",
            "7",
            "--optim.learning-rate",
            "0.01",
            "--data.num-kv-pairs",
            "4",
            "--mesh.fsdp",
            "2",
            "--resume",
        ]
    )
    assert cfg.preset == "tiny" and cfg.steps == 7 and cfg.optim.learning_rate == 0.01
    assert cfg.data.num_kv_pairs == 4 and cfg.mesh.fsdp == 2 and cfg.resume
    # Untouched fields keep the preset's values.
    assert cfg.model == config_lib.get_preset("tiny").model


def test_text_files_override():
    cfg = cli.parse(["--preset", "text-attention", "--data.text-files", "a.txt", "b.txt"])
    assert cfg.data.text_files == ("a.txt", "b.txt")


def test_unknown_preset(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["--preset", "mqar-nonexistent"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown preset 'mqar-nonexistent'" in err and "tiny" in err and "mqar-attention" in err


def test_missing_preset(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["--steps", "3"])
    assert e.value.code == 2
    assert "--preset is required" in capsys.readouterr().err


def test_override_of_the_wrong_type(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["--preset", "tiny", "--steps", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "many" in err


def test_override_of_an_unknown_field(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["--preset", "tiny", "--optim.lrate", "0.1"])
    assert e.value.code == 2
    assert "--optim.lrate" in capsys.readouterr().err


def test_override_with_an_invalid_value(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["--preset", "tiny", "--batch-size", "30", "--grad-accum", "4"])
    assert e.value.code == 2
    assert "batch_size=30 must be divisible by grad_accum=4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(steps=0), "steps must be positive"),
        (dict(resume=True, overwrite=True), "resume and overwrite exclude each other"),
        (dict(stop_after=0), "stop_after must be positive"),
    ],
    ids=["steps", "resume_overwrite", "stop_after"],
)
def test_invalid_train_config(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(config_lib.get_preset("tiny"), **change)


def test_bad_mixer_options():
    cfg = config_lib.get_preset("tiny")
    with pytest.raises(ValueError, match="model.mixer_options must be a JSON object"):
        dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mixer_options="{oops"))
    bad = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, mixer_options='{"nope": 1}')
    )
    with pytest.raises(ValueError, match=r"model.mixer_options has fields \['nope'\]"):
        config_lib.build_model_config(bad, 256)


def test_unknown_mixer():
    cfg = config_lib.get_preset("tiny")
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mixer="no_such_mixer"))
    with pytest.raises(ValueError, match="model.mixer='no_such_mixer' is not a registered"):
        config_lib.build_model_config(bad, 256)


def test_hybrid_pattern_builds_a_mixed_stack():
    cfg = config_lib.get_preset("tiny")
    hyb = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pattern="LA", num_layers=4))
    model = config_lib.build_model_config(hyb, 256)
    assert model.num_layers == 4
