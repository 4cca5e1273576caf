"""Store build time of the demo dataset: this tree against a baseline commit, side by side.

Both sides build the same demo manifest (2,080 one-second clips: instrument notes and spoken digits, rendered
once into a temporary cache) with the demo config's audio settings, each in its own process from its own tree:
start Ray, then time `build_store` alone (Ray's start-up is printed apart, not counted). With more rounds the
sides take turns to go first, and each side's figure is its median. The baseline, by default bfcbbd0, opened
absolute local paths inside the build's tasks; this tree lists through the input's filesystem and reads the
bytes in a step of their own before decoding.

    python benchmarks/store_build.py [--baseline bfcbbd0] [--rounds 1]

The last line printed is `ratio: <ours seconds / baseline seconds>` (below 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from epoch_boundary import baseline_tree

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process with the tree's library first on the path: one build, timed without Ray's start-up.
# An optional 4th argument caps the local Ray's CPUs (benchmarks/scaling.py; older trees' init_ray takes it too);
# with a 5th, `again`, a second build follows in the same Ray, timed too: its tasks find their worker processes
# started and torch imported, as all but the first few tasks of a large build do.
BUILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1] + "/platform")
from ajepa.config import load_config
from ajepa.data import build_store
from ajepa.runtime import init_ray
started = time.perf_counter()
init_ray(int(sys.argv[4]) or None if len(sys.argv) > 4 else None)  # 0: no cap
ready = time.perf_counter()
audio = load_config(sys.argv[1] + "/configs/demo.yaml").audio
summary = build_store(sys.argv[2], sys.argv[3], audio)
result = {"ray_start_s": ready - started, "build_s": time.perf_counter() - ready, "written": summary.written}
if sys.argv[5:] == ["again"]:
    again = time.perf_counter()
    build_store(sys.argv[2], sys.argv[3] + "-again", audio)
    result["again_s"] = time.perf_counter() - again
print(json.dumps(result))
"""


def demo_manifest(cache: Path) -> Path:
    """The demo manifest, rendered into `cache` by this tree (both sides read the same files)."""
    sys.path.insert(0, str(ROOT / "platform"))
    os.environ["AJEPA_CACHE"] = str(cache)
    from ajepa.data import demo_manifest

    return demo_manifest()


def build(tree: Path, manifest: Path, out: Path, num_cpus: int | None = None, again: bool = False
          ) -> dict[str, float]:
    """One build of `manifest` by `tree` in a fresh process; `num_cpus` caps a new local Ray's CPUs (it has no
    effect on a cluster the process joins: RAY_ADDRESS=local makes it start its own); `again` times a second
    build into `<out>-again` in the same Ray (`again_s`)."""
    extra = ([] if num_cpus is None and not again else [str(num_cpus or 0)]) + (["again"] if again else [])
    done = subprocess.run([sys.executable, "-c", BUILD, str(tree), str(manifest), str(out), *extra],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"build from {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="bfcbbd0", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ajepa-store-bench-") as tmp:
        tmp_path = Path(tmp)
        manifest = demo_manifest(tmp_path / "cache")
        sides = {"ours": ROOT, "baseline": baseline_tree(args.baseline, tmp_path)}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name in sorted(sides, reverse=r % 2 == 1):  # baseline first, then ours first, ...
                result = build(sides[name], manifest, tmp_path / f"store-{name}-{r}")
                times[name].append(result["build_s"])
                rate = result["written"] / result["build_s"]
                print(f"round {r + 1} {name}: {result['written']} clips in {result['build_s']:.1f} s ({rate:.1f} "
                      f"clips/s; Ray start-up {result['ray_start_s']:.1f} s)", flush=True)
        ours, baseline = statistics.median(times["ours"]), statistics.median(times["baseline"])
        print(f"median build: ours {ours:.1f} s, baseline ({args.baseline}) {baseline:.1f} s")
        print(f"ratio: {ours / baseline:.3f}")


if __name__ == "__main__":
    main()
