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


def _start(folder: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), "--dir", str(folder), "--port", str(port)]
    cmd += ["--bucket", "stack", "--interval", "0.2"]
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
