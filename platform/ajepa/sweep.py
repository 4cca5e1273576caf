"""Ray Tune sweeps over pretraining or fine-tuning: a search space file (search_space.py), one ordinary run per
trial, ASHA on an objective the runs report, and one MLflow parent run with a child run per trial.

A sweep runs num_samples x (product of the grid sizes) x seeds trials. Random values are drawn first and held
over the grid and the seeds (Tune's `constant_grid_search`), so the trials of one sample differ only in their grid
values and seed, and `--seeds K` repeats each configuration with K seeds (run.seed, run.seed + 1, ...).

Ray 2.60 (design.md): a trial is a Tune function trainable that runs the job (`run_pretrain`, `run_finetune`),
whose TorchTrainer is named after the trial and reports to Tune through `TuneReportCallback` in its Train
RunConfig. Tune does not reserve the Train workers' resources, so `max_concurrent_trials` comes from the
cluster's. A trial ASHA stops is killed, so its MLflow child run is ended by `TrialEnds`, a callback in the driver.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
import pickle
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import AsyncHyperBandScheduler

from ajepa import storage, tracking
from ajepa.config import Config, ConfigError
from ajepa.search_space import SEED_KEY, SearchSpace, load_space, with_params
from ajepa.storage import Location
from ajepa.train import runs

# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Job:
    """What a sweep needs to know of a job: its steps, its default objective, and where that comes from."""

    steps_key: str  # every trial's steps (--steps), ASHA's max_t
    objective: str  # the default objective (mode max)
    eval_prefix: str  # objective names the loop reports every eval interval ...
    eval_key: str  # ... set by this key; any other metric comes every run.log_every steps


JOBS = {"pretrain": Job(runs.STEPS_KEY["pretrain"], "probe/linear_val_acc", "probe/", "eval.every"),
        "finetune": Job(runs.STEPS_KEY["finetune"], "val/acc", "val/", "finetune.eval_every")}
SCHEDULERS = ("asha", "fifo")
ASHA_REDUCTION = 2  # ASHA keeps the better half of the trials at each rung (rungs at grace x 2^k steps)


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@dataclass(frozen=True)
class SweepSettings:
    """How a sweep runs, besides its base config and space; saved in the sweep's run.json for --resume."""

    job: str = "pretrain"
    num_samples: int = 1
    seeds: int = 1
    scheduler: str = "asha"
    max_concurrent: int | None = None  # None: as many trials as the cluster's resources hold
    metric: str = ""  # the objective; "" takes the job's default
    mode: str = "max"
    checkpoint: str | None = None  # fine-tuning: the encoder every trial starts from

    def resolved(self) -> SweepSettings:
        if self.job not in JOBS:
            raise ConfigError(f"--job: must be one of {', '.join(JOBS)}, got {self.job!r}")
        return dataclasses.replace(self, metric=self.metric or JOBS[self.job].objective)

    def check(self, cfg: Config) -> None:
        job = JOBS[self.job]
        for flag, value in (("--num-samples", self.num_samples), ("--seeds", self.seeds),
                            ("--max-concurrent", self.max_concurrent or 1)):
            if value < 1:
                raise ConfigError(f"{flag}: must be >= 1, got {value}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler: must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"--mode: must be max or min, got {self.mode!r}")
        if cfg.run.workers < 1:
            raise ConfigError("run.workers: a trial reports to Tune through Ray Train's callbacks, which an "
                              "in-process run (run.workers=0) does not call; use 1 or more")
        if self.metric.startswith(job.eval_prefix) and _get(cfg, job.eval_key) == 0:
            if self.job == "pretrain":
                raise ConfigError(f"eval.every: the objective {self.metric} comes from the online probe, which "
                                  "eval.every=0 turns off")
            if self.scheduler == "asha":
                raise ConfigError(f"finetune.eval_every: ASHA needs the objective {self.metric} before the last "
                                  "step, but finetune.eval_every=0 scores val only at the end")
        if self.job == "finetune" and self.checkpoint is None:
            raise ConfigError("--checkpoint is required for --job finetune: a pretraining run, checkpoint or encoder "
                              "export, or none (the from-scratch baseline)")

    def objective_every(self, cfg: Config) -> int:
        """How often trials report the objective: ASHA's first rung."""
        job = JOBS[self.job]
        every = _get(cfg, job.eval_key) if self.metric.startswith(job.eval_prefix) else cfg.run.log_every
        return min(every or _get(cfg, job.steps_key), _get(cfg, job.steps_key))


TRIAL_DRIVER_CPUS = 0.1  # a trial's own process only waits on its Train run; Tune refuses a request of nothing
DATA_CPUS = 1.0  # left free for Ray Data's read and shuffle tasks, which take a whole CPU each


def max_concurrent(cfg: Config, resources: dict[str, float]) -> int:
    """How many trials the cluster holds at once. Tune does not reserve a trial's Train workers, so without
    this limit it starts trials whose workers then wait for resources that never come."""
    workers = max(cfg.run.workers, 1)
    fits = [(resources.get("CPU", 0.0) - DATA_CPUS) / (workers * cfg.run.cpus_per_worker + TRIAL_DRIVER_CPUS)]
    if cfg.run.gpus_per_worker > 0:
        fits.append(resources.get("GPU", 0.0) / (workers * cfg.run.gpus_per_worker))
    return max(1, math.floor(min(fits) + 1e-9))


# ------------------------------------------------------------------------------------------- the trials

SWEEP_TAG, TRIAL_TAG, STOP_TAG = "ajepa.sweep", "ajepa.trial", "ajepa.stop_reason"
# The step and objective of the trial's last report as Tune saw it: a stopped trial's workers may log a step
# or two more before they die with it.
STEP_TAG, OBJECTIVE_TAG = "ajepa.last_step", "ajepa.last_objective"
COMPLETED, STOPPED, FAILED, INTERRUPTED = "completed", "stopped early by ASHA", "failed", "interrupted"
FINAL = (COMPLETED, STOPPED, FAILED)  # a trial with one of these is done; an interrupted one resumes
TUNE_DIR, SPACE_FILE = "tune", "space.yaml"  # in the sweep's folder, next to the trials' run folders
NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares, shipped to the trials' processes."""

    job: str
    config: dict[str, Any]  # the base config (Config.to_dict()), run.out_dir the sweep's folder
    store: str
    checkpoint: str | None
    tracking_uri: str
    parent_run_id: str
    sweep: str
    metric: str


def trial_name(trial: Any) -> str:
    """Tune's trial id (unique in the sweep, kept on --resume) names the trial, its Train run and its MLflow run."""
    return f"trial_{trial.trial_id}"


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """One trial, in its Tune actor: the job's own run with the base config and this trial's params. A trial that
    Tune starts again (the sweep was interrupted and resumed) continues its run from the last checkpoint."""
    name = tune.get_context().get_trial_name()
    cfg = with_params({**setup.config, "run": {**setup.config["run"], "name": name}}, params, f"trial {name}")
    resume = name if (storage.resolve(cfg.run.out_dir) / name / runs.RUN_FILE).exists() else None
    trial = runs.SweepTrial(setup.tracking_uri, setup.parent_run_id, {SWEEP_TAG: setup.sweep, TRIAL_TAG: name},
                            [ObjectiveReport(setup.metric)])
    if setup.job == "pretrain":
        from ajepa.train.pretrain import run_pretrain

        run_pretrain(cfg, store=setup.store, resume=resume, trial=trial)
    else:
        from ajepa.train.finetune import run_finetune

        run_finetune(cfg, setup.checkpoint, store=setup.store, resume=resume, trial=trial)


class ObjectiveReport(TuneReportCallback):
    """Tune's report callback for a trial's Train run, passing on only the reports that carry the objective:
    the loops probe every eval interval but report every log interval, and Tune refuses a result without the
    metric its scheduler ranks by."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if self.metric in metrics[0]:  # rank 0's metrics: the only rank that probes
            super().after_report(run_context, metrics, checkpoint)


class FinishingASHA(AsyncHyperBandScheduler):
    """ASHA on `step` that lets a trial which has trained all its steps finish: stopping it at its last report
    would kill it before it writes its export, and save nothing."""

    def __init__(self, metric: str, mode: str, max_t: int, grace_period: int):
        super().__init__(time_attr="step", metric=metric, mode=mode, max_t=max_t, grace_period=grace_period,
                         reduction_factor=ASHA_REDUCTION, stop_last_trials=False)
        self.last_step = max_t

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result.get("step", 0) >= self.last_step:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class SchedulerState(tune.Callback):
    """Carries the scheduler's state through --resume. Tune saves its searcher and its callbacks with the
    experiment, not its scheduler: a resumed ASHA would start with empty rungs and let every trial pass the rungs
    that the trials before the interruption set. Tune pickles the Tuner with its scheduler and callbacks together,
    so a restored one of these still holds the restored scheduler, and gives it back the rungs it saved."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def get_state(self) -> dict[str, Any]:
        return {"scheduler": pickle.dumps(self.scheduler.__dict__)}  # what the scheduler's own save() writes

    def set_state(self, state: dict[str, Any]) -> None:
        self.scheduler.__dict__.update(pickle.loads(state["scheduler"]))


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_text(v)}" for k, v in params.items())


def _text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class TrialEnds(tune.Callback):
    """Driver side: prints each trial's reports and its end, and ends its MLflow child run with the stop reason
    (tag ajepa.stop_reason): completed; stopped early by ASHA (KILLED: Tune killed the trial's process, so its own
    code never ended the run); failed (FAILED; a trial that failed before its run began gets one, so every trial
    is listed); interrupted (KILLED until --resume continues it)."""

    def __init__(self, setup: TrialSetup, experiment: str, total_steps: int):
        # `trial_setup`: tune.Callback has a method called `setup`
        self.trial_setup, self.experiment, self.total = setup, experiment, total_steps
        self.started: set[str] = set()
        self.ended: set[str] = set()
        self.stopped: set[str] = set()  # by the scheduler

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.started.add(trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        # Tune marks `done` the result on which the scheduler stops a trial. A trial that ends by itself never
        # has one here: Tune's closing copy of its last result skips the callbacks.
        if result.get("done"):
            self.stopped.add(trial.trial_id)
        print(f"{trial}: step {result.get('step')}/{self.total}, {self.trial_setup.metric} "
              f"{_text(result.get(self.trial_setup.metric))}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if trial.trial_id in self.stopped:
            self._end(trial, STOPPED, "KILLED")
        else:
            self._end(trial, COMPLETED, None)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._end(trial, FAILED, "FAILED")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        for trial in trials:  # the sweep was interrupted while these ran
            if trial.trial_id in self.started and trial.trial_id not in self.ended:
                self._end(trial, INTERRUPTED, "KILLED")

    def _end(self, trial: Any, reason: str, status: tracking.Status | None) -> None:
        self.ended.add(trial.trial_id)
        setup = self.trial_setup
        name, uri, parent = str(trial), setup.tracking_uri, setup.parent_run_id
        found = tracking.child_runs(uri, parent, {TRIAL_TAG: name})
        error = _error(trial) if reason == FAILED else ""
        if found:
            tracker = tracking.Tracker(uri, found[-1].run_id)
        elif reason == FAILED:
            tracker = tracking.Tracker.start(uri, self.experiment, name, parent_run_id=parent, tags={
                "ajepa.job": setup.job, SWEEP_TAG: setup.sweep, TRIAL_TAG: name})
            tracker.log_params(trial.config)
        else:
            return  # interrupted before its run began: --resume starts it afresh
        last = trial.last_result or {}
        reported = "step" in last  # a trial interrupted or failed before its first report has no result
        seen = {STEP_TAG: last["step"], OBJECTIVE_TAG: last.get(setup.metric, math.nan)} if reported else {}
        tracker.set_tags({STOP_TAG: reason, **seen, **({"ajepa.error": error} if error else {})})
        if status is not None:
            tracker.finish(status)
        where = (f": {error}" if reason == FAILED else
                 f" at step {last['step']}/{self.total}, {setup.metric} {_text(last.get(setup.metric))}" if reported
                 else " before its first report")
        print(f"{name} ({_params_text(trial.config)}): {reason}{where}", flush=True)


def _error(trial: Any) -> str:
    """The last line of a failed trial's error (the exception). Tune writes it to the trial's local folder before
    it calls the callbacks; its copy in the sweep's storage comes later."""
    path = Path(trial.error_file) if trial.error_file else None
    lines = path.read_text().strip().splitlines() if path and path.exists() else []
    return lines[-1] if lines else "unknown error"


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TrialResult:
    name: str
    reason: str  # a stop reason, or "running" for a trial never ended
    step: int | None  # the last step it reported
    objective: float  # its last value of the objective (nan: never reported)
    params: dict[str, Any]  # the swept keys' values, run.seed included
    mlflow_run_id: str


@dataclass(frozen=True)
class ConfigResult:
    """One configuration over its seeds: the objective of its completed trials."""

    params: dict[str, Any]  # the swept keys but run.seed
    trials: int
    values: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else math.nan


def _param_value(text: str) -> Any:
    """A logged param back to its value: YAML, and numbers YAML 1.1 reads as strings (1e-05)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def trial_results(uri: str, parent_run_id: str, keys: list[str], metric: str) -> list[TrialResult]:
    """Every trial of a sweep, from its MLflow child runs: the record that survives an interrupted sweep."""
    found = []
    for run in tracking.child_runs(uri, parent_run_id):
        step = run.tags.get(STEP_TAG, run.metrics.get("step"))
        objective = float(run.tags.get(OBJECTIVE_TAG, run.metrics.get(metric, math.nan)))
        params = {k: _param_value(run.params[k]) for k in keys if k in run.params}
        found.append(TrialResult(run.name, run.tags.get(STOP_TAG, "running"),
                                 None if step is None else int(float(step)), objective, params, run.run_id))
    return found


def by_config(trials: list[TrialResult], keys: list[str], mode: str) -> list[ConfigResult]:
    """Trials grouped by their configuration (all swept keys but run.seed), best mean first; a configuration's
    values are its completed trials' objectives."""
    groups: dict[str, tuple[dict[str, Any], list[TrialResult]]] = {}
    for t in trials:
        params = {k: t.params.get(k) for k in keys if k != SEED_KEY}
        groups.setdefault(repr(params), (params, []))[1].append(t)
    configs = [ConfigResult(params, len(members), [t.objective for t in members
                                                   if t.reason == COMPLETED and math.isfinite(t.objective)])
               for params, members in groups.values()]
    sign = -1 if mode == "max" else 1
    return sorted(configs, key=lambda c: (not c.values, sign * c.mean if c.values else 0.0))


def best_trial(trials: list[TrialResult], mode: str) -> TrialResult | None:
    done = [t for t in trials if t.reason == COMPLETED and math.isfinite(t.objective)]
    return (max if mode == "max" else min)(done, key=lambda t: t.objective) if done else None


def write_results(trials: list[TrialResult], configs: list[ConfigResult], keys: list[str], metric: str,
                  results: Path, summary: Path) -> None:
    """results.csv (one row per trial) and configs.csv (per configuration: mean, std, min, max over seeds)."""
    with results.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["trial", *keys, "stop_reason", "step", metric, "mlflow_run_id"])
        for t in trials:
            out.writerow([t.name, *(t.params.get(k) for k in keys), t.reason, t.step, t.objective, t.mlflow_run_id])
    config_keys = [k for k in keys if k != SEED_KEY]
    with summary.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow([*config_keys, "trials", "completed", f"{metric} mean", "std", "min", "max"])
        for c in configs:
            spread = [min(c.values), max(c.values)] if c.values else ["", ""]
            out.writerow([*(c.params[k] for k in config_keys), c.trials, len(c.values), c.mean, c.std, *spread])


def format_configs(configs: list[ConfigResult], metric: str) -> str:
    """The configurations, best first: the objective's mean, std and range over the completed seeds."""
    lines = [f"{'configuration':<48} completed  {metric + ' mean':>22}  {'std':>7}  range"]
    for c in configs:
        spread = f"{_text(min(c.values))} - {_text(max(c.values))}" if c.values else "-"
        lines.append(f"{_params_text(c.params) or '(base config)':<48} {len(c.values):>4}/{c.trials:<4} "
                     f"{_text(c.mean):>22}  {_text(c.std) if len(c.values) > 1 else '-':>7}  {spread}")
    return "\n".join(lines)


def plot_results(trials: list[TrialResult], space: SearchSpace, metric: str, path: Path) -> Path:
    """The objective of every trial against each swept key: completed trials filled, stopped ones hollow."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    params = list(space.params)
    fig = Figure(figsize=(4.0 * len(params), 3.4), layout="constrained")
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    for ax, param in zip(axes, params, strict=True):
        labels = [] if param.numeric else [str(a) for a in param.args]
        for reason, style in ((COMPLETED, {"color": "C0"}), (STOPPED, {"facecolors": "none", "edgecolors": "C1"})):
            shown = [t for t in trials if t.reason == reason and param.key in t.params]
            x = [t.params[param.key] if param.numeric else labels.index(str(t.params[param.key])) for t in shown]
            ax.scatter(x, [t.objective for t in shown], label=reason, **style)
        if param.kind == "loguniform":
            ax.set_xscale("log")
        if labels:
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel(param.key)
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{metric} of each trial (its last report)")
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------------------------- the driver


@dataclass
class SweepResult:
    name: str
    run_dir: Location
    trials: list[TrialResult]
    configs: list[ConfigResult]  # best first
    best: TrialResult | None  # the best completed trial
    table: str
    results: Location  # results.csv
    mlflow_run_id: str
    tracking_uri: str


def _encoder_file(cfg: Config, settings: SweepSettings) -> str | None:
    """A fine-tuning sweep's encoder, checked once and resolved to the file it was read from, which every trial
    starts from (a run's newest checkpoint now, even while that run trains on)."""
    if settings.job == "pretrain":
        return None
    from ajepa.train.finetune import pretrained_encoder

    return pretrained_encoder(cfg, settings.checkpoint)[2]


def _job_check(job: str, store: Location, stats: dict[str, Any]) -> Callable[[Config], None]:
    """The job's own checks of a config against the store, run on the base config and on every value of the
    space before any trial starts."""
    if job == "pretrain":
        from ajepa.masking import validate_masks
        from ajepa.train.pretrain import patch_grid

        def check(c: Config) -> None:
            validate_masks(c.mask, patch_grid(c))
            runs.check_store(c, stats, store, c.run.workers)

        return check
    from ajepa.train.finetune import task_of

    def check(c: Config) -> None:
        runs.check_store(c, stats, store, c.run.workers)
        task_of(c, store)

    return check


def _tuner(plan: runs.RunPlan, space: SearchSpace, settings: SweepSettings, setup: TrialSetup, seeds: list[int],
           concurrent: int) -> tune.Tuner:
    """A new Tuner, or with --resume the sweep's own, restored: its finished trials stay finished, the ones it
    was running start again (and continue their runs), and its sampler draws the trials it had not begun."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_DRIVER_CPUS})
    storage_path, filesystem = plan.run_dir.ray_storage()  # Tune's results beside the sweep's, in any storage
    tune_dir = (plan.run_dir / TUNE_DIR).path
    if plan.resumed and tune.Tuner.can_restore(tune_dir, storage_filesystem=filesystem):
        return tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False, storage_filesystem=filesystem)
    cfg = plan.cfg
    steps = _get(cfg, JOBS[settings.job].steps_key)
    scheduler = (FinishingASHA(settings.metric, settings.mode, steps, settings.objective_every(cfg))
                 if settings.scheduler == "asha" else None)
    return tune.Tuner(
        trainable,
        param_space=space.param_space(seeds),
        tune_config=tune.TuneConfig(
            num_samples=settings.num_samples, scheduler=scheduler,
            # Tune applies max_concurrent_trials to a Searcher only: this sampler takes its own limit.
            search_alg=BasicVariantGenerator(max_concurrent=concurrent, constant_grid_search=True,
                                             random_state=cfg.run.seed),
            reuse_actors=False,  # a fresh process per trial: a stopped trial's Train run dies with its process
            trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=storage_path, storage_filesystem=filesystem, verbose=0,
                                  callbacks=[TrialEnds(setup, cfg.run.experiment, steps),
                                             *([SchedulerState(scheduler)] if scheduler else [])],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


@contextlib.contextmanager
def _tune_output() -> Iterator[None]:
    """Tune's own console output off unless --verbose: the sweep prints a line per trial report and end. Its
    newer reporter prints an experiment table and TensorBoard hints at any verbosity; the older one, chosen by
    RAY_AIR_NEW_OUTPUT=0 (read when fit() starts), prints nothing at verbose=0."""
    from ajepa.runtime import verbose

    saved = os.environ.get(NEW_OUTPUT_ENV)
    tune_log = logging.getLogger("ray.tune.tune")
    if not verbose():
        os.environ[NEW_OUTPUT_ENV] = "0"
    tune_log.addFilter(_not_tunes_resume_hint)
    try:
        yield
    finally:
        tune_log.removeFilter(_not_tunes_resume_hint)
        if saved is None:
            os.environ.pop(NEW_OUTPUT_ENV, None)
        else:
            os.environ[NEW_OUTPUT_ENV] = saved


def _not_tunes_resume_hint(record: logging.LogRecord) -> bool:
    """Drops Tune's "resume with Tuner.restore(...)" after a Ctrl-C: the sweep prints its own --resume command."""
    return not record.getMessage().startswith("Experiment has been interrupted")


def resumed_settings(cfg: Config, resume: str) -> SweepSettings:
    """The saved settings of the sweep that `resume` names (a folder, or a name under cfg's run.out_dir)."""
    out, name = runs.resolve_resume(resume, storage.resolve(cfg.run.out_dir))
    return _settings_of(runs.read_run_file(out / name / runs.RUN_FILE), out / name / runs.RUN_FILE)


def _settings_of(record: dict[str, Any], run_file: Location) -> SweepSettings:
    try:
        return SweepSettings(**record["sweep"])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{run_file}: not a sweep's run record ({type(exc).__name__}: {exc}); a pretraining or "
                          "fine-tuning run resumes with its own job's --resume") from None


def _check_kept(plan: runs.RunPlan, saved: SweepSettings, settings: SweepSettings, given: Collection[str],
                space_file: str | Path | None) -> None:
    """A resumed sweep runs with the settings and space it started with: the ones `given` again (the flags the
    user typed) must name the same, or the resume is refused rather than going on with others than asked for."""
    asked = {name: getattr(settings, name) for name in given}
    if asked.get("checkpoint") is not None:  # recorded as the file it resolved to when the sweep started
        from ajepa.train.finetune import recorded_checkpoint

        asked["checkpoint"] = recorded_checkpoint(asked["checkpoint"])
    kept = dataclasses.replace(saved, **asked).resolved()  # an empty --metric is the job's default, as it was
    for name in asked:
        if getattr(kept, name) != getattr(saved, name):
            raise ConfigError(f"--resume {plan.name}: --{name.replace('_', '-')} {getattr(settings, name)} is not "
                              f"the sweep's ({getattr(saved, name)}): a resumed sweep keeps the settings it started "
                              "with; start a new sweep for others")
    if space_file is None:
        return
    copy = plan.run_dir / SPACE_FILE
    try:
        same = Path(space_file).read_bytes() == copy.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{exc.filename}: cannot read search space ({exc.strerror})") from None
    if not same:
        raise ConfigError(f"--resume {plan.name}: --space {space_file} is not the space the sweep started with "
                          f"(its copy: {copy}); start a new sweep for another")


def run_sweep(cfg: Config, space_file: str | Path | Location | None, settings: SweepSettings, *,
              store: str | Path | Location | None = None, resume: str | None = None, overrides: list[str] = (),
              given: Collection[str] = ()) -> SweepResult:
    """Run a sweep, or with `resume` (its name under run.out_dir, or its folder) continue one: its settings and
    space are the saved ones; `given` names the `settings` fields the user set, which a resume checks against the
    saved ones, as it does `space_file`. The settings, the space and each of its values are checked before Ray
    starts, then that the cluster has room for a trial."""
    import ray

    from ajepa import data

    plan = runs.plan_run("sweep", cfg, resume, overrides)
    cfg = plan.cfg
    if plan.resumed:
        saved = _settings_of(plan.record, plan.run_dir / runs.RUN_FILE)
        _check_kept(plan, saved, settings, given, space_file)
        settings, space_file, store = saved, plan.run_dir / SPACE_FILE, runs.resumed_store(plan, store)
    if space_file is None:
        raise ConfigError("--space is required: a search space file (see search_spaces/)")
    settings = settings.resolved()
    settings.check(cfg)
    # A resumed sweep reads the copy in its run folder (a local path or a URI); a new one the user's local file.
    space_copy = space_file.local_copy() if isinstance(space_file, Location) else contextlib.nullcontext(space_file)
    with space_copy as local_space:
        space = load_space(local_space, cfg, settings.seeds)
    checkpoint = _encoder_file(cfg, settings)  # before a demo store is built (minutes, the first time)
    if plan.resumed:  # its trials continue with the encoder they started from, as the sweep recorded it
        checkpoint = settings.checkpoint
    store = runs.resolve_store(cfg, store)
    stats = data.read_stats(store)
    check = _job_check(settings.job, store, stats)
    check(cfg)
    space.check(cfg, check)
    seeds = [cfg.run.seed + i for i in range(settings.seeds)]
    keys = space.keys + ([SEED_KEY] if len(seeds) > 1 else [])
    total = settings.num_samples * space.grid_size() * len(seeds)

    # The parent run: the base config, with each swept key's distribution in place of its base value.
    params = {**{p.key: p.describe() for p in space.params}, "sweep.space": str(space_file), "sweep.trials": total,
              **{f"sweep.{k}": v for k, v in dataclasses.asdict(settings).items() if k != "checkpoint"}}
    if len(seeds) > 1:
        params[SEED_KEY] = f"grid{seeds}"
    record = {"sweep": dataclasses.asdict(dataclasses.replace(settings, checkpoint=checkpoint)),
              "space_file": str(space_file)}
    runs.check_cluster_room(plan, TRIAL_DRIVER_CPUS)
    with runs.open_run(plan, store, params, record) as tracker:
        if not plan.resumed:
            with (plan.run_dir / SPACE_FILE).local_file() as saved:
                saved.write_bytes(Path(space_file).read_bytes())
                tracker.log_artifact(saved)
        concurrent = settings.max_concurrent or max_concurrent(cfg, ray.cluster_resources())
        print(f"sweep {plan.name}: {total} {settings.job} trials ({settings.num_samples} samples x {space.grid_size()} "
              f"grid x {len(seeds)} seeds), objective {settings.metric} ({settings.mode}), "
              f"{settings.scheduler.upper()}, up to {concurrent} at a time, data {store}", flush=True)
        base = cfg.to_dict()
        setup = TrialSetup(settings.job, {**base, "run": {**base["run"], "out_dir": str(plan.run_dir)}}, str(store),
                           checkpoint, tracker.uri, tracker.run_id, plan.name, settings.metric)
        with _tune_output():
            _tuner(plan, space, settings, setup, seeds, concurrent).fit()
        trials = trial_results(tracker.uri, tracker.run_id, keys, settings.metric)
        done = sum(t.reason in FINAL for t in trials)
        if done < total:  # Ctrl-C: Tune saved its state and returned
            print(f"sweep {plan.name} interrupted with {done} of {total} trials done; continue it with: "
                  f"ajepa sweep --resume {plan.name} --out {plan.out}", flush=True)
            raise KeyboardInterrupt
        return _report(plan, tracker, space, keys, settings, trials)


def _report(plan: runs.RunPlan, tracker: tracking.Tracker, space: SearchSpace, keys: list[str],
            settings: SweepSettings, trials: list[TrialResult]) -> SweepResult:
    """The results table, CSVs and plot, in the sweep's folder and on its parent run with the best trial."""
    configs = by_config(trials, keys, settings.mode)
    best = best_trial(trials, settings.mode)
    results = plan.run_dir / "results.csv"
    with results.local_file() as table, (plan.run_dir / "configs.csv").local_file() as summary, \
            (plan.run_dir / "params_vs_objective.png").local_file() as plot:
        write_results(trials, configs, keys, settings.metric, table, summary)
        plot_results(trials, space, settings.metric, plot)
        for path in (table, summary, plot):
            tracker.log_artifact(path)
    tracker.log_metrics({f"trials/{reason.split()[0]}": sum(t.reason == reason for t in trials) for reason in FINAL},
                        step=0)
    if best is not None:
        tracker.log_metrics({settings.metric: best.objective}, step=best.step or 0)
        tracker.set_tags({"ajepa.best_trial": best.name, "ajepa.best_config": _params_text(configs[0].params)})
    return SweepResult(plan.name, plan.run_dir, trials, configs, best, format_configs(configs, settings.metric),
                       results, tracker.run_id, tracker.uri)
