from pathlib import Path

import pytest
from ajepa.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_match_the_paper():
    cfg = load_config()
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (768, 12, 12)
    assert (cfg.model.pred_dim, cfg.model.pred_depth, cfg.model.pred_heads) == (512, 16, 16)
    assert cfg.optim.lr == 2e-4 and cfg.optim.ema_momentum == (0.996, 1.0)
    assert cfg.audio.num_mel_bins == 128 and cfg.mask.schedule == "curriculum"


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  embed_dim: 192\n  depth: 4\n  num_heads: 3\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["optim.lr=5e-4", "mask.rb_target_scale=[0.1, 0.2]", "run.name=abc"])
    assert cfg.model.embed_dim == 192 and cfg.model.depth == 4
    assert cfg.optim.lr == 5e-4
    assert cfg.mask.rb_target_scale == (0.1, 0.2)
    assert cfg.run.name == "abc"


@pytest.mark.parametrize(
    "text, overrides, fragment",
    [
        ("model:\n  embed_dims: 3\n", [], "unknown key model.embed_dims"),
        ("modle:\n  depth: 3\n", [], "unknown key modle"),
        ("", ["optim.lr=-1"], "optim.lr: must be > 0"),
        ("", ["mask.schedule=spiral"], "mask.schedule"),
        ("", ["model.num_heads=5"], "model.num_heads"),
        ("", ["model.depth=two"], "model.depth: expected an integer"),
        ("", ["data.normalize=1"], "data.normalize: expected true or false"),
        ("", ["model.attention=fast"], "model.attention: must be one of flash, efficient, cudnn, math, auto"),
        ("", ["run.compile=fast"], "run.compile: expected true or false"),
        ("", ["run.compile=true", "run.compile_mode=max-autotune"],
         "run.compile_mode: must be one of default, max-autotune-no-cudagraphs, got 'max-autotune'"),
        ("", ["run.compile_mode=max-autotune-no-cudagraphs"],
         "run.compile_mode: max-autotune-no-cudagraphs needs run.compile: true"),
        ("", ["mask.rb_target_scale=[0.3, 0.1]"], "mask.rb_target_scale"),
        ("", ["mask.rb_target_scale=0.2"], "mask.rb_target_scale: expected a list of 2"),
        ("", ["data.crop_frames=100"], "data.crop_frames"),
        ("", ["finetune.token_reg=mask"], "finetune.token_reg: must be one of rm, drop, zero, none, got 'mask'"),
        ("", ["eval.pool=max"], "eval.pool: must be one of mean, freq, got 'max'"),
        ("", ["finetune.layer_decay=0"], "finetune.layer_decay: must be in (0, 1]"),
        ("", ["finetune.train_fraction=0"], "finetune.train_fraction: must be in (0, 1]"),
        ("", ["finetune.train_fraction=1.5"], "finetune.train_fraction: must be in (0, 1]"),
        ("", ["finetune.loss=mse"], "finetune.loss: must be one of auto, ce, bce"),
        ("", ["finetune.head_norm=groupnorm"], "finetune.head_norm: must be one of layernorm, batchnorm"),
        ("", ["finetune.head_norm=batchnorm", "data.batch_size=1"], "finetune.head_norm: batchnorm standardises over"),
        ("finetune:\n  token_ratio: 1.5\n", [], "finetune.token_ratio: must be in (0, 1)"),
        ("", ["lr=1"], "key must be section.key"),
        ("", ["optim.lr"], "expected section.key=value"),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path, text, overrides, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert fragment in str(err.value)
    assert str(path) in str(err.value)


def test_a_bad_value_from_an_override_names_the_override_and_one_from_the_file_only_the_file(tmp_path):
    path = write(tmp_path, "model:\n  depth: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.depth=two", "optim.lr=1e-3"])
    assert str(err.value) == f"{path}, override model.depth=two: model.depth: expected an integer, got 'two'"
    with pytest.raises(ConfigError) as err:  # the last of repeated overrides is the one that counts
        load_config(path, ["model.depth=4", "model.depth=0"])
    assert str(err.value) == f"{path}, override model.depth=0: model.depth: must be >= 1, got 0"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.depths=4"])
    assert str(err.value).startswith(f"{path}, override model.depths=4: unknown key model.depths (known: ")
    with pytest.raises(ConfigError) as err:  # an override of another key leaves the file's error the file's
        load_config(write(tmp_path, "model:\n  depth: two\n"), ["model.embed_dim=96"])
    assert str(err.value) == f"{path}: model.depth: expected an integer, got 'two'"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.steps=0"])
    assert str(err.value) == "defaults, override optim.steps=0: optim.steps: must be >= 1, got 0"


def test_a_mistyped_config_or_space_name_lists_the_shipped_ones(tmp_path, monkeypatch, capsys):
    from ajepa import cli

    assert cli.config_path("small") == ROOT / "configs" / "small.yaml"
    assert cli.config_path(str(tmp_path / "mine.yaml")) == tmp_path / "mine.yaml"  # a path is taken as it is
    with pytest.raises(SystemExit) as exit_:
        cli.main(["pretrain", "--config", "smal"])
    assert exit_.value.code == 2  # argparse's usage error, before anything runs
    shipped = ", ".join(sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
    assert f"argument --config: 'smal' is neither a file nor a shipped config ({shipped})" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").write_text("optim:\n  steps: 5\n")  # a file in the working folder, named without .yaml
    assert cli.config_path("mine") == Path("mine")
    # The sweep's --space the same way, over search_spaces/.
    assert cli.space_path("finetune") == ROOT / "search_spaces" / "finetune.yaml"
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--space", "mask_curriculm"])
    spaces = ", ".join(sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml")))
    assert f"'mask_curriculm' is neither a file nor a shipped search space ({spaces})" in capsys.readouterr().err


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [\n"))


def test_a_config_extends_another_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  depth: 3\n  embed_dim: 96\noptim:\n  steps: 50\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "long.yaml").write_text("extends: ../base.yaml\noptim:\n  steps: 500\n")
    cfg = load_config(tmp_path / "sub" / "long.yaml", ["model.depth=4"])
    assert (cfg.model.depth, cfg.model.embed_dim, cfg.optim.steps) == (4, 96, 500)
    assert load_config(ROOT / "configs" / "demo-long.yaml").model == load_config(ROOT / "configs" / "tiny.yaml").model
    (tmp_path / "loop.yaml").write_text("extends: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends: loop.yaml makes a loop"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml: cannot read config"):
        load_config(tmp_path / "orphan.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["optim.steps=77", "mask.schedule=inverse"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert cfg.flat()["optim.steps"] == 77


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    assert isinstance(load_config(ROOT / "configs" / name), Config)
