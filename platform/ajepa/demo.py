"""`make demo` end to end: does pretraining help on the demo tasks?

Pretrains on the demo store, probes the random-init encoder and the pretrained one with the same frozen
protocol (eval.py), fine-tunes from scratch and from the pretrained encoder with the same recipe, and prints
one table. Every job is the ordinary one (its own run folder and MLflow run), so each number can be opened
and rerun on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ajepa import storage
from ajepa.config import Config
from ajepa.storage import Location


@dataclass
class DemoResult:
    table: str
    probes: dict[str, dict[str, float]]  # row name -> probe metrics
    finetuned: dict[str, dict[str, float]]  # row name -> fine-tuning metrics


def run_demo(cfg: Config, store: str | Path | Location | None = None) -> DemoResult:
    from ajepa.data import demo_store
    from ajepa.eval import run_evaluate
    from ajepa.train.finetune import run_finetune
    from ajepa.train.pretrain import run_pretrain

    if store is None:
        store, summary = demo_store(cfg.audio)
        if summary is not None:
            print(summary.line(), flush=True)
    store = storage.resolve(store)
    pretrained = run_pretrain(cfg, store=store)
    probes = {"random init": run_evaluate(cfg, "random", store).metrics,
              f"pretrained, {pretrained.step} steps": run_evaluate(cfg, str(pretrained.run_dir), store).metrics}
    finetuned = {"random init": run_finetune(cfg, "none", store=store).metrics,
                 f"pretrained, {pretrained.step} steps": run_finetune(cfg, str(pretrained.run_dir),
                                                                      store=store).metrics}
    return DemoResult(format_table(probes, finetuned), probes, finetuned)


def format_table(probes: dict[str, dict[str, float]], finetuned: dict[str, dict[str, float]]) -> str:
    """One row per encoder: frozen linear probe and kNN per task, then fine-tuned test accuracy (or mAP)."""
    first = next(iter(probes.values()))
    tasks = sorted({key.split("/")[1] for key in first if key.count("/") == 2}) or [""]
    metric = "map" if any(key.endswith("_map") for key in first) else "acc"
    tuned_metric = "map" if any(key.endswith("/map") for key in next(iter(finetuned.values()))) else "acc"

    def probe_key(task: str, kind: str) -> str:
        return f"probe/{task}/{kind}_{metric}" if task else f"probe/{kind}_{metric}"

    names = [task or "probe" for task in tasks]
    header = "".join(f"{name + ' linear':>20s}{name + ' kNN':>18s}" for name in names)
    lines = [f"{'encoder':24s}{header}{'fine-tuned (test)':>20s}"]
    for row in probes:
        m = probes[row]
        cells = "".join(f"{100 * m[probe_key(t, 'linear')]:19.1f}%{100 * m[probe_key(t, 'knn')]:17.1f}%" for t in tasks)
        tuned = finetuned.get(row, {}).get(f"test/{tuned_metric}")
        lines.append(f"{row:24s}{cells}{'' if tuned is None else f'{100 * tuned:19.1f}%'}")
    return "\n".join(lines)
