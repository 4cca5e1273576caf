"""Pretraining: the optimizer step without Ray (fast), then real Ray Train runs with faults and resume (slow)."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import torch
from ajepa import data, order, storage
from ajepa.config import ConfigError, load_config
from ajepa.hear import load_model
from ajepa.models.flops import flops_split, peak_bf16_flops
from ajepa.models.vit import VisionTransformer
from ajepa.train import pretrain, runs
from ajepa.train.pretrain import CheckpointError, Pretrainer, export_encoder, load_checkpoint
from conftest import MICRO, fake_batch, micro_cfg, run_in_terminal
from ray.util.state import list_actors
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
def params(trainer: Pretrainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_loss_falls_and_schedules_follow_the_step():
    torch.manual_seed(0)
    trainer = Pretrainer(micro_cfg(), mean=-8.0, std=4.0, device=torch.device("cpu"))
    batch = fake_batch(0)
    losses = []
    for _ in range(40):
        trainer.train_step([batch])
        losses.append(trainer.metrics()["loss"])
    assert trainer.step == 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    expected_lr = pretrain.schedules.learning_rate(39, trainer.cfg.optim)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr)


@pytest.mark.parametrize("option", ["mask.pad_context=true", "mask.tf_stripes=block", "mask.block_geometry=absolute"])
def test_the_masking_options_train(option):
    """Each ablation option of the masks goes through the whole step: plan, prefetch-ready batch, model, loss."""
    torch.manual_seed(0)
    trainer = Pretrainer(micro_cfg(option, "mask.schedule=mixture"), mean=-8.0, std=4.0, device=torch.device("cpu"))
    padded = trainer.plan(0, [fake_batch(0)])[0].context_pad
    assert (padded is not None) == (option == "mask.pad_context=true")
    losses = []
    for _ in range(20):
        info = trainer.train_step([fake_batch(0)])
        losses.append(trainer.metrics()["loss"])
        assert 0 < info["context_fraction"] < 1
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    """Same step, same schedules, same masks and augmentation: bit-identical weights to an unbroken run."""
    batches = [fake_batch(i) for i in range(6)]
    straight = Pretrainer(micro_cfg(), -8.0, 4.0, torch.device("cpu"))
    for i in range(6):
        straight.train_step([batches[i]])

    first = Pretrainer(micro_cfg(), -8.0, 4.0, torch.device("cpu"))
    for i in range(3):
        first.train_step([batches[i]])
    first.save(tmp_path / "ckpt.pt")
    resumed = Pretrainer(micro_cfg(), -8.0, 4.0, torch.device("cpu"))
    resumed.load(tmp_path / "ckpt.pt")
    assert resumed.step == 3
    for i in range(3, 6):
        resumed.train_step([batches[i]])
    assert torch.equal(params(resumed), params(straight))


def test_restore_takes_the_newest_complete_checkpoint_of_the_run_folder(tmp_path):
    import ray.train

    trainer = Pretrainer(micro_cfg(), -8.0, 4.0, torch.device("cpu"))
    for step in (1, 2, 3):
        trainer.train_step([fake_batch(step)])
        (tmp_path / "run" / f"step_{step:08d}").mkdir(parents=True)
        trainer.save(tmp_path / "run" / f"step_{step:08d}" / pretrain.CHECKPOINT_FILE)
    newest = tmp_path / "run" / "step_00000003" / pretrain.CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:1000])  # the worker died while writing it
    restored = Pretrainer(micro_cfg(), -8.0, 4.0, torch.device("cpu"))
    pretrain.restore(restored, tmp_path / "run", None)
    assert restored.step == 2
    # No run folder on this node (storage elsewhere): Ray's registered checkpoint.
    fresh = Pretrainer(micro_cfg(), -8.0, 4.0, torch.device("cpu"))
    pretrain.restore(fresh, tmp_path / "elsewhere",
                     ray.train.Checkpoint.from_directory(str(tmp_path / "run" / "step_00000001")))
    assert fresh.step == 1


def test_an_upload_cut_short_leaves_no_checkpoint_for_restore(tmp_path, monkeypatch):
    """publish_checkpoint, the upload that runs while training goes on, writes each file whole: a worker killed
    in the middle (here: before the rename) leaves a hidden partial file, which restore passes over."""
    import ray.train

    run = storage.resolve(tmp_path / "run")
    (run / pretrain.RUN_FILE).write_text("{}")
    trainer = Pretrainer(micro_cfg(), -8.0, 4.0, torch.device("cpu"))

    def written(step: int) -> ray.train.Checkpoint:  # what report() hands to Ray: the state in a folder of its own
        trainer.train_step([fake_batch(step)])
        (tmp_path / f"local{step}").mkdir()
        trainer.save(tmp_path / f"local{step}" / pretrain.CHECKPOINT_FILE)
        return ray.train.Checkpoint.from_directory(str(tmp_path / f"local{step}"))

    published = runs.publish_checkpoint(run, written(1), "step_00000001")
    assert published.path == str(run / "step_00000001")
    assert not (tmp_path / "local1").exists(), "the local folder outlived its upload"

    def killed(self, dest):
        raise SystemExit("worker killed")

    monkeypatch.setattr(storage.Location, "move_to", killed)
    with pytest.raises(SystemExit):
        runs.publish_checkpoint(run, written(2), "step_00000002")
    assert [f.name for f in (run / "step_00000002").files()] == [f".{pretrain.CHECKPOINT_FILE}.partial"]
    assert (tmp_path / "local2" / pretrain.CHECKPOINT_FILE).exists(), "deleted before the upload was done"
    restored = Pretrainer(micro_cfg(), -8.0, 4.0, torch.device("cpu"))
    pretrain.restore(restored, run, None)
    assert restored.step == 1
    # A run folder the worker's node does not see (a local path on another node) stops the run.
    with pytest.raises(RuntimeError, match="does not see the run folder"):
        runs.publish_checkpoint(storage.resolve(tmp_path / "elsewhere"), written(3), "step_00000003")


def test_gradient_accumulation_averages_micro_batches():
    cfg = micro_cfg("optim.grad_accum=2", "mask.schedule=rb")
    trainer = Pretrainer(cfg, -8.0, 4.0, torch.device("cpu"))
    masks = trainer.plan(0, [fake_batch(0), fake_batch(1)])
    assert masks[0].family == masks[1].family  # one family per optimizer step
    assert not torch.equal(masks[0].context, masks[1].context)  # but fresh positions per micro-batch
    before = params(trainer).clone()
    trainer.train_step([fake_batch(0), fake_batch(1)])
    assert trainer.step == 1 and not torch.equal(before, params(trainer))


def test_corrupt_and_foreign_checkpoints_give_clear_errors(tmp_path):
    trainer = Pretrainer(micro_cfg(), -8.0, 4.0, torch.device("cpu"))
    good = tmp_path / "good.pt"
    trainer.save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{truncated}: corrupt or unreadable checkpoint"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not an ajepa pretraining checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "absent.pt")


def test_exported_encoder_loads_into_a_fresh_vit(tmp_path):
    trainer = Pretrainer(micro_cfg("data.crop_frames=96"), -8.0, 4.0, torch.device("cpu"))
    trainer.train_step([fake_batch(0)])
    stats = {"audio": dataclasses.asdict(trainer.cfg.audio), "mean": -8.0, "std": 4.0, "counts": {"train": 8}}
    path = export_encoder(trainer.state_dict(), tmp_path / "encoder.safetensors", stats)
    vit = VisionTransformer(trainer.cfg.model, 128, 96)
    vit.load_state_dict(load_file(str(path)))
    x = torch.randn(2, 96, 128)
    torch.testing.assert_close(vit(x), trainer.model.target_encoder(x))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["step"] == "1" and json.loads(metadata["config"])["embed_dim"] == 64
    # What `ajepa.hear` needs to turn audio into this encoder's input, and nothing else of the store's stats.
    assert json.loads(metadata["input"]) == {"audio": stats["audio"], "mean": -8.0, "std": 4.0, "crop_frames": 96,
                                             "normalize": True}


def test_impossible_mask_is_rejected_before_ray_starts(tmp_path):
    job = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--out", str(tmp_path), "--set", "mask.rb_target_scale=[0.9, 1.0]", "--set", "mask.schedule=rb"]
    done = subprocess.run(job, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 2
    assert "mask.rb_target_scale" in done.stderr
    assert "Ray" not in done.stderr and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ real Ray Train


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, ray_local):
    """128 real instrument clips (one note per program per family slot) in a store."""
    from ajepa.demo_data import build_demo_audio

    root = tmp_path_factory.mktemp("pretrain-data")
    manifest = build_demo_audio(root / "audio", programs=range(0, 128, 2), notes_per_program=3)
    return data.build_store(manifest, root / "store", load_config(ROOT / "configs" / "tiny.yaml").audio).out


def ray_cfg(tmp_path, *extra):
    return micro_cfg("run.workers=2", "run.cpus_per_worker=0.5", "run.torch_threads=1", "optim.steps=8",
                     "run.log_every=2", "run.checkpoint_every=2", f"run.out_dir={tmp_path}", *extra)


def metric_steps(result, key="loss"):
    client = mlflow.MlflowClient(result.tracking_uri)
    return [(m.step, m.value) for m in sorted(client.get_metric_history(result.mlflow_run_id, key),
                                              key=lambda m: m.step)]


@pytest.mark.slow
def test_a_step_counts_the_model_flops_its_masks_make_and_a_known_gpu_has_a_peak_to_rate_them():
    counted = {}
    for pad in ("false", "true"):
        cfg = micro_cfg("optim.grad_accum=2", "mask.schedule=rb", f"mask.pad_context={pad}")
        trainer = Pretrainer(cfg, -8.0, 4.0, torch.device("cpu"))
        planned = trainer.plan(0, [fake_batch(0), fake_batch(1)])
        counted[pad] = trainer.train_step(planned)["model_flops"]
        assert trainer.grid == (8, 8)
        assert counted[pad] == sum(8 * sum(flops_split(cfg.model, 8, 8, m.context.shape[1], m.targets.shape[2],
                                                       m.targets.shape[1]).values()) for m in planned)
        assert trainer.peak_flops is None  # no MFU on a CPU: it runs float32, with no bf16 peak to rate it by
    # The same masks, contexts padded to each micro-batch's longest instead of cut to its shortest: more work.
    assert counted["true"] > counted["false"]
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA GeForce RTX 3090") is None


def test_killed_worker_is_restarted_and_the_run_completes(tmp_path, small_store, monkeypatch):
    monkeypatch.setenv(pretrain.FAULT_ENV, "5")
    cfg = ray_cfg(tmp_path, "run.max_failures=1", "eval.every=4", "eval.max_clips=32")
    result = pretrain.run_pretrain(cfg, store=small_store)
    assert (result.run_dir / "fault_injected").exists(), "the fault was never injected"
    assert result.step == 8 and result.checkpoint.name == "step_00000008"
    steps = [s for s, _ in metric_steps(result)]
    # The worker died at step 5, one step after the step-4 checkpoint: the restart continues from it.
    assert steps == [2, 4, 6, 8], f"steps before the checkpoint were trained (and logged) again: {steps}"
    probes = dict(metric_steps(result, "probe/linear_acc"))  # the online probe, on rank 0, every 4 steps
    assert {4, 8} <= set(probes) and all(0 <= v <= 1 for v in probes.values())
    assert {4, 8} <= {s for s, _ in metric_steps(result, "probe/knn_acc")}
    run = mlflow.MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.embed_dim"] == "64" and run.data.params["optim.steps"] == "8"
    # Model TFLOP/s per worker at every log step; MFU only where a bf16 peak rates it (GPUs), not here.
    tflops = metric_steps(result, "model_tflops")
    assert [s for s, _ in tflops] == [2, 4, 6, 8] and all(v > 0 for _, v in tflops)
    assert "mfu" not in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient(result.tracking_uri).list_artifacts(result.mlflow_run_id)}
    assert {"config.yaml", "masks.png", "encoder.safetensors", "data"} <= artifacts
    assert load_file(str(result.encoder))
    # The export carries the store's statistics: the run folder is a HEAR model as it stands.
    stats = data.read_stats(small_store)
    model = load_model(result.run_dir)
    assert (model.mean, model.std, model.window_frames) == (stats["mean"], stats["std"], 128)
    # A local Ray (runtime.init_ray) has no node to lose to preemption: Train starts no watcher for one. The
    # session's Ray by its address: without one, list_actors guesses among every Ray running on the machine.
    watchers = list_actors(address=ray.get_runtime_context().gcs_address,
                           filters=[("class_name", "=", "PreemptionWatcher")])
    assert not watchers


class _StepOnly:
    """A trainer as the run machinery sees one, whose whole state is its step."""

    checkpoint_file = "state.pt"

    def __init__(self) -> None:
        self.step = 0

    def save(self, path: Path) -> None:
        torch.save({"step": self.step}, path)

    def load(self, path) -> None:
        self.step = int(runs.read_checkpoint(path, "test", {"step"})["step"])


def _stalled_upload_loop(config):
    """Two steps, each with a checkpoint report. On the first attempt step 1's upload is slow and step 2's stalls
    before its rename (slow storage), and the worker dies during that stall, killing the upload. The worker writes
    the step it restored, how long each report kept it, and what the killed upload had left (its local copy of the
    state, in a temp folder of the test's, and its partial file in the run folder) before and after `restore`."""
    import ray.train
    from ajepa import storage
    from ajepa.train import runs

    out = Path(config["out"])
    tempfile.tempdir = str(out / "tmp")

    def leftovers() -> list[int]:
        return [len(list(Path(tempfile.tempdir).glob("*/*"))), len(config["run_dir"].glob("step_*/.*.partial"))]

    first_attempt = not (out / "killed").exists()
    if first_attempt:
        rename = storage.Location.move_to

        def stalled(self, dest):  # step 1's upload slow too: still going when step 2's report returns
            time.sleep({"step_00000001": 2, "step_00000002": 120}.get(dest.parent.name, 0))
            rename(self, dest)

        storage.Location.move_to = stalled
    trainer = _StepOnly()
    before = leftovers()
    runs.restore(trainer, config["run_dir"], ray.train.get_checkpoint())
    record = {"restored": trainer.step, "blocked": [], "leftovers": [before, leftovers()]}
    while trainer.step < 2:
        trainer.step += 1
        start = time.perf_counter()
        runs.report(trainer, {"step": trainer.step}, True, trainer.step, config["run_dir"], False)
        record["blocked"].append(time.perf_counter() - start)
        (out / f"{'first' if first_attempt else 'restart'}.json").write_text(json.dumps(record))
        if first_attempt and trainer.step == 2:
            # Step 2's own partial file: step 1's upload writes one too, and under load it may still be uploading
            # here (uploads run one at a time, so step 2's partial means step 1 is complete).
            stalled_partial = config["run_dir"] / "step_00000002" / f".{trainer.checkpoint_file}.partial"
            deadline = time.monotonic() + 60
            while not stalled_partial.exists() and time.monotonic() < deadline:  # the upload is in its stalled rename
                time.sleep(0.05)
            (out / "killed").write_text("")
            os._exit(1)


@pytest.mark.slow
def test_training_goes_on_during_an_upload_and_a_kill_during_it_restarts_from_a_complete_one(tmp_path, ray_local):
    """Checkpoint uploads run in the background (Ray's ASYNC mode): a report does not wait for one that stalls.
    A worker dying meanwhile takes the upload with it; the restart clears what that upload left, takes the newest
    complete checkpoint, and the run's last checkpoint is whole. (The 2-worker runs below go through the same
    reports.)"""
    import ray.cloudpickle
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module
    run_dir = storage.resolve(tmp_path / "run")
    (run_dir / pretrain.RUN_FILE).write_text("{}")
    (tmp_path / "tmp").mkdir()
    result = TorchTrainer(
        _stalled_upload_loop, train_loop_config={"run_dir": run_dir, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="run", storage_path=str(tmp_path), failure_config=FailureConfig(max_failures=1),
                             checkpoint_config=CheckpointConfig(num_to_keep=runs.KEEP_CHECKPOINTS))).fit()
    first = json.loads((tmp_path / "first.json").read_text())
    assert len(first["blocked"]) == 2, "the worker was still in its report when it was killed"
    assert max(first["blocked"]) < 10, f"reports waited for the 120 s upload: {first['blocked']} s"
    restart = json.loads((tmp_path / "restart.json").read_text())
    assert restart["restored"] == 1, "not the newest complete checkpoint"
    assert restart["leftovers"] == [[1, 1], [0, 0]], "the killed upload's local copy and partial file, cleared"
    assert result.checkpoint.path == str(run_dir / "step_00000002")
    trainer = _StepOnly()
    trainer.load(run_dir / "step_00000002" / trainer.checkpoint_file)
    assert trainer.step == 2
    assert [f.name for f in (run_dir / "step_00000002").files()] == ["state.pt"], "a partial file was left"


def _slow_upload_loop(config):
    """Three checkpoint reports in a row, each upload taking `upload_s`: the time each report kept the worker and
    how many checkpoint folders its local disk held after it (its temp files go to a folder of the test's)."""
    from ajepa import storage
    from ajepa.train import runs

    tempfile.tempdir = config["tmp"]
    upload = storage.Location.upload_whole

    def slow(self, file):
        time.sleep(config["upload_s"])
        upload(self, file)

    storage.Location.upload_whole = slow
    trainer, record = _StepOnly(), {"blocked": [], "on_disk": []}
    while trainer.step < 3:
        trainer.step += 1
        start = time.perf_counter()
        runs.report(trainer, {"step": trainer.step}, True, trainer.step, config["run_dir"], False)
        record["blocked"].append(time.perf_counter() - start)
        record["on_disk"].append(len(list(Path(config["tmp"]).glob("*/*"))))  # a folder per state in the run's
    (Path(config["tmp"]).parent / "record.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_checkpoints_wait_for_uploads_slower_than_training_instead_of_piling_up_on_disk(tmp_path, ray_local):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    run_dir = storage.resolve(tmp_path / "run")
    (run_dir / pretrain.RUN_FILE).write_text("{}")
    (tmp_path / "tmp").mkdir()
    upload_s = 4.0
    result = TorchTrainer(
        _slow_upload_loop, train_loop_config={"run_dir": run_dir, "tmp": str(tmp_path / "tmp"), "upload_s": upload_s},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="run", storage_path=str(tmp_path))).fit()
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["on_disk"] == [1, 2, 2], "one uploading and one written, never more"
    first, second, third = record["blocked"]
    assert max(first, second) < upload_s / 2 < third, f"only the third waits for an upload: {record['blocked']}"
    assert result.checkpoint.path == str(run_dir / "step_00000003")
    assert not list((tmp_path / "tmp").iterdir()), "every local copy deleted once uploaded, and the run's folder"


@pytest.mark.slow
def test_stopped_run_resumes_at_its_checkpoint_and_continues(tmp_path, small_store, monkeypatch):
    from ray.train import TrainingFailedError

    monkeypatch.setenv(pretrain.FAULT_ENV, "5")
    cfg = ray_cfg(tmp_path, "optim.steps=10", "run.name=stopped", "run.max_failures=0")
    with pytest.raises(TrainingFailedError):
        pretrain.run_pretrain(cfg, store=small_store)
    monkeypatch.delenv(pretrain.FAULT_ENV)
    result = pretrain.run_pretrain(load_config(None, [f"run.out_dir={tmp_path}"]), resume="stopped")
    assert result.step == 10 and result.name == "stopped"
    history = metric_steps(result)
    steps = [s for s, _ in history]
    assert steps == sorted(steps) and steps[0] == 2 and steps[-1] == 10
    assert 6 in steps, "the resumed run logged the steps after its checkpoint"
    losses = dict(history)
    assert losses[10] < losses[2]
    # It resumed mid-epoch (at step 4 of 9), and read on across the epoch's end exactly the batches an unbroken
    # run reads: with the same masks and augmentation, both ranks end with bit-identical weights.
    assert order.batches_per_epoch(data.read_stats(small_store)["counts"]["train"], 8, 2) == 9
    unbroken = pretrain.run_pretrain(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="unbroken")),
                                     store=small_store)
    resumed, straight = (load_checkpoint(r.checkpoint / pretrain.CHECKPOINT_FILE)["model"] for r in (result, unbroken))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    with pytest.raises(Exception, match="already exists; use --resume stopped"):
        pretrain.run_pretrain(cfg, store=small_store)


def test_resume_with_a_damaged_run_record_names_the_file(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / pretrain.RUN_FILE).write_text("{not json")
    cfg = load_config(None, [f"run.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=f"{tmp_path / 'broken' / pretrain.RUN_FILE}: unreadable run record"):
        pretrain.run_pretrain(cfg, resume="broken")
    (tmp_path / "broken" / pretrain.RUN_FILE).write_text('{"config": {}}')
    with pytest.raises(ConfigError, match="run record lacks mlflow_run_id, store, tracking_uri"):
        pretrain.run_pretrain(cfg, resume="broken")
    with pytest.raises(ConfigError, match="--resume nowhere: no run found"):
        pretrain.run_pretrain(cfg, resume="nowhere")


def pretrain_job(out: Path, store: Path, steps: int, *extra: str) -> list[str]:
    sets = [*MICRO, "run.torch_threads=1", "run.log_every=2", f"optim.steps={steps}"]
    return [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--data", str(store), "--out", str(out),
            *[arg for flag in sets for arg in ("--set", flag)], *extra]


def progress_line(step: int, total: int) -> str:
    # The online probe (tiny config: every 50 steps and at the last step) adds its result to its step's line.
    probe = r"(, probe linear \d+\.\d% knn \d+\.\d% \(\d+\.\d s, \d+\.\d% of training time\))?"
    return rf"pretrain: {step}/{total} steps, loss \d+\.\d{{4}}, lr \d\.\d\de-\d\d, \d+\.\d samples/s{probe}, ETA \w+"


def run_status(out: Path) -> str:
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ajepa").experiment_id])
    return run.info.status


@pytest.mark.slow
def test_job_output_is_progress_and_a_summary_in_a_pipe_and_a_bar_on_a_terminal(tmp_path, small_store):
    env = {**os.environ, "RAY_ADDRESS": "", "COLUMNS": "200"}
    done = subprocess.run(pretrain_job(tmp_path / "a", small_store, 6, "--workers", "1"), capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    # The raylet's own notices reach every driver's stdout (not its log stream, so not filtered). The one
    # seen here: "N PYTHON worker processes have been started ... 4x the maximum expected startup
    # concurrency", when Train's control actors and Ray Data's tasks start at once on a loaded 2-CPU node.
    lines = [line for line in done.stdout.splitlines() if not line.startswith("\x1b[33m(raylet)")]
    assert done.stderr == "" and not any("\r" in line or "\x1b" in line for line in lines)
    assert lines[0].startswith("pretraining pretrain-")
    assert lines[0].endswith(f"6 steps on 1 worker, data {small_store}")
    for line, step in zip(lines[1:4], (2, 4, 6), strict=True):  # one line per log interval
        assert re.fullmatch(progress_line(step, 6), line), line
    assert re.fullmatch(r"pretrained pretrain-\S+: 6 steps, final loss \d+\.\d{4}", lines[4])
    assert lines[5] == f"data: {small_store}" and lines[6].startswith("checkpoint: ")
    assert lines[7].startswith("encoder weights: ") and "mlflow ui --backend-store-uri sqlite:///" in lines[8]
    assert len(lines) == 9

    # The bar is the driver's, fed by the same progress queue in process: no Ray Train workers needed (~20 s).
    code, shown = run_in_terminal(pretrain_job(tmp_path / "b", small_store, 4, "--workers", "0"), env, timeout=300)
    assert code == 0, shown
    assert f"4 steps in this process (run.workers=0), data {small_store}\n" in shown, shown
    assert re.search(rf"\r\x1b\[K{progress_line(2, 4)}\n", shown), shown  # a line kept above the bar
    assert re.search(rf"\r\x1b\[K\[#{{20}}\] {progress_line(4, 4)}\n", shown), shown  # the bar, at its end


@pytest.mark.slow
def test_failure_after_fit_marks_the_run_failed(tmp_path, small_store, monkeypatch):
    def broken_export(state, path, stats):
        raise OSError("disk full")

    monkeypatch.setattr(pretrain, "export_encoder", broken_export)
    # In process (run.workers=0): the export runs in the driver after fit() either way.
    cfg = micro_cfg("run.workers=0", "run.torch_threads=1", "optim.steps=2", "run.log_every=1",
                    f"run.out_dir={tmp_path}")
    with pytest.raises(OSError, match="disk full"):
        pretrain.run_pretrain(cfg, store=small_store)
    assert run_status(tmp_path) == "FAILED"


@pytest.mark.slow
def test_ctrl_c_marks_the_run_killed(tmp_path, small_store):
    proc = subprocess.Popen(pretrain_job(tmp_path, small_store, 5000, "--workers", "1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        while not (line := proc.stdout.readline()).startswith("pretrain: "):  # training is under way
            assert line, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        proc.kill()
    assert proc.stderr.read().splitlines()[-1] == "interrupted"
    assert run_status(tmp_path) == "KILLED"


@pytest.mark.slow
def test_in_process_run_keeps_its_checkpoints_and_resumes_from_them_with_the_changes_given(tmp_path, small_store,
                                                                                        capsys):
    """run.workers=0 (Ray Train's local mode) keeps no copy of reported checkpoints: ours are in the run folder.
    A resume's overrides become the run's config; one that changes the model or leaves nothing to train is refused
    before the run is touched."""
    cfg = micro_cfg("run.workers=0", "run.torch_threads=1", "optim.steps=6", "run.log_every=2",
                    "run.checkpoint_every=2", "eval.every=0", "run.name=inproc", f"run.out_dir={tmp_path}")
    first = pretrain.run_pretrain(cfg, store=small_store)
    assert first.step == 6 and Path(first.checkpoint) == tmp_path / "inproc" / "step_00000006"
    assert [p.name for p in pretrain.local_checkpoints(tmp_path / "inproc")] == ["step_00000004", "step_00000006"]
    assert load_file(str(first.encoder))
    resumed = pretrain.run_pretrain(load_config(None, [f"run.out_dir={tmp_path}"]), resume="inproc",
                                    overrides=["optim.steps=8"])
    assert resumed.step == 8, "continued from step 6, not from 0"
    assert [s for s, _ in metric_steps(resumed)] == [2, 4, 6, 8]
    assert ", resumed at step 6 (optim.steps 6 -> 8)\n" in capsys.readouterr().out
    run_dir = tmp_path / "inproc"
    assert json.loads((run_dir / pretrain.RUN_FILE).read_text())["config"]["optim"]["steps"] == 8
    assert load_config(run_dir / "config.yaml").optim.steps == 8, "a later resume continues with the change"
    run = mlflow.MlflowClient(resumed.tracking_uri).get_run(resumed.mlflow_run_id)
    assert run.data.tags["ajepa.changed_at_step_6"] == "optim.steps 6 -> 8" and run.data.params["optim.steps"] == "6"

    record = (run_dir / pretrain.RUN_FILE).read_text()
    other = tmp_path / "other-store"
    for overrides, store, refusal in [
            ([], None, "--resume inproc: nothing to train: its last checkpoint is step 8 and optim.steps is 8; give "
                       "more steps"),
            (["optim.steps=7"], None, "its last checkpoint is step 8 and optim.steps is 7"),
            (["optim.steps=12", "model.depth=3", "model.pred_heads=4"], None,
             "--resume inproc: model.depth 3 (the run's is 2); model.pred_heads 4 (the run's is 2): a resumed run "
             "keeps the model its checkpoints hold"),
            (["optim.steps=12"], other, f"--resume inproc: {other} is not the store the run reads ({small_store})"),
            (["optim.steps=12", f"data.store={other}"], None, f"{other} is not the store the run reads")]:
        with pytest.raises(ConfigError, match=re.escape(refusal)):
            pretrain.run_pretrain(load_config(None, [f"run.out_dir={tmp_path}"]), store=store, resume="inproc",
                                  overrides=overrides)
    assert (run_dir / pretrain.RUN_FILE).read_text() == record
    client = mlflow.MlflowClient(resumed.tracking_uri)
    assert client.get_run(resumed.mlflow_run_id).info.status == "FINISHED"

    # Stopped after its last checkpoint, before its export (Ctrl-C while Ray Train winds down, a sweep
    # interrupted): --resume finishes it from that checkpoint without training, and the run ends FINISHED.
    exported = load_file(str(resumed.encoder))
    (run_dir / pretrain.ENCODER_FILE).unlink()
    client.set_terminated(resumed.mlflow_run_id, "KILLED")
    with pytest.raises(ConfigError, match=re.escape("--resume inproc: optim.lr 0.001 -> 0.1: its last checkpoint is "
                                                    "its last step (8), so the resume only finishes the run")):
        pretrain.run_pretrain(load_config(None, [f"run.out_dir={tmp_path}"]), resume="inproc",
                              overrides=["optim.lr=0.1"])
    assert (run_dir / pretrain.RUN_FILE).read_text() == record
    capsys.readouterr()
    finished = pretrain.run_pretrain(load_config(None, [f"run.out_dir={tmp_path}"]), resume="inproc")
    assert ", resumed at step 8: its last step, so it only finishes (the export)\n" in capsys.readouterr().out
    assert finished.step == 8 and Path(finished.checkpoint) == run_dir / "step_00000008"
    assert finished.metrics == resumed.metrics, "the last step's metrics, as MLflow has them"
    weights = load_file(str(finished.encoder))
    assert weights.keys() == exported.keys() and all(torch.equal(weights[k], exported[k]) for k in weights)
    assert [s for s, _ in metric_steps(finished)] == [2, 4, 6, 8], "nothing trained again"
    assert client.get_run(resumed.mlflow_run_id).info.status == "FINISHED"
    # A sweep's trial that Tune starts again at its last step finishes again: Tune may restart a trial whose run
    # had just finished. A user's --resume of a finished run is still refused (above).
    trial = runs.SweepTrial(finished.tracking_uri, "unused: the run exists", {}, [])
    again = pretrain.run_pretrain(load_config(None, [f"run.out_dir={tmp_path}"]), resume="inproc", trial=trial)
    assert again.step == 8 and again.metrics == resumed.metrics
    assert client.get_run(resumed.mlflow_run_id).info.status == "FINISHED"
