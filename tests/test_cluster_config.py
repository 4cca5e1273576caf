"""cluster.yaml: valid for the installed Ray's cluster launcher, and the properties docs/cluster.md promises.
Checked offline (schema, defaults, shell syntax); no cloud is touched."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def commands(cluster: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in cluster[key]]


def test_validates_as_ray_up_validates_it(cluster):
    """`ray up` fills in the provider's defaults, merges the setup commands, then checks the schema; the cloud
    look-ups in between (instance types' resources, key pair, subnets) need AWS and are skipped."""
    assert SCHEMA.exists()
    jsonschema.validate(cluster, json.loads(SCHEMA.read_text()))  # as written, before any defaults
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_a_misspelt_key_fails_validation(cluster):
    """The check above has teeth: the schema forbids unknown keys."""
    broken = copy.deepcopy(cluster)
    broken["docker"]["run_option"] = broken["docker"].pop("run_options")
    with pytest.raises(jsonschema.ValidationError, match="run_option"):
        validate_config(prepare_config(broken))


def test_the_image_runs_the_installed_ray_and_python(cluster):
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-{py}-gpu"


def test_every_node_type_has_a_current_ami_bucket_access_and_disk(cluster):
    for name, node_type in cluster["available_node_types"].items():
        node = node_type["node_config"]
        # Not Ray's fallback (its old default DLAMI): the current Deep Learning Base GPU AMI, Ubuntu 22.04.
        assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in node["ImageId"], name
        assert node["IamInstanceProfile"]["Name"], name
        (root,) = node["BlockDeviceMappings"]
        assert root["DeviceName"] == "/dev/sda1" and root["Ebs"]["VolumeSize"] >= 300, name
    assert cluster["available_node_types"][cluster["head_node_type"]]["max_workers"] == 0


def test_the_checkout_is_copied_without_ignored_files(cluster):
    assert cluster["file_mounts"]["/home/ray/ajepa"] == "."
    assert ".gitignore" in cluster["rsync_filter"] and "**/.git" in cluster["rsync_exclude"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in ignored and "runs/" in ignored
    # Installed once per node from that copy, with its pinned dependencies.
    assert "pip install --quiet -e /home/ray/ajepa" in cluster["setup_commands"]


def test_token_auth_on_every_node_and_the_dashboard_on_localhost(cluster):
    assert "-e RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    (head_start,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start and "--port=6379" in head_start
    assert all("0.0.0.0" not in c for c in commands(cluster) if "ray start" in c)
    (worker_start,) = [c for c in cluster["worker_start_ray_commands"] if "ray start" in c]
    assert "--address=$RAY_HEAD_IP:6379" in worker_start
    assert all("--object-spilling-directory=/ray-spill" in c for c in (head_start, worker_start))


def test_jobs_on_every_node_reach_the_mlflow_server_on_the_head(cluster):
    (server,) = [c for c in cluster["head_start_ray_commands"] if "mlflow server" in c]
    assert "--port 5000" in server and "--backend-store-uri sqlite:////home/ray/mlflow/" in server
    assert "--artifacts-destination s3://" in server
    assert "-v /home/ubuntu/mlflow:/home/ray/mlflow" in cluster["docker"]["head_run_options"]  # on the head's disk
    # The head's private address, never localhost: the driver hands the URI to Train workers on other nodes.
    assert any("MLFLOW_TRACKING_URI=http://$(python" in c and ":5000" in c for c in cluster["head_setup_commands"])
    assert any("MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in c for c in cluster["worker_setup_commands"])
    assert any("ajepa_env" in c and ".bashrc" in c for c in cluster["setup_commands"])


def test_every_command_is_valid_shell(cluster):
    for cmd in commands(cluster):
        done = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd}\n{done.stderr}"
