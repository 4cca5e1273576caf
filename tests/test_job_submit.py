"""`ray job submit --working-dir .` against a real head node: the job and its Ray Data workers import ajepa."""

from pathlib import Path

import pytest
import soundfile as sf
from conftest import ray_head, submit_job, tone

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_prepare_data_job_runs_on_a_submitted_cluster(tmp_path):
    src = tmp_path / "audio"
    for label in ("low", "high"):
        (src / label).mkdir(parents=True)
        for i in range(3):
            freq = 200.0 if label == "low" else 2000.0
            sf.write(src / label / f"{i}.wav", tone(1.0, 16000, freq=freq, seed=i), 16000)
    with ray_head(tmp_path / "home") as head:
        # The README's commands on a machine that has never run Ray: the token was made by
        # `ray get-auth-token --generate` in the fresh HOME.
        assert (tmp_path / "home" / ".ray" / "auth_token").read_text().strip() != ""
        done = submit_job(head, ["--working-dir", str(ROOT), "--", "python", "jobs/prepare_data.py", "--input",
                                 str(src), "--out", str(tmp_path / "store")])
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "6 clips written, 0 failed" in done.stdout
        assert (tmp_path / "store" / "stats.json").exists()
