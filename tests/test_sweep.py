"""Sweeps: search space files checked before any trial (fast), how many trials fit the cluster, the results table;
then real Ray Tune sweeps of micro runs (slow): a 4-trial sweep in MLflow, an interrupted sweep resumed, and ASHA
stopping a trial of a fine-tuning sweep against the rungs from before an interruption."""

import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import mlflow_browser
import pytest
import ray
from ajepa import cli, data, storage, tracking
from ajepa.config import ConfigError, load_config
from ajepa.eval import EvalError, load_encoder
from ajepa.masking import validate_masks
from ajepa.search_space import load_space
from ajepa.sweep import (
    COMPLETED,
    FAILED,
    STOPPED,
    SweepSettings,
    TrialResult,
    by_config,
    max_concurrent,
    run_sweep,
)
from ajepa.train import runs
from ajepa.train.finetune import run_finetune
from ajepa.train.pretrain import patch_grid, run_pretrain
from conftest import micro_cfg, write_low_high_tones
from mlflow_browser import page_shows
from ray.util import placement_group_table

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
    (["eval.every=0"], {}, "eval.every: the objective probe/linear_val_acc comes from the online probe"),
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


# ------------------------------------------------------------------------------------------ real Ray Tune


@pytest.fixture(scope="module")
def tone_store(tmp_path_factory, ray_local):
    """32 labelled tones, low against high, in train, val and test: what the online probe needs, built in seconds."""
    root = tmp_path_factory.mktemp("sweep-data")
    rows = write_low_high_tones(root)
    (root / "manifest.csv").write_text("path,label,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows))
    audio = load_config(ROOT / "configs" / "tiny.yaml").audio
    return data.build_store(root / "manifest.csv", root / "store", audio).out


@pytest.mark.parametrize("job", ["pretrain", "finetune", "sweep"])
def test_workers_the_local_ray_cannot_hold_are_refused_before_anything_is_written(job, tmp_path, tone_store):
    # Train would wait for them for good, saying nothing. More GPUs than the machine has, whatever it has.
    gpus = ray.cluster_resources().get("GPU", 0.0)
    machine = f"2 CPUs and {gpus:g} GPU{'' if gpus == 1 else 's'}"
    cases = {"pretrain": (["run.workers=3"], f"run.workers: 3 workers x 1 CPU do not fit the local Ray (this machine: "
                                             f"{machine}), and Train would wait for them for good"),
             "finetune": ([f"run.gpus_per_worker={gpus + 1:g}"], f"run.gpus_per_worker: 1 worker x 1 CPU and "
                                                                 f"{gpus + 1:g} GPU do not fit the local Ray"),
             "sweep": (["run.workers=2"], "run.workers: 2 workers x 1 CPU (and 0.1 CPU for the trial's own process) "
                                          "do not fit the local Ray")}
    sets, message = cases[job]
    cfg = micro_cfg("run.cpus_per_worker=1", "data.batch_size=2", f"run.out_dir={tmp_path / 'runs'}", *sets)
    with pytest.raises(ConfigError, match=re.escape(message)):
        if job == "pretrain":
            run_pretrain(cfg, store=tone_store)
        elif job == "finetune":
            run_finetune(cfg, "none", store=tone_store)
        else:
            run_sweep(cfg, space_file(tmp_path, "optim.lr: {grid: [1.0e-4]}\n"), SweepSettings(), store=tone_store)
    assert not (tmp_path / "runs").exists()


def sweep_cfg(out: Path, *extra: str):
    # Batches of 2: the 16 training clips last 8 steps with no second epoch (a Ray Data shuffle, seconds).
    # A quarter CPU per worker: two trials fit the 2-CPU cluster at once, with a CPU left for Ray Data.
    return micro_cfg("data.batch_size=2", "run.cpus_per_worker=0.25", "run.torch_threads=1", "run.log_every=2",
                     "run.checkpoint_every=4", "optim.steps=8", "eval.every=4", "eval.max_clips=16",
                     f"run.out_dir={out}", *extra)


def space_file(folder: Path, text: str) -> Path:
    (folder / "space.yaml").write_text(text)
    return folder / "space.yaml"


def runs_of(uri: str, parent_id: str):
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_id)
    every = client.search_runs([parent.info.experiment_id], order_by=["attributes.start_time ASC"])
    return client, parent, [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent_id]


@pytest.fixture(scope="module")
def four_trials(tmp_path_factory, tone_store):
    """A grid of 2 schedules x 2 seeds, the lr drawn once and shared by the four (a paired comparison), ASHA on the
    online probe, two trials at a time: the sweep the browser test shows too."""
    out = tmp_path_factory.mktemp("sweep4")
    space = space_file(out, "mask.schedule: {grid: [rb, tf]}\noptim.lr: {loguniform: [1.0e-4, 1.0e-3]}\n")
    start = time.monotonic()
    result = run_sweep(sweep_cfg(out), space, SweepSettings(num_samples=1, seeds=2), store=tone_store)
    print(f"4-trial sweep: {time.monotonic() - start:.0f} s")
    return result


@pytest.mark.slow
def test_four_trial_sweep_is_a_parent_run_with_four_child_runs(four_trials):
    result = four_trials
    client, parent, children = runs_of(result.tracking_uri, result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ajepa.job"] == "sweep"
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    # max_concurrent_trials from the cluster's resources: (2 CPUs - 1 for Ray Data) / (0.25 + 0.1) = 2 at a time
    assert any(a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time
               for i, a in enumerate(children) for b in children[i + 1:]), "no two trials ran at once"
    assert {c.data.tags["ajepa.stop_reason"] for c in children} == {COMPLETED}
    # The swept keys are the children's params: each schedule with seeds 0 and 1, all with the one lr drawn.
    assert sorted((c.data.params["mask.schedule"], c.data.params["run.seed"]) for c in children) == [
        ("rb", "0"), ("rb", "1"), ("tf", "0"), ("tf", "1")]
    (lr,) = {c.data.params["optim.lr"] for c in children}
    assert 1e-4 <= float(lr) <= 1e-3
    for child in children:  # the objective is each child's metric, as its Train run logged it
        history = client.get_metric_history(child.info.run_id, "probe/linear_val_acc")
        assert sorted(m.step for m in history) == [4, 8] and all(0 <= m.value <= 1 for m in history)
        assert (result.run_dir / child.info.run_name / "encoder.safetensors").exists()  # the trial's run folder
    # The parent: each swept key's distribution where the children have values, the best trial, the results.
    assert parent.data.params["mask.schedule"] == "grid[rb, tf]"
    assert parent.data.params["optim.lr"] == "loguniform[0.0001, 0.001]"
    assert parent.data.params["run.seed"] == "grid[0, 1]"
    assert parent.data.params["sweep.metric"] == "probe/linear_val_acc" and parent.data.params["sweep.trials"] == "4"
    assert parent.data.metrics["trials/completed"] == 4 and parent.data.metrics["trials/stopped"] == 0
    best = max(children, key=lambda c: c.data.metrics["probe/linear_val_acc"])
    assert parent.data.metrics["probe/linear_val_acc"] == best.data.metrics["probe/linear_val_acc"]
    assert parent.data.tags["ajepa.best_trial"] in {c.info.run_name for c in children}
    assert {"space.yaml", "config.yaml", "results.csv", "configs.csv", "params_vs_objective.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert [sorted(c.params) for c in result.configs] == [["mask.schedule", "optim.lr"]] * 2
    assert all(len(c.values) == 2 for c in result.configs)  # each schedule's mean and spread over its two seeds
    assert len((result.run_dir / "results.csv").read_text().splitlines()) == 5
    with pytest.raises(EvalError, match=f"^{result.run_dir}: a sweep, whose trials are the runs: name one"):
        load_encoder(str(result.run_dir), result.run_dir.parent, "target")  # evaluate --checkpoint <sweep>


def test_a_trials_job_leaves_its_run_to_the_sweep_driver_on_error_and_a_plain_run_ends_failed(tmp_path):
    # Tune stops a trial by tearing its process down, which its job sees as an error: were the job to end its run
    # FAILED, that could land after the driver ended it KILLED (the race that made ASHA-stopped runs FAILED).
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = tracking.Tracker.start(uri, "sweeps", "sweep")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run.out_dir={tmp_path / 'runs'}"])
    trial = runs.SweepTrial(uri, parent.run_id, {"ajepa.trial": "t0"}, [])
    statuses = []
    for plan in (runs.plan_run("pretrain", cfg, None, [], trial), runs.plan_run("pretrain", cfg, None, [])):
        with pytest.raises(RuntimeError, match="torn down"):
            with runs.open_run(plan, storage.resolve(tmp_path / "store"), {}) as tracker:
                raise RuntimeError("torn down")
        statuses.append(mlflow.MlflowClient(plan.record["tracking_uri"]).get_run(tracker.run_id).info.status)
    assert statuses == ["RUNNING", "FAILED"]


@pytest.mark.slow
def test_a_failed_trial_gets_a_failed_child_run_with_its_error_and_the_sweep_goes_on(tmp_path, tone_store):
    # The online probe's store is not there: the trial stops before its run begins (a run is made for it).
    missing = tmp_path / "no-store"
    space = space_file(tmp_path, f"eval.store: {{choice: ['{missing}']}}\n")
    result = run_sweep(sweep_cfg(tmp_path), space, SweepSettings(), store=tone_store)
    (trial,) = result.trials
    assert trial.reason == FAILED and math.isnan(trial.objective) and result.best is None
    client, parent, (child,) = runs_of(result.tracking_uri, result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/failed"] == 1
    assert child.info.status == "FAILED" and child.data.tags["ajepa.stop_reason"] == FAILED
    assert child.data.params["eval.store"] == str(missing) and str(missing) in child.data.tags["ajepa.error"]


def interrupt_when(ready: Callable[[], bool]) -> threading.Thread:
    """Ctrl-C to this process once `ready()`, polled on a thread: Tune saves its state and stops the running trial."""

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not ready():
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, tone_store, capsys):
    space = space_file(tmp_path, "optim.lr: {grid: [1.0e-4, 3.0e-4]}\n")
    # Tune stops a running trial once its next report returns (the trial's actor is busy waiting for it; after 10 s
    # Tune kills it): the trial trains on until its next probe and a moment more. With 12 micro steps left after
    # its first checkpoint it ended before that; here, batches of 1 (~20 ms a step), probes every 32 steps and the
    # interruption at the first checkpoint (step 32): in runs here it ended before step 64, 192 steps (~5 s) short.
    cfg = sweep_cfg(tmp_path, "run.name=resumable", "data.batch_size=1", "optim.steps=256", "run.log_every=32",
                    "run.checkpoint_every=32", "eval.every=32")
    sweep_dir = tmp_path / "resumable"
    watcher = interrupt_when(lambda: any(sweep_dir.glob("trial_*_00001/step_00000032")))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, space, SweepSettings(scheduler="fifo", max_concurrent=1), store=tone_store)
    watcher.join()
    record = json.loads((sweep_dir / "run.json").read_text())
    uri, parent_id = record["tracking_uri"], record["mlflow_run_id"]
    client, parent, (first, second) = runs_of(uri, parent_id)
    assert parent.info.status == "KILLED" and first.info.status == "FINISHED" and second.info.status == "KILLED"
    assert second.data.tags["ajepa.stop_reason"] == "interrupted"
    saved = int(runs.local_checkpoints(sweep_dir / second.info.run_name)[-1].name.removeprefix("step_"))
    assert saved < 256, "the second trial trained to its end before the interruption landed"
    first_files = {p: p.stat().st_mtime for p in (sweep_dir / first.info.run_name).rglob("*")}

    # A resume runs with the sweep's own settings and space: flags that name others are refused before anything
    # runs or is written; the same ones typed again are fine (below).
    (tmp_path / "other").mkdir()
    other = space_file(tmp_path / "other", "optim.lr: {grid: [1.0e-3]}\n")
    record_text = (sweep_dir / "run.json").read_text()
    for flags, refusal in [
            (["--num-samples", "3"], "--num-samples 3 is not the sweep's (1): a resumed sweep keeps the settings it "
                                     "started with"),
            (["--scheduler", "fifo", "--mode", "min"], "--mode min is not the sweep's (max)"),
            (["--metric", "loss"], "--metric loss is not the sweep's (probe/linear_val_acc)"),
            (["--space", str(other)], f"--space {other} is not the space the sweep started with (its copy: "
                                      f"{sweep_dir / 'space.yaml'})"),
            # The trials that ran had the base config: a change would reach only the ones not started.
            (["--steps", "512", "--set", "mask.schedule=tf"], "mask.schedule curriculum -> tf; optim.steps 256 -> "
                                                               "512: a resumed sweep runs its trials with the config "
                                                               "it started with")]:
        assert cli.main(["sweep", "--resume", "resumable", "--out", str(tmp_path), *flags]) == 2
        assert capsys.readouterr().err.startswith(f"error: --resume resumable: {refusal}"), flags
    trial_run = sweep_dir / first.info.run_name
    assert cli.main(["sweep", "--resume", str(trial_run)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {trial_run / 'run.json'}: not a sweep's run record")
    assert (sweep_dir / "run.json").read_text() == record_text

    result = run_sweep(load_config(None, [f"run.out_dir={tmp_path}"]), space,
                       SweepSettings(scheduler="fifo", metric="probe/linear_val_acc"), resume="resumable",
                       given={"scheduler", "metric"})
    assert [t.reason for t in result.trials] == [COMPLETED, COMPLETED]
    client, parent, children = runs_of(uri, parent_id)
    assert parent.info.status == "FINISHED"
    assert [c.info.run_id for c in children] == [first.info.run_id, second.info.run_id], "no trial started anew"
    assert client.get_run(first.info.run_id).info.end_time == first.info.end_time, "the finished trial did not run"
    assert {p: p.stat().st_mtime for p in (sweep_dir / first.info.run_name).rglob("*")} == first_files
    losses = sorted(m.step for m in client.get_metric_history(second.info.run_id, "loss"))
    # Steps up to its checkpoint were trained once (those after it were trained again, from the checkpoint).
    assert set(losses) == set(range(32, 257, 32)) and all(losses.count(s) == 1 for s in range(32, saved + 1, 32))
    assert children[1].info.status == "FINISHED" and children[1].data.tags["ajepa.stop_reason"] == COMPLETED


@pytest.mark.slow
def test_asha_stops_the_trial_that_falls_behind_also_against_the_rungs_from_before_an_interruption(
        tmp_path, tone_store, capsys):
    # Designed: a fine-tuning sweep from scratch whose objective is the reported lr, minimised, one trial at a time
    # in grid order, so the second (10x the lr) is below the first at the first rung (step 2). Interrupted once the
    # first trial has completed and the second has begun, before the second's first rung. Resumed, the second meets
    # the first's value at that rung and ASHA stops it there (with empty rungs it would run to the end).
    space = space_file(tmp_path, "finetune.lr: {grid: [1.0e-4, 1.0e-3]}\n")
    sweep_dir = tmp_path / "rungs"
    watcher = interrupt_when(lambda: any(sweep_dir.glob("trial_*_00001")))
    with pytest.raises(KeyboardInterrupt):
        # Checkpoints at the end only: a second trial that trained past step 4 before the Ctrl-C landed (seen in CI)
        # would otherwise resume from step 4's checkpoint and report its first rung's step never.
        run_sweep(sweep_cfg(tmp_path, "run.name=rungs", "finetune.steps=8", "finetune.eval_every=0",
                            "run.checkpoint_every=8"), space,
                  SweepSettings(job="finetune", checkpoint="none", metric="lr", mode="min", max_concurrent=1),
                  store=tone_store)
    watcher.join()
    record = json.loads((sweep_dir / "run.json").read_text())
    client, parent, (first, *second) = runs_of(record["tracking_uri"], record["mlflow_run_id"])
    assert first.info.status == "FINISHED" and first.data.tags["ajepa.last_step"] == "8"
    assert first.data.tags["ajepa.job"] == "finetune" and first.data.params["finetune.lr"] == "0.0001"
    assert (sweep_dir / first.info.run_name / "model.safetensors").exists(), "the finished trial's classifier"
    assert all("ajepa.last_step" not in run.data.tags for run in second), "interrupted before its first report"

    # --steps on a resume is the steps of the sweep's job (here finetune.steps), and a change is refused.
    assert cli.main(["sweep", "--resume", "rungs", "--out", str(tmp_path), "--steps", "16"]) == 2
    assert capsys.readouterr().err.startswith("error: --resume rungs: finetune.steps 8 -> 16: a resumed sweep")

    earlier = set(placement_group_table())
    result = run_sweep(load_config(None, [f"run.out_dir={tmp_path}"]), None, SweepSettings(), resume="rungs")
    first, second = result.trials
    assert (first.reason, first.step) == (COMPLETED, 8) and (second.reason, second.step) == (STOPPED, 2)
    client, parent, (done, stopped) = runs_of(result.tracking_uri, result.mlflow_run_id)
    assert done.info.status == "FINISHED" and done.data.tags["ajepa.stop_reason"] == COMPLETED
    assert stopped.info.status == "KILLED", "ASHA killed the trial; the driver ended its run"
    assert stopped.data.tags["ajepa.stop_reason"] == STOPPED and stopped.data.tags["ajepa.last_step"] == "2"
    assert not (sweep_dir / stopped.info.run_name / "model.safetensors").exists()
    assert parent.data.metrics["trials/stopped"] == 1 and parent.data.tags["ajepa.best_trial"] == done.info.run_name
    # The killed trial's Train workers leave nothing reserved: Ray Train's cleaner removes their placement group
    # (it finds the cluster through runtime.init_ray's API server address, also with other Ray instances here).
    # Only the groups made since the resume: a Ctrl-C while a trial's Train run starts can leave that run's group
    # behind (Ray Train tells its cleaner of the group only after making it; a Ray race, seen here).
    deadline = time.monotonic() + 60
    while (left := [pg for pg, info in placement_group_table().items()
                    if pg not in earlier and info["state"] != "REMOVED"]) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left


# ------------------------------------------------------------------------------------ the MLflow UI, in a browser

@pytest.fixture
def mlflow_ui(four_trials, tmp_path):
    """`mlflow server` on 127.0.0.1 over the 4-trial sweep's store: its base URL."""
    with mlflow_browser.mlflow_server(four_trials.tracking_uri, tmp_path / "server.log") as url:
        yield url


@pytest.fixture
def browser():
    with mlflow_browser.chromium() as driver:
        yield driver


@pytest.mark.slow
def test_mlflow_ui_lists_the_sweep_with_its_trials_and_their_swept_params(four_trials, mlflow_ui, browser, tmp_path):
    # Screenshots for the README: AJEPA_SCREENSHOTS=docs pytest -k mlflow_ui
    shots = Path(os.environ.get("AJEPA_SCREENSHOTS", tmp_path))
    client, parent, children = runs_of(four_trials.tracking_uri, four_trials.mlflow_run_id)
    experiment = parent.info.experiment_id
    names = [c.info.run_name for c in children]

    browser.get(f"{mlflow_ui}/#/experiments/{experiment}/runs")
    page_shows(browser, parent.info.run_name, "5 matching runs")
    # A sweep is one row until it is expanded: its trials are nested under it.
    assert not any(name in page_shows(browser, parent.info.run_name) for name in names)
    mlflow_browser.show_sweep_runs(browser, mlflow_ui, experiment, parent.info.run_name, names)
    browser.save_screenshot(str(shots / "mlflow-sweep-runs.png"))

    # Side by side: the parent's distributions next to each trial's values, and the objective.
    ids = [parent.info.run_id, *(c.info.run_id for c in children)]
    mlflow_browser.show_compare(browser, mlflow_ui, experiment, ids, "mask.schedule", "probe/linear_val_acc", *names)
    table = mlflow_browser.compare_table(browser)
    column = {name: i for i, name in enumerate(table["Run Name:"])}
    for run in (parent, *children):
        for key in ("mask.schedule", "optim.lr", "run.seed"):
            assert table[key][column[run.info.run_name]] == run.data.params[key], (key, run.info.run_name)
    assert table["mask.schedule"][column[parent.info.run_name]] == "grid[rb, tf]"
    mlflow_browser.show_diff_only(browser, "mask.schedule")
    page_shows(browser, "grid[0, 1]")
    browser.save_screenshot(str(shots / "mlflow-sweep-compare.png"))
