"""Progress output: a bar redrawn in place on a terminal, plain lines elsewhere; the store build's for real."""

import io
import os
import re
import sys
import time
from pathlib import Path

from ajepa.progress import Progress, duration, polling
from conftest import run_in_terminal
from test_store import make_folder

ROOT = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_duration():
    assert [duration(s) for s in (0, 44.6, 60, 185, 3599, 7380, -3)] == [
        "0s", "45s", "1m00s", "3m05s", "59m59s", "2h03m", "0s"]


def test_plain_lines_say_done_total_fields_and_eta():
    out = io.StringIO()
    bar = Progress("pretrain:", 200, "steps", stream=out)
    bar.update(40, "loss 0.4119, lr 1.97e-04", eta_s=72)
    bar.update(200, "loss 0.1645, lr 1.02e-06", eta_s=0)
    bar.close()
    assert out.getvalue() == ("pretrain: 40/200 steps, loss 0.4119, lr 1.97e-04, ETA 1m12s\n"
                              "pretrain: 200/200 steps, loss 0.1645, lr 1.02e-06, ETA 0s\n")


def test_plain_lines_are_throttled_and_eta_follows_the_rate():
    out = io.StringIO()
    bar = Progress("store build:", 100, "clips", every_s=3600, stream=out)
    bar.update(50, "0 failed")
    assert out.getvalue() == ""  # nothing until every_s has passed
    bar.start -= 10  # 50 clips in 10 s: 5 clips/s, 50 to go
    bar.every_s = 0
    bar.update(50, f"{bar.rate(50):.1f} clips/s, 0 failed")
    assert out.getvalue() == "store build: 50/100 clips, 5.0 clips/s, 0 failed, ETA 10s\n"


def test_terminal_bar_is_redrawn_in_place_and_kept_lines_stay_above_it():
    out = Terminal()
    bar = Progress("pretrain:", 20, "steps", keep=True, stream=out)
    bar.update(5, "loss 1.0000", eta_s=30)
    bar.close()
    line = "pretrain: 5/20 steps, loss 1.0000, ETA 30s"
    assert out.getvalue() == f"\r\x1b[K{line}\n\r\x1b[K[#####...............] {line}\n"
    out = Terminal()
    bar = Progress("store build:", 4, "clips", every_s=3600, stream=out)
    bar.update(1, "0 failed", eta_s=3)
    bar.update(4, "1 failed", eta_s=0)
    assert out.getvalue() == ("\r\x1b[K[#####...............] store build: 1/4 clips, 0 failed, ETA 3s"
                              "\r\x1b[K[####################] store build: 4/4 clips, 1 failed, ETA 0s")


def test_polling_runs_beside_the_body_and_once_after_it():
    calls = []
    with polling(lambda: calls.append(time.monotonic()), interval_s=0.05):
        time.sleep(0.3)
    assert len(calls) >= 4
    calls.clear()
    try:
        with polling(lambda: calls.append(1), interval_s=10):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert calls == []  # an interrupted body gets no final poll


def test_store_build_shows_a_bar_on_a_terminal(tmp_path):
    # In a pipe, plain lines: test_store's job test.
    src = make_folder(tmp_path / "in")
    job = [sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "--input", str(src), "--out", str(tmp_path / "a")]
    code, shown = run_in_terminal(job, {**os.environ, "COLUMNS": "200"}, timeout=300)
    assert code == 0, shown
    bar = re.findall(r"\r\x1b\[K(\[[#.]{20}\] store build: \d+/8 clips, [\d.]+ clips/s, \d failed, ETA \w+)", shown)
    assert bar and bar[-1].startswith("[####################] store build: 8/8 clips") and "5 failed" in bar[-1]
    assert re.search(rf"\n3 clips written, 5 failed \(train \d, val \d, test \d\) -> {tmp_path / 'a'}\n", shown)
