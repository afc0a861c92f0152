"""The Kubernetes deployment: the work pool's Job renders, as Prefect's Kubernetes worker
renders it, into manifests that the Kubernetes schemas accept; every node's launch line."""

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "cluster-job-template.json"
K8S_VERSION = "1.33.0"  # Job successPolicy is GA from 1.33


def render(values: dict) -> dict:
    """The Job the `cluster` pool's worker creates: the template's defaults and `values`
    applied (prefect.utilities.templating), then what prefect-kubernetes adds: the command
    as args, the flow run's env before the template's."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    defaults = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    job = apply_values(template["job_configuration"]["job_manifest"], defaults | values)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["args"] = shlex.split(container["args"])
    env = [{"name": k, "value": v} for k, v in values.get("env", {}).items()]
    container["env"] = env + container["env"]
    return job


RUN = {
    "name": "train-poly-inr-brave-fox",
    "namespace": "ml",
    "labels": {"prefect.io/flow-run-id": "0b3c"},
    "command": "prefect flow-run execute",
    "env": {"PREFECT__FLOW_RUN_ID": "0b3c"},
    "nodes": 4,
    "gpus": 8,
}


def test_cluster_job_and_its_service_validate_against_the_kubernetes_schemas():
    """The rendered indexed Job (4 pods, 8 GPUs each, pod 0's success ends the Job) and
    deploy/k8s/*.yaml pass kubernetes-validate's strict schemas; no placeholder is left."""
    import kubernetes_validate

    job = render(RUN)
    assert "{{" not in json.dumps(job)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["args"] == ["prefect", "flow-run", "execute"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/app/weights"] == "weights" and mounts["/work"] == "work"
    assert pod["terminationGracePeriodSeconds"] >= 300  # time for the pre-emption checkpoint

    services = []
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            services += [doc] if doc["kind"] == "Service" else []
    (service,) = services
    assert service["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == service["metadata"]["name"]
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())


def test_a_broken_job_is_rejected_by_the_validator():
    """The validator is not a rubber stamp: Job fields in the pod spec (the old template's
    mistake) and a string where an integer belongs are errors."""
    import kubernetes_validate

    job = render(RUN)
    job["spec"]["template"]["spec"]["parallelism"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    job = render(RUN | {"nodes": "four"})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


@pytest.mark.parametrize("index", ["0", "2"])
def test_pod_zero_runs_the_flow_and_the_others_follow_its_rendezvous(index, tmp_path):
    """The container's shell line, run with a stand-in `torchrun` on PATH: pod 0 execs the
    flow command with POLYINR_TRAIN_LAUNCHER pointing torchrun at its own c10d endpoint;
    other pods run `torchrun ... polyinr train --follow` against the same endpoint."""
    container = render(RUN)["spec"]["template"]["spec"]["containers"][0]
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "torchrun $*"; kill -TERM $PPID\n')  # one round, then stop
    fake.chmod(0o755)
    env = {
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "JOB_NAME": "train-poly-inr-brave-fox-x7k2p",
        "JOB_COMPLETION_INDEX": index,
    }
    flow = ["sh", "-c", 'echo "flow: $* | $POLYINR_TRAIN_LAUNCHER"', "-", *container["args"]]
    script = container["command"][2].replace("cd /work;", f"cd {tmp_path};")
    proc = subprocess.run(
        ["/bin/sh", "-c", script, "polyinr-node", *flow],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    rdzv = (
        "--nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d "
        "--rdzv-endpoint=train-poly-inr-brave-fox-x7k2p-0.polyinr-train:29400 "
        "--rdzv-id=train-poly-inr-brave-fox-x7k2p"
    )
    if index == "0":
        assert proc.stdout == f"flow: prefect flow-run execute | torchrun {rdzv} --no-python\n"
    else:
        assert proc.stdout == f"torchrun {rdzv} --no-python polyinr train --follow\n"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_equal_one_node_and_one_process(tmp_path):
    """The cluster's launch on one machine: two torchrun "nodes" (1 rank each, c10d
    rendezvous on 127.0.0.1, gloo), the second following the first (`--follow`: no params of
    its own, in another folder), end with the generator of 2 ranks on one node, bit for bit
    (weights sha256), and of 1 process up to float rounding (its batch split differs)."""
    import sys

    import torch
    from test_train import tiny_overrides

    from polyinr import data
    from polyinr.core import config
    from polyinr.model.generator import load_generator

    bin_dir = Path(sys.executable).parent
    params = str(ROOT / "params.yaml")
    common = tiny_overrides(tmp_path, kimg=0.032) + ["discriminator.diffaugment=''"]
    cfg = config.load(params, common)
    data.make_demo_dataset(Path(cfg.data.source), 2, 8, 24, 0)
    data.prepare(cfg.data, [16], progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def train_cmd(name: str, batch_gpu: int) -> list[str]:
        where = tmp_path / name
        where.mkdir()
        overrides = [o for o in common if not o.startswith(("storage.uri", "tracking.uri"))]
        overrides += [
            f"storage.uri={where / 'checkpoints'}",
            f"tracking.uri=sqlite:///{where / 'mlflow.db'}",
            f"train.batch_gpu={batch_gpu}",
        ]
        return ["polyinr", "train", "--quiet", "--params", params, *overrides]

    def torchrun(nnodes: int, nproc: int, port: int) -> list[str]:
        return [
            str(bin_dir / "torchrun"),
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=polyinr-test",
            "--no-python",
        ]

    def summary(proc) -> dict:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    port = _free_port()
    leader = subprocess.Popen(
        torchrun(2, 1, port) + train_cmd("nodes", 2),
        cwd=tmp_path / "nodes",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    (tmp_path / "follower").mkdir()
    follower = subprocess.Popen(
        torchrun(2, 1, port) + ["polyinr", "train", "--quiet", "--follow"],
        cwd=tmp_path / "follower",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    nodes = summary(leader)
    follower.communicate(timeout=120)
    assert follower.returncode == 0
    assert not any((tmp_path / "follower").iterdir())  # it worked in the leader's folder

    node = subprocess.Popen(
        torchrun(1, 2, _free_port()) + train_cmd("node", 2),
        cwd=tmp_path / "node",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    one_node = summary(node)
    single = subprocess.Popen(
        train_cmd("single", 4),
        cwd=tmp_path / "single",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    one_process = summary(single)

    assert nodes["cur_nimg"] == one_node["cur_nimg"] == one_process["cur_nimg"] == 32
    assert nodes["weights_sha256"] == one_node["weights_sha256"]
    g_nodes, _ = load_generator(tmp_path / "nodes" / "run" / "generator.pt")
    g_single, _ = load_generator(tmp_path / "single" / "run" / "generator.pt")
    for (name, a), b in zip(
        g_nodes.state_dict().items(), g_single.state_dict().values(), strict=True
    ):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
