"""`make demo`'s table (the jobs it runs have their own tests) and its entry point's defaults."""

from pathlib import Path

from ajepa import cli
from ajepa.config import load_config
from ajepa.demo import format_table

ROOT = Path(__file__).resolve().parents[1]


def test_table_has_one_row_per_encoder_with_each_task_and_the_fine_tuned_score():
    probes = {name: {f"probe/{t}/{k}_acc": v + d for t, d in (("instruments", 0.0), ("words", 0.1))
                     for k in ("linear", "knn")} | {"probe/linear_acc": 0.0, "probe/knn_acc": 0.0}
              for name, v in (("random init", 0.2), ("pretrained, 200 steps", 0.3))}
    tuned = {"random init": {"test/acc": 0.25}, "pretrained, 200 steps": {"test/acc": 0.5}}
    lines = format_table(probes, tuned).splitlines()
    assert lines[0].split() == ["encoder", "instruments", "linear", "instruments", "kNN", "words", "linear", "words",
                                "kNN", "fine-tuned", "(test)"]
    assert lines[1].split() == ["random", "init", "20.0%", "20.0%", "30.0%", "30.0%", "25.0%"]
    assert lines[2].split() == ["pretrained,", "200", "steps", "30.0%", "30.0%", "40.0%", "40.0%", "50.0%"]


def test_single_task_store_and_multi_label_metrics():
    probes = {"random init": {"probe/linear_map": 0.5, "probe/knn_map": 0.25}}
    lines = format_table(probes, {"random init": {"test/map": 0.75}}).splitlines()
    assert lines[1].split() == ["random", "init", "50.0%", "25.0%", "75.0%"]


def test_demo_job_runs_the_demo_config_which_extends_tiny():
    args = cli._parser().parse_args(["demo"])
    assert args.config == ROOT / "configs" / "demo.yaml" and args.func is cli.run_demo
    demo, tiny = load_config(args.config), load_config(ROOT / "configs" / "tiny.yaml")
    assert demo.model == tiny.model and demo.optim == tiny.optim
    assert (demo.finetune.time_mask, demo.finetune.freq_mask) == (24, 24)
