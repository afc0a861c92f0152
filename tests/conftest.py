"""Shared fixtures: one CPU thread for tiny models, a real S3 server (moto) on loopback, and a
copy of the repository for the pipeline's integration tests."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """The files git would commit (tracked, or untracked and not ignored), copied to
    tmp_path/repo, with DVC told there is no git there."""
    dst = tmp_path / "repo"
    ls = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    names = subprocess.run(ls, cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, names.split("\0")):
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "config", "core.no_scm", "true"], cwd=dst, check=True)
    return dst


@pytest.fixture(scope="module")
def single_thread():
    """Run tiny models on one thread: on busy shared cores OpenMP spinning costs 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch, s3_server):
    """Test credentials in the environment and a fresh boto3 default session."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # boto3 caches credentials in its default session: start each test from the environment.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env, request):
    """A new, empty bucket on the moto server, named after the test."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    client = boto3.session.Session().client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket=name)
    return name
