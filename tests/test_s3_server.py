"""The local stack's S3 server keeps its buckets on disk: objects written over HTTP are files
in its folder, and a restarted server serves them again."""

import io
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "s3_server.py"


def _start(folder: Path, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), "--dir", str(folder), "--port", str(port)]
    cmd += ["--bucket", "stack", "--interval", "0.2", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()  # the script prints one line once it serves
    assert line.startswith("s3 server at"), line + proc.stdout.read()
    return proc


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    return out


@pytest.fixture
def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_objects_survive_a_restart_and_deletes_reach_the_folder(tmp_path, port, monkeypatch):
    """Put two objects (one multipart), stop: both are files; restart: both are served; delete
    one: its file goes within an interval."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "s3"
    s3 = boto3.session.Session(
        aws_access_key_id="local", aws_secret_access_key="local", region_name="us-east-1"
    ).client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    big = bytes(range(256)) * (6 * 4096)  # 6 MiB: two parts of a multipart upload
    multipart = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)

    proc = _start(folder, port)
    try:
        s3.put_object(Bucket="stack", Key="run/latest.json", Body=b'{"name": "a"}')
        s3.upload_fileobj(io.BytesIO(big), "stack", "run/big.pt", Config=multipart)
    finally:
        assert "synced to disk" in _stop(proc)
    assert (folder / "stack" / "run" / "latest.json").read_bytes() == b'{"name": "a"}'
    assert (folder / "stack" / "run" / "big.pt").read_bytes() == big

    proc = _start(folder, port)
    try:
        assert s3.get_object(Bucket="stack", Key="run/big.pt")["Body"].read() == big
        s3.delete_object(Bucket="stack", Key="run/latest.json")
        deadline = time.monotonic() + 10
        while (folder / "stack" / "run" / "latest.json").exists():
            assert time.monotonic() < deadline, "the deleted object's file is still there"
            time.sleep(0.1)
    finally:
        _stop(proc)
    assert (folder / "stack" / "run" / "big.pt").is_file()


def test_a_taken_port_exits_non_zero_at_once_and_the_token_proves_ownership(tmp_path, port):
    """With the port taken by another server, s3_server.py exits 1 within seconds naming the
    port (it used to log the failed bind in a thread and stay up); on a free port it answers
    its --token, which a foreign server cannot."""
    import urllib.request

    cmd = [sys.executable, str(SCRIPT), "--dir", str(tmp_path / "s3"), "--port", str(port)]
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        started = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert time.monotonic() - started < 60  # imports only: no wait on a server that never came
    proc = _start(tmp_path / "s3", port, "--token", "stack-1234")
    try:
        url = f"http://127.0.0.1:{port}/_polyinr/token"
        assert urllib.request.urlopen(url, timeout=10).read() == b"stack-1234"
    finally:
        _stop(proc)


def test_stack_up_names_a_busy_port_and_starts_nothing(tmp_path, port):
    """`scripts/stack.sh up` with its S3 port taken by another server stops at once, naming the
    port and the variable that moves it, before starting any part of the stack."""
    import os

    stack = SCRIPT.parent / "stack.sh"
    env = {**os.environ, "STACK_DIR": str(tmp_path / "stack"), "POLYINR_S3_PORT": str(port)}
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        done = subprocess.run(
            ["bash", str(stack), "up"], env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"port {port} for s3 is in use" in done.stdout and "POLYINR_S3_PORT" in done.stdout
    assert not list((tmp_path / "stack").glob("*.pid"))
