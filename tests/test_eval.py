"""Frozen-encoder evaluation: metrics by hand, probes with known answers, label checks, the evaluate job."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import soundfile as sf
import torch
from ajepa import data
from ajepa.config import ConfigError, load_config
from ajepa.data import StoreArrays
from ajepa.eval import (
    EvalError,
    ProbeSet,
    embed,
    encode_labels,
    knn_probe,
    label_sets,
    linear_probe,
    load_encoder,
    load_probe_sets,
    mean_average_precision,
    run_evaluate,
)
from ajepa.models.vit import VisionTransformer
from ajepa.train.pretrain import Pretrainer, export_encoder
from conftest import fake_batch, micro_cfg, tone

ROOT = Path(__file__).resolve().parents[1]

def clusters(n_per_class: int, classes: int, seed: int, spread: float) -> tuple[torch.Tensor, list[str]]:
    """Gaussian blobs in 16-D, one per class, `spread` wide around well-separated centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(16)[:classes] * 10
    feats = torch.cat([centres[c] + spread * torch.randn(n_per_class, 16, generator=g) for c in range(classes)])
    return feats, [f"c{c}" for c in range(classes) for _ in range(n_per_class)]


def probe_inputs(spread: float, shuffle_labels: bool = False):
    feats, labels = {}, {}
    for i, split in enumerate(("train", "val", "test")):
        x, y = clusters(20, 3, seed=i, spread=spread)
        if shuffle_labels:
            y = [y[j] for j in torch.randperm(len(y), generator=torch.Generator().manual_seed(10 + i))]
        feats[split], labels[split] = x, encode_labels(y, ["c0", "c1", "c2"], multi_label=False)
    return feats, labels


def test_mean_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.9]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]], dtype=torch.float32)
    # class 0 ranks rows 0, 1, 2, 3: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2 = 5/6
    # class 1 ranks rows 3, 1, 2, 0: its one positive at rank 2 -> 1/2
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1 / 2) / 2)
    # a class without positives is left out, not scored 0
    assert mean_average_precision(scores, torch.cat([targets, torch.zeros(4, 1)], 1)) == pytest.approx(2 / 3)


def test_probes_find_separable_classes_and_not_shuffled_ones():
    feats, labels = probe_inputs(spread=1.0)
    result = linear_probe(feats, labels)
    assert result.test == 1.0 and result.l2 in result.val_by_l2
    assert knn_probe(feats, labels, k=5) == 1.0
    feats, labels = probe_inputs(spread=1.0, shuffle_labels=True)
    assert linear_probe(feats, labels).test < 0.6 and knn_probe(feats, labels, k=5) < 0.6  # chance is 1/3


def test_multi_label_probes_report_map():
    feats, labels = {}, {}
    for i, split in enumerate(("train", "val", "test")):
        x, y = clusters(20, 3, seed=i, spread=1.0)
        y = [f"{lab};both" if lab != "c2" else lab for lab in y]  # c0 and c1 also carry "both"
        feats[split], labels[split] = x, encode_labels(y, ["both", "c0", "c1", "c2"], multi_label=True)
    assert labels["test"].targets.sum(0).tolist() == [40, 20, 20, 20]
    assert linear_probe(feats, labels).test == pytest.approx(1.0)
    assert knn_probe(feats, labels, k=5) == pytest.approx(1.0)


def test_label_checks_name_the_store_and_split():
    ok = {"train": ["a", "b"], "val": ["a"], "test": ["b;a"]}
    assert label_sets(ok, "S") == (["a", "b"], True)
    with pytest.raises(EvalError, match="S: the train split has no labels"):
        label_sets({"train": ["", ""], "val": [""], "test": [""]}, "S")
    with pytest.raises(EvalError, match="S: split test has labels that train lacks: c"):
        label_sets({"train": ["a", "b"], "val": ["a"], "test": ["c"]}, "S")
    with pytest.raises(EvalError, match="S: 1 clips of split val have no label"):
        label_sets({"train": ["a", "b"], "val": ["a", ""], "test": ["b"]}, "S")


def test_embedding_pools_real_frames_only_and_ignores_the_batch():
    cfg = micro_cfg("data.batch_size=4")
    torch.manual_seed(0)
    encoder = VisionTransformer(cfg.model, 128, 128)
    rng = np.random.default_rng(0)
    fbank = rng.normal(-6, 3, size=(3, 128, 128)).astype(np.float16)
    arrays = StoreArrays(["a", "b", "c"], ["x"] * 3, fbank, np.array([128, 40, 5]), {})
    together = embed(encoder, arrays, 128, -6.0, 3.0, batch_size=3, device=torch.device("cpu"))
    alone = embed(encoder, arrays, 128, -6.0, 3.0, batch_size=1, device=torch.device("cpu"))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        tokens = encoder((torch.from_numpy(fbank[1:2].astype(np.float32)) + 6.0) / 6.0)  # normalise: (x-m)/(2s)
    torch.testing.assert_close(together[1], tokens[0, :3 * 8].mean(0))  # 40 frames touch 3 time patches of 16
    rows = embed(encoder, arrays, 128, -6.0, 3.0, 2, torch.device("cpu"), pool="freq")
    d = encoder.embed_dim
    assert rows.shape == (3, 8 * d)  # one D-wide average per frequency row, rows concatenated
    torch.testing.assert_close(rows[1].view(8, d), tokens[0, :3 * 8].view(3, 8, d).mean(0))
    torch.testing.assert_close(rows.view(3, 8, d).mean(1), together)  # the rows' mean is the plain mean
    raw = embed(encoder, arrays, 128, -6.0, 3.0, 3, torch.device("cpu"), normalize_input=False)
    with torch.no_grad():  # an encoder trained on unnormalised input is probed on unnormalised input
        torch.testing.assert_close(raw[1], encoder(torch.from_numpy(fbank[1:2].astype(np.float32)))[0, :24].mean(0))


@pytest.fixture(scope="module")
def stores(tmp_path_factory, ray_local):
    """Two tiny real stores: low vs high tones (labelled, every split), and the same audio unlabelled."""
    from ajepa import data

    root = tmp_path_factory.mktemp("eval-data")
    rows = ["path,label,split"]
    for label, base in (("low", 150.0), ("high", 3000.0)):
        for i in range(12):
            path = root / "audio" / f"{label}{i}.wav"
            path.parent.mkdir(exist_ok=True)
            sf.write(path, tone(1.0, 16000, freq=base * (1 + 0.05 * i), seed=i), 16000)
            rows.append(f"audio/{path.name},{label},{('train', 'train', 'val', 'test')[i % 4]}")
    (root / "labelled.csv").write_text("\n".join(rows) + "\n")
    audio_cfg = load_config(ROOT / "configs" / "tiny.yaml").audio
    labelled = data.build_store(root / "labelled.csv", root / "labelled", audio_cfg).out
    unlabelled = data.build_store(root / "audio", root / "unlabelled", audio_cfg).out
    return labelled, unlabelled


def test_evaluate_job_scores_a_known_task_and_logs_to_mlflow(tmp_path, stores):
    labelled, unlabelled = stores
    cfg = micro_cfg("data.batch_size=4", f"run.out_dir={tmp_path}")
    result = run_evaluate(cfg, "random", labelled)
    # Low against high tones: even random features separate them.
    assert result.metrics["probe/linear_acc"] == 1.0 and result.metrics["probe/knn_acc"] == 1.0
    assert result.metrics["probe/linear_val_acc"] == 1.0  # val, for selection: the same probe before its refit
    assert "linear probe" in result.table and "100.0%" in result.table and "train 12, val 6, test 6" in result.table
    scores = [line for line in result.table.splitlines() if line.endswith("%")]
    assert len(scores) == 2 and len({line.index("%") for line in scores}) == 1, "the scores in one column"
    run = mlflow.MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["probe/linear_acc"] == 1.0
    assert run.data.params["clips.test"] == "6" and run.data.tags["ajepa.job"] == "evaluate"
    assert json.loads(result.results.read_text())["metrics"]["probe/knn_acc"] == 1.0
    with pytest.raises(EvalError, match="the train split has no labels"):
        run_evaluate(cfg, "random", unlabelled)


def test_a_store_of_several_tasks_is_probed_task_by_task(tmp_path, ray_local):
    from ajepa import data

    rows = ["path,label,split,task"]
    rng = np.random.default_rng(0)
    for i in range(24):  # task pitch: low vs high tones; task kind: tone vs noise (every split of each)
        split = ("train", "train", "val", "test")[i % 4]
        sf.write(tmp_path / f"p{i}.wav", tone(1.0, 16000, freq=(150.0, 3000.0)[i % 2] * (1 + 0.02 * i)), 16000)
        rows.append(f"p{i}.wav,{('low', 'high')[i % 2]},{split},pitch")
        noise = i % 2 == 1
        clip = 0.3 * rng.standard_normal(16000) if noise else tone(1.0, 16000, freq=500.0 + 20 * i)
        sf.write(tmp_path / f"k{i}.wav", clip, 16000)
        rows.append(f"k{i}.wav,{('tone', 'noise')[int(noise)]},{split},kind")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    store = data.build_store(tmp_path / "m.csv", tmp_path / "store",
                             load_config(ROOT / "configs" / "tiny.yaml").audio).out
    sets = load_probe_sets(store)
    assert [(p.task, p.labels["train"].classes, len(p.arrays["test"])) for p in sets] == [
        ("kind", ["noise", "tone"], 6), ("pitch", ["high", "low"], 6)], "each task has its own rows and classes"
    result = run_evaluate(micro_cfg("data.batch_size=8", f"run.out_dir={tmp_path}"), "random", store)
    m = result.metrics
    assert m["probe/pitch/linear_acc"] == 1.0 and m["probe/kind/knn_acc"] == 1.0
    assert m["probe/linear_acc"] == pytest.approx((m["probe/pitch/linear_acc"] + m["probe/kind/linear_acc"]) / 2)
    assert m["probe/linear_val_acc"] == pytest.approx((m["probe/pitch/linear_val_acc"]
                                                       + m["probe/kind/linear_val_acc"]) / 2)
    assert "task kind: train 12, val 6, test 6; 2 classes" in result.table
    capped = load_probe_sets(store, max_clips=3)[1].arrays  # at most 3 clips of each split, of this task only
    assert [len(capped[s]) for s in ("train", "val", "test")] == [3, 3, 3]
    assert set(capped["train"].extra["task"]) == {"pitch"} and set(capped["train"].labels) == {"low", "high"}


def test_checkpoints_load_as_trained_and_bad_ones_are_named(tmp_path, stores):
    cfg = micro_cfg("data.batch_size=4")
    trainer = Pretrainer(cfg, -8.0, 4.0, torch.device("cpu"))
    trainer.train_step([(torch.randn(4, 128, 128).half(), torch.full((4,), 98))])
    (tmp_path / "step_00000001").mkdir()
    trainer.save(tmp_path / "step_00000001" / "pretrain.pt")
    for which in ("target", "context"):
        loaded = load_encoder(str(tmp_path / "step_00000001"), tmp_path, which)
        expected = getattr(trainer.model, f"{which}_encoder").state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in loaded.encoder.state_dict().items())
        assert loaded.step == 1 and loaded.crop_frames == 128 and loaded.normalize_input
    export = export_encoder(trainer.state_dict(), tmp_path / "encoder.safetensors", data.read_stats(stores[0]))
    exported = load_encoder(str(export), tmp_path, "target")
    assert all(torch.equal(v, trainer.model.target_encoder.state_dict()[k])
               for k, v in exported.encoder.state_dict().items())
    with pytest.raises(EvalError, match="an export .exported target encoder. holds one encoder; the context encoder "
                                        r"is in pretraining checkpoints \(pretrain.pt\) only"):
        load_encoder(str(export), tmp_path, "context")
    with pytest.raises(EvalError) as missing:  # says where it looked: the path as resolved, and a run of that name
        load_encoder("nowhere", tmp_path, "target")
    assert str(missing.value) == ("--checkpoint nowhere: no run, checkpoint or export there (looked for a run "
                                  f"folder, a step folder, pretrain.pt or finetune.pt at {Path.cwd() / 'nowhere'}, "
                                  f"and for {tmp_path}/nowhere/run.json)")
    with pytest.raises(EvalError) as missing:  # a path is no run name: no run.json looked for under --out
        load_encoder(str(tmp_path / "step_00000009"), tmp_path, "target")
    assert str(missing.value).endswith(f"finetune.pt at {tmp_path}/step_00000009)")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match=f"{garbage}: corrupt or unreadable checkpoint"):
        load_encoder(str(garbage), tmp_path, "target")


def test_a_file_in_a_run_folder_is_that_runs_and_a_fine_tuned_model_gives_its_encoder(tmp_path, stores):
    """Every way of naming a pretraining or fine-tuning run's encoder (run name, folder, step folder, checkpoint,
    export) loads the same weights, knows its run and its step; the evaluation is nested under that run."""
    from ajepa import tracking
    from ajepa.hear import load_model
    from ajepa.train.finetune import Finetuner, Task, export_model

    cfg = micro_cfg("data.batch_size=4", f"run.out_dir={tmp_path}")
    stats = data.read_stats(stores[0])
    uri = tracking.default_tracking_uri(tmp_path)
    pretrainer = Pretrainer(cfg, -8.0, 4.0, torch.device("cpu"))
    for i in range(3):
        pretrainer.train_step([fake_batch(i, 4)])
    task = Task(["high", "low"], False, "ce")
    finetuner = Finetuner(cfg, task, -8.0, 4.0, torch.device("cpu"), pretrainer.model.target_encoder.state_dict())
    for i in range(2):
        finetuner.train_step(*fake_batch(i, 4), torch.tensor([0, 1, 0, 1]))
    made = {}
    for job, trainer, export, expected in (
            ("pretrain", pretrainer, "encoder.safetensors", pretrainer.model.target_encoder),
            ("finetune", finetuner, "model.safetensors", finetuner.model.encoder)):
        parent = tracking.Tracker.start(uri, cfg.run.experiment, job)
        parent.finish("FINISHED")
        folder, step = tmp_path / job, trainer.step
        (folder / f"step_{step:08d}").mkdir(parents=True)
        trainer.save(folder / f"step_{step:08d}" / trainer.checkpoint_file)
        (folder / "run.json").write_text(json.dumps({"name": job, "tracking_uri": uri,
                                                     "mlflow_run_id": parent.run_id}))
        if job == "pretrain":
            export_encoder(trainer.state_dict(), folder / export, stats)
        else:
            export_model(trainer.state_dict(), task, folder / export, stats)
        made[job] = parent.run_id
        weights = expected.state_dict()
        for named in (job, folder, folder / f"step_{step:08d}", folder / f"step_{step:08d}" / trainer.checkpoint_file,
                      folder / export):
            loaded = load_encoder(str(named), tmp_path, "target")
            assert (str(loaded.run_dir), loaded.label, loaded.step) == (str(folder), job, step), named
            assert all(torch.equal(v, weights[k]) for k, v in loaded.encoder.state_dict().items()), named
        if job == "finetune":
            assert "fine-tuned encoder, step 2" in loaded.source
            assert load_model(folder).fine_tuned and load_model(folder).step == 2  # HEAR serves it too
            for named in (folder, folder / export):
                with pytest.raises(EvalError, match="holds one encoder; the context encoder is in pretraining"):
                    load_encoder(str(named), tmp_path, "context")
    mine = tmp_path / "elsewhere" / "mine.safetensors"  # a copy outside any run: its own name, no run
    mine.parent.mkdir()
    mine.write_bytes((tmp_path / "pretrain" / "encoder.safetensors").read_bytes())
    loaded = load_encoder(str(mine), tmp_path, "target")
    assert (loaded.run_dir, loaded.label, loaded.step) == (None, "mine", 3)

    result = run_evaluate(cfg, str(tmp_path / "finetune" / "step_00000002"), stores[0])
    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == made["finetune"] and run.info.run_name.endswith("-finetune")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "probe/linear_acc")] == [2]
    assert result.results.parent.name == run.info.run_name and json.loads(result.results.read_text())["step"] == 2


def test_online_probe_needs_a_labelled_store_before_ray_starts(tmp_path, stores):
    from ajepa.train import pretrain

    labelled, unlabelled = stores
    cfg = micro_cfg("data.batch_size=4", "eval.every=2", f"run.out_dir={tmp_path}")
    with pytest.raises(ConfigError, match=f"eval.every=2: {unlabelled}: the train split has no labels"):
        pretrain.run_pretrain(cfg, store=unlabelled)
    assert not list(tmp_path.iterdir()), "nothing is written before the check"
    subset = ProbeSet.load(labelled, max_clips=2)  # evenly spaced: the first and last train clips
    train = data.load_store(labelled, "train")
    assert subset.arrays["train"].fbank.shape == (2, 128, 128)
    assert subset.arrays["train"].ids == [train.ids[0], train.ids[-1]]
