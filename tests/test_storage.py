"""Tests for polyinr.storage: checkpoints on a local folder and on a real S3 server (moto)."""

import json

import boto3
import pytest
import torch
from botocore.config import Config

from polyinr import storage
from polyinr.storage import CheckpointStore, StorageConfig, StorageError


class Payload:
    """An arbitrary pickled object: loading it would run code, so it must be refused."""


def state(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(3, 4, generator=gen), "cur_nimg": step, "meta": {"tag": f"s{step}"}}


def assert_state_equal(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys()
    assert torch.equal(loaded["w"], expected["w"])
    assert loaded["cur_nimg"] == expected["cur_nimg"] and loaded["meta"] == expected["meta"]


def local_store(tmp_path, keep=3) -> CheckpointStore:
    return CheckpointStore(
        StorageConfig(uri=str(tmp_path / "ckpt"), endpoint_url=None, keep=keep), "run"
    )


def test_local_round_trip(tmp_path):
    """save then load_latest gives back the same tensors and the checkpoint's URI."""
    store = local_store(tmp_path)
    store.check()
    assert store.load_latest() is None
    uri = store.save(state(64), cur_nimg=64)
    loaded, loaded_uri = store.load_latest()
    assert_state_equal(loaded, state(64))
    assert loaded_uri == uri == str(tmp_path / "ckpt" / "run" / "snapshot-000000000064.pt")


def test_local_latest_is_the_newest(tmp_path):
    """After several saves load_latest returns the last one, and latest.json points at it."""
    store = local_store(tmp_path)
    for step in (10, 20, 30):
        store.save(state(step), cur_nimg=step)
    loaded, _ = store.load_latest()
    assert_state_equal(loaded, state(30))
    pointer = json.loads((store.root / storage.LATEST).read_text())
    assert pointer["name"] == "snapshot-000000000030.pt"


def test_local_keep_prunes_older_snapshots(tmp_path):
    """keep=2 leaves only the two newest snapshots on disk."""
    store = local_store(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        store.save(state(step), cur_nimg=step)
    names = sorted(p.name for p in store.root.glob("snapshot-*.pt"))
    assert names == ["snapshot-000000000003.pt", "snapshot-000000000004.pt"]


def test_corrupt_latest_falls_back_with_a_warning(tmp_path, capsys):
    """A latest checkpoint with flipped bytes fails its checksum: the previous one loads."""
    store = local_store(tmp_path)
    store.save(state(1), cur_nimg=1)
    store.save(state(2), cur_nimg=2)
    path = store.root / "snapshot-000000000002.pt"
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    loaded, uri = store.load_latest()
    assert_state_equal(loaded, state(1))
    assert uri.endswith("snapshot-000000000001.pt")
    assert "snapshot-000000000002.pt" in capsys.readouterr().err


def test_pointer_wins_over_an_unvouched_newer_snapshot(tmp_path):
    """A newer snapshot that latest.json does not name (a crash mid-commit) is not preferred."""
    store = local_store(tmp_path)
    store.save(state(1), cur_nimg=1)
    torch.save(state(9), store.root / "snapshot-000000000009.pt")
    loaded, uri = store.load_latest()
    assert_state_equal(loaded, state(1))
    assert uri.endswith("snapshot-000000000001.pt")


def test_without_pointer_unloadable_newest_falls_back(tmp_path, capsys):
    """With latest.json gone, a truncated newest snapshot is skipped with a warning."""
    store = local_store(tmp_path)
    store.save(state(1), cur_nimg=1)
    (store.root / storage.LATEST).unlink()
    (store.root / "snapshot-000000000009.pt").write_bytes(b"not a checkpoint")
    loaded, uri = store.load_latest()
    assert_state_equal(loaded, state(1))
    assert uri.endswith("snapshot-000000000001.pt")
    assert "snapshot-000000000009.pt" in capsys.readouterr().err


def test_corrupt_pointer_falls_back_to_snapshots(tmp_path):
    """A garbled latest.json does not stop resuming from the snapshots that are there."""
    store = local_store(tmp_path)
    store.save(state(1), cur_nimg=1)
    (store.root / storage.LATEST).write_bytes(b'{"name": "snapsh')
    loaded, _ = store.load_latest()
    assert_state_equal(loaded, state(1))


def test_pickled_object_is_refused_and_falls_back(tmp_path, capsys):
    """A checkpoint holding an arbitrary pickled object is refused (weights_only)."""
    store = local_store(tmp_path)
    store.save(state(1), cur_nimg=1)
    store.save({"payload": Payload()}, cur_nimg=2)  # checksum valid, content unsafe
    loaded, uri = store.load_latest()
    assert_state_equal(loaded, state(1))
    assert uri.endswith("snapshot-000000000001.pt")
    assert "snapshot-000000000002.pt" in capsys.readouterr().err


def test_nothing_loadable_gives_none(tmp_path):
    """With every snapshot unreadable, load_latest returns None rather than raising."""
    store = local_store(tmp_path)
    store.save(state(1), cur_nimg=1)
    (store.root / "snapshot-000000000001.pt").write_bytes(b"")
    assert store.load_latest() is None


def test_keep_must_be_positive():
    """keep < 1 is refused by the config."""
    with pytest.raises(ValueError, match="keep"):
        StorageConfig(uri="checkpoints", endpoint_url=None, keep=0)


def s3_store(endpoint: str, bucket: str, keep=2) -> CheckpointStore:
    cfg = StorageConfig(uri=f"s3://{bucket}/prefix", endpoint_url=endpoint, keep=keep)
    return CheckpointStore(cfg, "run")


def s3_keys(endpoint: str, bucket: str) -> list[str]:
    client = boto3.session.Session().client("s3", endpoint_url=endpoint)
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.mark.slow
def test_s3_round_trip_and_pruning(s3_env, s3_bucket):
    """On a real S3 server: check passes, save/load round trips, keep=2 prunes."""
    store = s3_store(s3_env, s3_bucket, keep=2)
    store.check()
    assert store.load_latest() is None
    for step in (1, 2, 3):
        uri = store.save(state(step), cur_nimg=step)
    assert uri == f"s3://{s3_bucket}/prefix/run/snapshot-000000000003.pt"
    loaded, loaded_uri = store.load_latest()
    assert_state_equal(loaded, state(3))
    assert loaded_uri == uri
    assert s3_keys(s3_env, s3_bucket) == [
        "prefix/run/latest.json",
        "prefix/run/snapshot-000000000002.pt",
        "prefix/run/snapshot-000000000003.pt",
    ]


@pytest.mark.slow
def test_s3_corrupt_latest_falls_back(s3_env, s3_bucket, capsys):
    """On S3 too, a latest object failing its checksum falls back to the previous one."""
    store = s3_store(s3_env, s3_bucket, keep=3)
    store.save(state(1), cur_nimg=1)
    store.save(state(2), cur_nimg=2)
    client = boto3.session.Session().client("s3", endpoint_url=s3_env)
    client.put_object(Bucket=s3_bucket, Key="prefix/run/snapshot-000000000002.pt", Body=b"junk")
    loaded, uri = store.load_latest()
    assert_state_equal(loaded, state(1))
    assert uri == f"s3://{s3_bucket}/prefix/run/snapshot-000000000001.pt"
    assert "fails its checksum" in capsys.readouterr().err


@pytest.mark.slow
def test_s3_missing_bucket_names_it(s3_env):
    """check() on a bucket that does not exist is a StorageError naming the bucket."""
    store = s3_store(s3_env, "no-such-bucket-here")
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        store.check()


@pytest.mark.slow
def test_s3_missing_credentials_says_which_variables(s3_env, monkeypatch, tmp_path):
    """With no credentials anywhere, check() names AWS_ACCESS_KEY_ID."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = s3_store(s3_env, "any-bucket")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        store.check()


@pytest.mark.slow
def test_s3_unreachable_endpoint_is_a_storage_error(s3_env):
    """An endpoint nobody listens on gives a StorageError, not a botocore traceback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = StorageConfig(uri="s3://b/prefix", endpoint_url=f"http://127.0.0.1:{port}", keep=1)
    store = CheckpointStore(cfg, "run")
    # The store's client retries 10 times with back-off; one quick attempt shows the message.
    store.s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    with pytest.raises(StorageError, match="endpoint"):
        store.check()
