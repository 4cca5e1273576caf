"""Sweeps: search space files checked before any trial (fast), how many trials fit the cluster, the results table;
then real Ray Tune sweeps of micro pretraining runs (slow): a 4-trial sweep in MLflow, ASHA stopping a trial, an
interrupted sweep resumed."""

import math
from pathlib import Path

import pytest
from ajepa import cli
from ajepa.config import ConfigError, load_config
from ajepa.masking import validate_masks
from ajepa.search_space import load_space
from ajepa.sweep import COMPLETED, FAILED, STOPPED, SweepSettings, TrialResult, by_config, max_concurrent, run_sweep
from ajepa.train.pretrain import patch_grid
from conftest import micro_cfg

ROOT = Path(__file__).resolve().parents[1]


def mask_check(cfg):
    validate_masks(cfg.mask, patch_grid(cfg))


# ------------------------------------------------------------------------------------------ search spaces


def test_shipped_search_spaces_load_against_the_tiny_and_base_configs():
    for name in ("tiny", "base"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        space = load_space(ROOT / "search_spaces" / "mask_curriculum.yaml", cfg, seeds=3)
        space.check(cfg, mask_check)  # each schedule and geometry masks the config's patch grid
        assert space.params[0].describe() == "grid[curriculum, rb, tf, mixture, inverse, random]"
        assert space.grid_size() == 6
    space = load_space(ROOT / "search_spaces" / "finetune.yaml", load_config(ROOT / "configs" / "tiny.yaml"))
    assert {p.key: p.describe() for p in space.params}["finetune.lr"] == "loguniform[0.0001, 0.003]"
    assert {p.key for p in space.params} >= {"finetune.layer_decay", "finetune.token_reg", "finetune.token_ratio",
                                             "finetune.time_mask", "finetune.freq_mask", "finetune.mixup"}


@pytest.mark.parametrize("text, message", [
    ("mask.shedule: {choice: [rb, tf]}", "unknown key mask.shedule (known in mask: schedule, c0"),
    ("masks.schedule: {choice: [rb]}", "unknown key masks.schedule (keys are section.field"),
    ("run.workers: {choice: [1, 2]}", "run.workers: cannot be swept (trial resources set the number"),
    ("optim.steps: {randint: [10, 20]}", "optim.steps: cannot be swept (every trial runs the same steps"),
    ("mask.c0: {normal: [0.1, 0.2]}", "mask.c0: expected one of choice, grid, uniform, loguniform, randint, quniform"),
    ("mask.c0: [0.1, 0.2]", "mask.c0: expected one of choice"),
    ("mask.c0: {choice: []}", "mask.c0: choice takes a list"),
    ("mask.schedule: {choice: [rb, rb]}", "mask.schedule: choice lists a value twice"),
    ("mask.c0: {uniform: [0.3, 0.1]}", "mask.c0: uniform range [0.3, 0.1] is empty"),
    ("mask.c0: {uniform: [0.1]}", "mask.c0: uniform takes [lo, hi] numbers"),
    ("optim.lr: {loguniform: [0.0, 1.0e-3]}", "optim.lr: loguniform needs lo > 0"),
    ("mask.rb_num_targets: {uniform: [2, 4]}", "mask.rb_num_targets: uniform draws reals, but the field holds int: "
                                                "use randint"),
    ("mask.c0: {randint: [1, 3]}", "mask.c0: randint draws integers, but the field holds float"),
    ("mask.context_scale: {uniform: [0.7, 0.9]}", "mask.context_scale: uniform draws reals, but the field holds "
                                                   "tuple"),
    ("mask.c0: {quniform: [0.05, 0.3, 0.1]}", "mask.c0: quniform needs q > 0 with lo and hi multiples of q"),
    ("mask.c0: {choice: [0.1, 2.0]}", "mask.c0: the value 2.0 is refused (mask.c0: must be in (0, 1], got 2.0)"),
    ("mask.c0: {loguniform: [0.01, 3.0]}", "mask.c0: the value 3.0 is refused"),
    ("mask.schedule: {choice: [rb, blocks]}", "mask.schedule: the value blocks is refused"),
    ("mask.rb_target_scale: {choice: [[0.15, 0.2], [0.9, 1.0]]}",  # a value the config takes, masks cannot
     "mask.rb_target_scale: the value [0.9, 1.0] is refused (mask.rb_target_scale: on the 8x8 patch grid"),
    ("run.seed: {grid: [0, 1]}", "run.seed: --seeds 2 repeats every configuration over run.seed"),
    ("", "expected a mapping of config keys to distributions"),
    ("mask.c0: {choice: [0.1", "not valid YAML"),
])
def test_malformed_space_is_refused_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    cfg = micro_cfg("mask.schedule=rb")
    with pytest.raises(ConfigError) as refused:
        load_space(path, cfg, seeds=2).check(cfg, mask_check)
    assert str(refused.value).startswith(f"{path}: ")
    assert message in str(refused.value), str(refused.value)


def test_malformed_space_stops_the_job_before_any_trial_or_run(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("mask.schedule: {choice: [rb, tf]}\nmask.tf_num_targets: {randint: [2, 1]}\n")
    out = tmp_path / "runs"
    assert cli.main(["sweep", "--space", str(space), "--out", str(out), "--num-samples", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {space}: mask.tf_num_targets: randint range [2, 1] is empty"), err
    assert not out.exists(), "nothing is written before the checks: no sweep folder, no MLflow store"


@pytest.mark.parametrize("sets, settings, message", [
    (["run.workers=0"], {}, "run.workers: a trial reports to Tune through Ray Train's callbacks"),
    (["eval.every=0"], {}, "eval.every: the objective probe/linear_acc comes from the online probe"),
    ([], {"job": "finetune"}, "--checkpoint is required for --job finetune"),
    ([], {"seeds": 0}, "--seeds: must be >= 1"),
    ([], {"scheduler": "hyperband"}, "--scheduler: must be one of asha, fifo"),
])
def test_impossible_settings_are_refused_before_any_trial(tmp_path, sets, settings, message):
    space = tmp_path / "space.yaml"
    space.write_text("mask.schedule: {choice: [rb, tf]}\n")
    with pytest.raises(ConfigError, match=message):
        run_sweep(micro_cfg(f"run.out_dir={tmp_path / 'runs'}", *sets), space, SweepSettings(**settings))
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------- resources and results


def test_concurrent_trials_leave_a_cpu_for_data_and_count_gpus():
    cfg = micro_cfg("run.workers=2", "run.cpus_per_worker=1")
    assert max_concurrent(cfg, {"CPU": 2.0}) == 1  # never 0: one trial at a time still runs
    assert max_concurrent(cfg, {"CPU": 16.0}) == 7  # (16 - 1 for Ray Data) / (2 workers + 0.1 for the trial)
    gpu = micro_cfg("run.workers=2", "run.cpus_per_worker=4", "run.gpus_per_worker=1")
    assert max_concurrent(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # GPUs bind first
    assert max_concurrent(micro_cfg("run.cpus_per_worker=0.5"), {"CPU": 2.0}) == 1


def test_configurations_report_mean_and_spread_over_completed_seeds():
    def trial(name, lr, seed, value, reason=COMPLETED):
        return TrialResult(name, reason, 8, value, {"optim.lr": lr, "run.seed": seed}, name)

    trials = [trial("a0", 1e-4, 0, 0.50), trial("a1", 1e-4, 1, 0.70), trial("b0", 1e-3, 0, 0.65),
              trial("b1", 1e-3, 1, 0.20, STOPPED), trial("c0", 1e-2, 0, math.nan, FAILED)]
    configs = by_config(trials, ["optim.lr", "run.seed"], "max")
    assert [c.params for c in configs] == [{"optim.lr": 1e-3}, {"optim.lr": 1e-4}, {"optim.lr": 1e-2}]
    assert configs[0].values == [0.65] and configs[0].trials == 2  # the stopped seed does not count
    assert configs[1].mean == pytest.approx(0.60) and configs[1].std == pytest.approx(0.1414, abs=1e-4)
    assert math.isnan(configs[2].mean)
    assert [c.params["optim.lr"] for c in by_config(trials, ["optim.lr", "run.seed"], "min")] == [1e-4, 1e-3, 1e-2]
