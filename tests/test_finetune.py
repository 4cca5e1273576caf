"""Fine-tuning: regularized masking and the optimizer groups without Ray (fast), bad input stopped before training,
then real Ray Train runs: metrics and artifacts in MLflow, a stopped run resumed, the from-scratch baseline."""

import json
import math
import re
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from ajepa import cli, data
from ajepa.config import ConfigError, load_config
from ajepa.models.classifier import Classifier, draw_token_masks
from ajepa.models.flops import classifier_flops
from ajepa.train import finetune, runs
from ajepa.train.finetune import Finetuner, Task
from ajepa.train.pretrain import Pretrainer
from conftest import MICRO, fake_batch, micro_cfg, write_low_high_tones
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
GRID = 8 * 8  # patch tokens of a 128-frame, 128-bin clip


@pytest.fixture
def attention_spy(monkeypatch):
    """Every SDPA call's attention weights (B, H, N, N), computed from its q, k and mask, and its mask."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        calls.append((logits.softmax(-1), attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_regularized_masking_hides_the_drawn_keys_in_every_layer_and_evaluation_attends_to_all(attention_spy):
    cfg = micro_cfg("finetune.drop_path=0")
    torch.manual_seed(0)
    model = Classifier(cfg.model, 3, 128, 128)
    x = torch.randn(2, 128, 128)
    masks = draw_token_masks("rm", 0.1, 2, GRID, cfg.model.depth, True, torch.Generator().manual_seed(0))
    assert masks.key_mask.shape == (cfg.model.depth, 2, GRID)
    assert (masks.key_mask.sum(-1) == math.ceil(0.1 * GRID)).all()  # 7 of 64 tokens in each clip and layer
    assert not torch.equal(masks.key_mask[0], masks.key_mask[1]), "redrawn per layer"
    model(x, masks)
    assert len(attention_spy) == cfg.model.depth
    for layer, (weights, _) in enumerate(attention_spy):
        hidden = masks.key_mask[layer][:, None, None, :].expand_as(weights)  # for every head and query
        assert (weights[hidden] == 0).all(), f"layer {layer} attends to a hidden key"
        assert (weights[~hidden] > 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    # One draw for all layers: what the hidden tokens hold reaches no other token, in any layer.
    shared = draw_token_masks("rm", 0.1, 2, GRID, cfg.model.depth, False, torch.Generator().manual_seed(1)).key_mask
    changed = x.clone()
    hidden_pixels = model._patch_pixels(shared, 128, 128)
    changed[hidden_pixels] = torch.randn(int(hidden_pixels.sum()))
    with torch.no_grad():
        before, after = model.encoder(x, key_mask=shared), model.encoder(changed, key_mask=shared)
    torch.testing.assert_close(before[~shared], after[~shared])
    assert not torch.allclose(before[shared], after[shared])  # they still pass the MLPs themselves

    attention_spy.clear()
    trainer = Finetuner(cfg, Task(["a", "b", "c"], False, "ce"), -8.0, 4.0, torch.device("cpu"))
    trainer.predict(fake_batch(0, 2)[0].numpy(), batch_size=2)
    assert attention_spy and all(mask is None for _, mask in attention_spy), "evaluation is full attention"
    attention_spy.clear()
    trainer.train_step(*fake_batch(0, 4), torch.tensor([0, 1, 2, 0]))
    assert len(attention_spy) == cfg.model.depth and all(mask is not None for _, mask in attention_spy)


def test_drop_and_zero_regularise_the_same_number_of_tokens():
    generator = torch.Generator().manual_seed(0)
    keep = draw_token_masks("drop", 0.1, 2, GRID, 2, True, generator).keep
    assert keep.shape == (2, GRID - 7) and (keep.diff(dim=1) > 0).all()  # sorted, no repeats
    zero = draw_token_masks("zero", 0.1, 2, GRID, 2, True, generator).zero
    assert (zero.sum(-1) == 7).all()
    assert draw_token_masks("none", 0.1, 2, GRID, 2, True, generator).key_mask is None
    model = Classifier(micro_cfg().model, 3, 128, 128)
    pixels = model._patch_pixels(zero, 128, 128)
    assert pixels.sum() == 2 * 7 * 16 * 16 and pixels[0].view(8, 16, 8, 16)[:, 0, :, 0].flatten().equal(zero[0])


def test_a_step_counts_the_model_flops_of_the_tokens_it_encodes():
    counted = {}
    for reg in ("none", "rm", "drop"):
        cfg = micro_cfg(f"finetune.token_reg={reg}", "finetune.token_ratio=0.25")
        trainer = Finetuner(cfg, Task(["a", "b", "c"], False, "ce"), -8.0, 4.0, torch.device("cpu"))
        counted[reg] = trainer.train_step(*fake_batch(0, 4), torch.tensor([0, 1, 2, 0]))
        assert trainer.peak_flops is None  # a CPU runs float32: no bf16 peak, no MFU
    # Masked keys cost the whole attention; dropping a quarter of the tokens leaves 48 of 64 to encode.
    assert counted["none"] == counted["rm"] == 4 * classifier_flops(micro_cfg().model, GRID, GRID, 3)
    assert counted["drop"] == 4 * classifier_flops(micro_cfg().model, GRID, 48, 3) < counted["none"]
    # MICRO's encoder (width 64, depth 2, 16x16 patches) by hand: patch conv, 2 blocks' linears and attention, head
    d, n = 64, 48
    assert classifier_flops(micro_cfg().model, GRID, n, 3) == 3 * (
        2 * GRID * 256 * d + 2 * (2 * n * d * (4 * d + 8 * d) + 4 * n * n * d) + 2 * d * 3)


def test_layer_wise_lr_decay_groups_and_the_head():
    cfg = micro_cfg("finetune.layer_decay=0.5", "finetune.weight_decay=0.01", "finetune.warmup_fraction=0")
    trainer = Finetuner(cfg, Task(["a", "b", "c"], False, "ce"), -8.0, 4.0, torch.device("cpu"))
    model = trainer.model
    assert model.head.weight.std() < 1e-4 and not model.head.bias.any()  # init std 2e-5
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()), "every parameter in exactly one group"
    scale_of = {id(p): g["lr_scale"] for g in groups.values() for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups.values() for p in g["params"]}
    depth = cfg.model.depth  # 2: patch embedding layer 0, blocks 1 and 2, norms and head 3
    assert scale_of[id(model.head.weight)] == 1.0 and scale_of[id(model.fc_norm.weight)] == 1.0
    assert scale_of[id(model.encoder.blocks[1].attn.qkv.weight)] == 0.5
    assert scale_of[id(model.encoder.blocks[0].mlp.fc1.weight)] == 0.25
    assert scale_of[id(model.encoder.patch_embed.proj.weight)] == 0.5 ** (depth + 1)
    assert decay_of[id(model.head.weight)] == 0.01 and decay_of[id(model.head.bias)] == 0.0
    assert decay_of[id(model.encoder.blocks[0].norm1.weight)] == 0.0
    trainer.set_schedules()
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(cfg.finetune.lr * group["lr_scale"])


@pytest.mark.parametrize("head_norm", ["layernorm", "batchnorm"])
def test_resume_from_a_checkpoint_is_exact(tmp_path, head_norm):
    """Same step, same draws (crop, SpecAugment, mixup, masked keys, drop path): the weights (and the head's
    running statistics) of an unbroken run."""
    cfg = micro_cfg("finetune.mixup=0.5", "finetune.steps=4", f"finetune.head_norm={head_norm}")
    task = Task(["a", "b", "c"], False, "ce")
    batches = [(*fake_batch(i, 4), torch.tensor([0, 1, 2, i % 3])) for i in range(4)]
    straight = Finetuner(cfg, task, -8.0, 4.0, torch.device("cpu"))
    for batch in batches:
        straight.train_step(*batch)
    first = Finetuner(cfg, task, -8.0, 4.0, torch.device("cpu"))
    for batch in batches[:2]:
        first.train_step(*batch)
    first.save(tmp_path / "finetune.pt")
    resumed = Finetuner(cfg, task, -8.0, 4.0, torch.device("cpu"))
    resumed.load(tmp_path / "finetune.pt")
    for batch in batches[2:]:
        resumed.train_step(*batch)
    ours, theirs = resumed.model.state_dict(), straight.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert ("feature_norm.running_mean" in theirs) == (head_norm == "batchnorm")


def test_batchnorm_head_standardises_the_pooled_features_over_the_batch_and_evaluates_on_running_statistics():
    torch.manual_seed(0)
    model = Classifier(micro_cfg().model, 3, 128, 128, head_norm="batchnorm")
    seen = []
    model.fc_norm.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x = torch.randn(6, 128, 128)
    model.train()
    model(x)
    torch.testing.assert_close(seen[0].mean(0), torch.zeros(seen[0].shape[1]), atol=1e-5, rtol=0)
    # var / (var + eps) per feature: the random encoder's pooled features vary little from clip to clip
    torch.testing.assert_close(seen[0].var(0, unbiased=False), torch.ones(seen[0].shape[1]), atol=0.05, rtol=0)
    model.eval()  # one clip alone gets the same output as in any batch: no batch statistics at evaluation
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), model(x)[:1])
    assert not list(model.feature_norm.parameters()), "no affine: nothing for the optimizer or layer decay"


def test_multi_label_trains_one_sigmoid_per_class_and_reports_average_precision():
    task = Task(["bird", "rain", "wind"], True, "bce")
    assert task.metric == "map" and task.targets(["bird;rain", "wind"]).tolist() == [[1, 1, 0], [0, 0, 1]]
    assert Task(["a", "b"], False, "bce").targets(["b", "a"]).tolist() == [[0, 1], [1, 0]]  # bce on one label
    trainer = Finetuner(micro_cfg(), task, -8.0, 4.0, torch.device("cpu"))
    fbank, n_frames = fake_batch(0, 4)
    targets = task.targets(["bird;rain", "wind", "rain", "bird;wind"])
    trainer.train_step(fbank, n_frames, targets)
    logits = torch.zeros(4, 3)
    assert trainer.loss(logits, targets).item() == pytest.approx(math.log(2))  # BCE, not softmax CE
    scores = trainer.predict(fbank.numpy(), batch_size=4)
    assert scores.shape == (4, 3) and ((scores > 0) & (scores < 1)).all()  # sigmoids, not a softmax
    rows = finetune.class_report(scores, task.labels(["bird;rain", "wind", "rain", "bird;wind"]))
    assert [(r["class"], r["support"]) for r in rows] == [("bird", 2), ("rain", 2), ("wind", 2)]
    assert all(0 < r["ap"] <= 1 for r in rows)


# ------------------------------------------------------------------------------------ stores and bad input


@pytest.fixture(scope="module")
def stores(tmp_path_factory, ray_local):
    """Real tone stores, each split labelled: low vs high (single-label), the same with a shared tag
    (multi-label), unlabelled, and one whose test split has a class train lacks."""
    root = tmp_path_factory.mktemp("finetune-data")
    rows = write_low_high_tones(root)
    manifests = {
        "labelled": rows,
        "multi": [(p, f"{lab};tone", s) for p, lab, s in rows],
        "unlabelled": [(p, "", s) for p, _, s in rows],
        "unseen": [(p, "mid" if s == "test" and lab == "low" else lab, s) for p, lab, s in rows],
    }
    audio = load_config(ROOT / "configs" / "tiny.yaml").audio
    built = {}
    for name, manifest in manifests.items():
        (root / f"{name}.csv").write_text("path,label,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in manifest))
        built[name] = data.build_store(root / f"{name}.csv", root / name, audio).out
    return built


def micro_checkpoint(folder: Path) -> Path:
    """A micro-model pretraining checkpoint of one step (the Ray-free step: what matters here is its format)."""
    trainer = Pretrainer(micro_cfg(), -8.0, 4.0, torch.device("cpu"))
    trainer.train_step([fake_batch(0)])
    (folder / "step_00000001").mkdir(parents=True)
    trainer.save(folder / "step_00000001" / "pretrain.pt")
    return folder / "step_00000001" / "pretrain.pt"


def finetune_job(out: Path, store: Path, checkpoint: str, *sets: str) -> list[str]:
    flags = [*MICRO, "data.batch_size=4", *sets]
    return ["finetune", "--config", str(ROOT / "configs" / "tiny.yaml"), "--checkpoint", checkpoint,
            "--data", str(store), "--out", str(out), *[a for flag in flags for a in ("--set", flag)]]


@pytest.mark.parametrize("case", ["other model size", "not a checkpoint", "no labels", "labels differ between splits",
                                  "multi-label store, single-label loss", "label subset under a batch"])
def test_bad_input_stops_before_training_naming_the_field_or_file(case, stores, tmp_path, capsys):
    checkpoint = str(micro_checkpoint(tmp_path / "pretrained"))
    out, store, sets = tmp_path / "runs", stores["labelled"], []
    if case == "other model size":  # the micro checkpoint (64 wide, 2 deep) with the tiny model (192, 4)
        sets, message = ["model.embed_dim=192", "model.depth=4", "model.num_heads=3"], (
            f"--checkpoint {checkpoint}: .* is another model size than the config's "
            r"\(model.embed_dim: config 192, checkpoint 64; model.depth: config 4, checkpoint 2; model.num_heads")
    elif case == "not a checkpoint":
        checkpoint = str(tmp_path / "notes.pt")
        Path(checkpoint).write_text("not a checkpoint")
        message = f"{checkpoint}: corrupt or unreadable checkpoint"
    elif case == "no labels":
        store, message = stores["unlabelled"], f"{stores['unlabelled']}: the train split has no labels"
    elif case == "labels differ between splits":
        store, message = stores["unseen"], f"{stores['unseen']}: split test has labels that train lacks: mid"
    elif case == "multi-label store, single-label loss":
        store, sets = stores["multi"], ["finetune.loss=ce"]
        message = f"finetune.loss: ce takes one label per clip, but {stores['multi']} is multi-label"
    else:  # 8 train clips of each label: a tenth keeps one of each, 2 clips for a batch of 4
        sets = ["finetune.train_fraction=0.1"]
        message = f"finetune.train_fraction: 0.1 of {store}'s train clips is 2, less than one batch of 4"
    assert cli.main(finetune_job(out, store, checkpoint, *sets)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not out.exists(), "nothing is written before the checks"


@pytest.mark.parametrize("job", [["finetune"], ["sweep", "--job", "finetune", "--space", "finetune"]])
def test_a_missing_encoder_is_refused_before_the_demo_store_is_built(job, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AJEPA_CACHE", str(tmp_path / "cache"))  # no demo store yet: it would take minutes to build
    nowhere = tmp_path / "nowhere"
    assert cli.main([*job, "--checkpoint", str(nowhere), "--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --checkpoint {nowhere}: no run, checkpoint or export there")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------ real Ray Train


def ray_cfg(tmp_path, *extra):
    # Batches of 2: the 16 training clips last the 6 steps, with no new epoch (a Ray Data shuffle, seconds).
    return micro_cfg("data.batch_size=2", "run.cpus_per_worker=0.5", "run.torch_threads=1", "run.log_every=2",
                     "run.checkpoint_every=2", "finetune.steps=6", "finetune.eval_every=3", f"run.out_dir={tmp_path}",
                     *extra)


def history(result, key):
    """Every logged step of a metric, repeats included."""
    client = mlflow.MlflowClient(result.tracking_uri)
    return sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, key))


@pytest.mark.slow
def test_finetune_run_logs_metrics_and_artifacts_to_mlflow(tmp_path, stores, capsys):
    checkpoint = micro_checkpoint(tmp_path / "pretrained")
    # Half the train clips of each label (8 of 16): the low-label setting, through the Ray Train read path.
    cfg = ray_cfg(tmp_path, "run.workers=1", "finetune.mixup=0.5", "finetune.train_fraction=0.5")
    result = finetune.run_finetune(cfg, str(checkpoint), store=stores["labelled"])
    assert f"data {stores['labelled']} (8 of its 16 train clips)" in capsys.readouterr().out
    assert result.step == 6 and result.checkpoint.name == "step_00000006"
    assert history(result, "val/acc") == [3, 6] and history(result, "loss") == [2, 3, 4, 6]
    assert history(result, "model_tflops") == [2, 3, 4, 6] and history(result, "mfu") == []  # no MFU on a CPU
    assert 0 <= result.metrics["test/acc"] <= 1 and result.metrics["val/best_acc"] >= result.metrics["val/acc"]
    client = mlflow.MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ajepa.job"] == "finetune"
    assert str(checkpoint) in run.data.params["checkpoint"] and run.data.params["finetune.loss_used"] == "ce"
    assert run.data.params["data.train_clips"] == "8" and run.data.params["finetune.train_fraction"] == "0.5"
    assert {"config.yaml", "model.safetensors", "test"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"test/confusion.png", "test/per_class.txt", "test/per_class.json"} == {
        a.path for a in client.list_artifacts(run.info.run_id, "test")}
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "test/per_class.json", str(tmp_path)))
                        .read_text())["classes"]
    assert [r["class"] for r in report] == ["high", "low"] and sum(r["support"] for r in report) == 8
    model = Classifier(micro_cfg().model, 2, 128, 128)
    model.load_state_dict(load_file(str(result.model)))  # the export is the whole fine-tuned classifier


@pytest.mark.slow
def test_stopped_finetune_resumes_at_its_checkpoint_from_scratch_baseline(tmp_path, stores, monkeypatch):
    from ray.train import TrainingFailedError

    monkeypatch.setenv(runs.FAULT_ENV, "5")  # the worker dies after step 5, one step after the step-4 checkpoint
    cfg = ray_cfg(tmp_path, "run.workers=1", "run.name=stopped", "run.max_failures=0")
    with pytest.raises(TrainingFailedError):
        finetune.run_finetune(cfg, "none", store=stores["labelled"])
    assert [p.name for p in runs.local_checkpoints(tmp_path / "stopped")] == ["step_00000002", "step_00000004"]
    monkeypatch.delenv(runs.FAULT_ENV)
    # Resumed in-process (run.workers=0: no worker actors to start), from the checkpoints the workers left.
    result = finetune.run_finetune(load_config(None, [f"run.out_dir={tmp_path}"]), resume="stopped",
                                   overrides=["run.workers=0"])
    assert result.step == 6 and result.source.startswith("none (random init")
    with pytest.raises(ConfigError, match=re.escape("--resume stopped: finetune.head_norm batchnorm (the run's is "
                                                    "layernorm): a resumed run keeps the model")):
        finetune.run_finetune(load_config(None, [f"run.out_dir={tmp_path}"]), resume="stopped",
                              overrides=["finetune.steps=8", "finetune.head_norm=batchnorm"])
    with pytest.raises(ConfigError, match=re.escape(f"--resume stopped: --checkpoint {tmp_path} is not the encoder "
                                                    "the run started from (none); a resumed run keeps it")):
        finetune.run_finetune(load_config(None, [f"run.out_dir={tmp_path}"]), str(tmp_path), resume="stopped",
                              overrides=["finetune.steps=8"])
    # Logged at every log step (2) and eval step (3), each once: the resumed run started at step 4.
    assert history(result, "loss") == [2, 3, 4, 6] and history(result, "val/acc") == [3, 6]

    # Stopped again after the last checkpoint, before the export: --resume finishes it with the test metrics
    # its last step logged, and trains nothing.
    exported = load_file(str(result.model))
    result.model.delete()
    mlflow.MlflowClient(result.tracking_uri).set_terminated(result.mlflow_run_id, "KILLED")
    finished = finetune.run_finetune(load_config(None, [f"run.out_dir={tmp_path}"]), resume="stopped")
    assert finished.step == 6 and finished.metrics == result.metrics and "test/acc" in finished.metrics
    weights = load_file(str(finished.model))
    assert weights.keys() == exported.keys() and all(torch.equal(weights[k], exported[k]) for k in weights)
    assert history(result, "loss") == [2, 3, 4, 6]
    assert mlflow.MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).info.status == "FINISHED"


def test_an_encoder_named_by_its_run_is_pinned_to_the_checkpoint_the_run_started_from(tmp_path, stores, capsys):
    """--checkpoint <pretraining run> is that run's newest checkpoint when fine-tuning starts; a resume reads that
    same file, though the pretraining run has saved a newer one since."""
    started_from = micro_checkpoint(tmp_path / "pre")
    (tmp_path / "pre" / "run.json").write_text(json.dumps({"name": "pre"}))
    cfg = ray_cfg(tmp_path, "run.workers=0", "run.name=ft", "finetune.steps=2", "finetune.eval_every=0")
    finetune.run_finetune(cfg, "pre", store=stores["labelled"])
    record = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert (record["checkpoint"], record["encoder"]) == ("pre", str(started_from))
    newer = tmp_path / "pre" / "step_00000009" / "pretrain.pt"  # the pretraining run trained on
    newer.parent.mkdir()
    newer.write_bytes(started_from.read_bytes())
    capsys.readouterr()
    result = finetune.run_finetune(load_config(None, [f"run.out_dir={tmp_path}"]), resume="ft",
                                   overrides=["finetune.steps=4"])
    assert result.step == 4 and f"encoder {started_from} (target encoder, step 1)" in capsys.readouterr().out
    assert finetune.pretrained_encoder(cfg, "pre")[2] == str(newer)  # a new run would start from the newest
    started_from.unlink()  # the pretraining run kept only its newest: the resume's weights are the run's own
    result = finetune.run_finetune(load_config(None, [f"run.out_dir={tmp_path}"]), resume="ft",
                                   overrides=["finetune.steps=6"])
    assert result.step == 6 and f"encoder {newer} (target encoder, step 1)" in capsys.readouterr().out
