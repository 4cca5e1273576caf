"""Search space files for sweeps (sweep.py): config keys mapped to distributions, checked against a config.

A file maps config keys to one distribution each (`search_spaces/*.yaml`):

    mask.schedule: {choice: [curriculum, rb, tf]}        # one of the values, drawn per sample
    mask.context_scale: {grid: [[0.85, 1.0], [0.7, 1.0]]}  # every value, each with every sample
    optim.lr: {loguniform: [1.0e-4, 1.0e-3]}             # real in [lo, hi], uniform in log space
    mask.c0: {uniform: [0.01, 0.3]}                      # real in [lo, hi]
    mask.random_target_ratio: {quniform: [0.3, 0.7, 0.1]}  # uniform in [lo, hi], rounded to a multiple of q
    mask.tf_num_targets: {randint: [2, 4]}               # integer in [lo, hi], both included

Every key, range and value is checked against the base config, and each value by the job's own checks (masks,
store), before any trial starts: an error names the file and the key. Ranges fit real fields and randint integer
ones; tuples (ranges such as mask.context_scale), strings and booleans take choice or grid.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ajepa.config import Config, ConfigError, config_from_dict

KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
RANGE_KINDS = {"uniform": float, "loguniform": float, "quniform": float, "randint": int}
# What a space may not sweep, and why: where and under which names runs are written, the resources that size
# the number of concurrent trials, and the steps every trial shares (ASHA compares trials at equal steps).
FIXED_KEYS = {
    "run.name": "trials are named by the sweep", "run.out_dir": "trials live in the sweep's folder",
    "run.experiment": "a sweep's runs share one MLflow experiment", "data.store": "use --data",
    "run.workers": "trial resources set the number of concurrent trials",
    "run.cpus_per_worker": "trial resources set the number of concurrent trials",
    "run.gpus_per_worker": "trial resources set the number of concurrent trials",
    "optim.steps": "every trial runs the same steps (--steps)",
    "finetune.steps": "every trial runs the same steps (--steps)",
}
SEED_KEY = "run.seed"


# ---------------------------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class Param:
    """One swept config key: `args` are a choice's or grid's values, or a range's lo, hi (and q)."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def describe(self) -> str:
        """`choice[curriculum, rb]`, `loguniform[0.0001, 0.001]`: the param the parent run logs for this key."""
        return f"{self.kind}[{', '.join(_text(a) for a in self.args)}]"

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "randint":
            return tune.randint(self.args[0], self.args[1] + 1)  # Tune's upper bound is exclusive
        return getattr(tune, self.kind)(*self.args)

    @property
    def numeric(self) -> bool:
        return self.kind in RANGE_KINDS


@dataclass(frozen=True)
class SearchSpace:
    source: str
    params: tuple[Param, ...]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def grid_size(self) -> int:
        return math.prod(len(p.args) for p in self.params if p.kind == "grid")

    def check(self, base: Config, check: Callable[[Config], None]) -> None:
        """Each choice and grid value, and each end of a range, set on `base` must make a valid config that
        `check` (the job's own checks: masks, store) accepts; the error names the file, the key and the value."""
        base_dict = base.to_dict()
        for param in self.params:
            for value in (param.args if param.kind in ("choice", "grid") else param.args[:2]):
                try:
                    check(with_params(base_dict, {param.key: value}))
                except ConfigError as exc:
                    raise ConfigError(f"{self.source}: {param.key}: the value {_text(value)} is refused "
                                      f"({exc})") from None

    def param_space(self, seeds: list[int]) -> dict[str, Any]:
        """Tune's param_space: the swept keys, and run.seed as a grid over `seeds` when there are several."""
        from ray import tune

        space = {p.key: p.tune_domain() for p in self.params}
        if len(seeds) > 1:
            space[SEED_KEY] = tune.grid_search(seeds)
        return space


def _text(value: Any) -> str:
    """A value as the space file writes it: rb, 0.0001, [0.85, 1.0]."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def with_params(base: dict[str, Any], params: dict[str, Any], source: str = "") -> Config:
    """The config `base` (Config.to_dict()) with `params` (`section.key: value`) set, validated; errors name
    `source` first, when given."""
    data = {section: dict(values) for section, values in base.items()}
    for key, value in params.items():
        section, name = key.split(".")
        data[section][name] = _plain(value)
    return config_from_dict(data, source=source)


def _plain(value: Any) -> Any:
    """Tune's draws as YAML would give them: numpy scalars as Python numbers, a quantised float without the
    rounding noise of `round(x / q) * q` (0.30000000000000004)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.12g}")
    return value


def load_space(path: str | Path, base: Config, seeds: int = 1) -> SearchSpace:
    """Read and check a search space file. Every error is a ConfigError naming the file and the key: an unknown
    or fixed key, a malformed distribution, a bad range, a kind that does not fit the field's type, and a value
    the config would refuse (each choice and grid value, each end of a range). `SearchSpace.check` adds the
    job's own checks."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read search space ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping of config keys to distributions, e.g. "
                          "mask.schedule: {choice: [rb, tf]}")
    params = tuple(_param(path, str(key), spec) for key, spec in data.items())
    if seeds > 1 and SEED_KEY in data:
        raise ConfigError(f"{path}: {SEED_KEY}: --seeds {seeds} repeats every configuration over run.seed; "
                          "sweep it or use --seeds, not both")
    space = SearchSpace(str(path), params)
    space.check(base, lambda cfg: None)
    return space


def _param(path: Path, key: str, spec: Any) -> Param:
    def fail(message: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {message}")

    field_type = _field_type(path, key)
    if key in FIXED_KEYS:
        raise fail(f"cannot be swept ({FIXED_KEYS[key]})")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise fail(f"expected one of {', '.join(KINDS)} as {{kind: arguments}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise fail(f"{kind} takes a list, got {args!r}")
    if kind in ("choice", "grid"):
        if len(args) != len({_text(a) for a in args}):
            raise fail(f"{kind} lists a value twice: {args!r}")
        return Param(key, kind, tuple(args))
    wanted = RANGE_KINDS[kind]
    if field_type is not wanted:
        raise fail(f"{kind} draws {'integers' if wanted is int else 'reals'}, but the field holds "
                   f"{getattr(field_type, '__name__', field_type)}: use "
                   f"{'randint' if field_type is int else 'choice or grid'}")
    size = 3 if kind == "quniform" else 2
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if len(args) != size or not numbers or (kind == "randint" and not all(isinstance(a, int) for a in args)):
        shape = "[lo, hi, q]" if kind == "quniform" else "[lo, hi]"
        raise fail(f"{kind} takes {shape} {'integers' if kind == 'randint' else 'numbers'}, got {args!r}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise fail(f"{kind} range [{lo}, {hi}] is empty: lo must be below hi")
    if kind == "loguniform" and lo <= 0:
        raise fail(f"loguniform needs lo > 0, got {lo}")
    if kind == "quniform":
        q = args[2]
        if q <= 0 or not all(math.isclose(v / q, round(v / q), abs_tol=1e-9) for v in (lo, hi)):
            raise fail(f"quniform needs q > 0 with lo and hi multiples of q, got {args!r}")
    return Param(key, kind, tuple(float(a) if wanted is float else a for a in args))


def _field_type(path: Path, key: str) -> Any:
    sections = typing.get_type_hints(Config)
    section, _, name = key.partition(".")
    if section not in sections or "." in name:
        raise ConfigError(f"{path}: unknown key {key} (keys are section.field, sections: "
                          f"{', '.join(sections)})")
    fields = typing.get_type_hints(sections[section])
    if name not in fields:
        raise ConfigError(f"{path}: unknown key {key} (known in {section}: {', '.join(fields)})")
    return fields[name]
