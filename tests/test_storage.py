"""Tests for polyinr.core.storage and polyinr.training.checkpoints: local folders and real S3
(moto)."""

import hashlib
import json
import tempfile

import boto3
import pytest
import torch

from polyinr.core import storage
from polyinr.core.config import StorageConfig
from polyinr.core.storage import StorageError, StorageUnavailable
from polyinr.training import checkpoints
from polyinr.training.checkpoints import CheckpointStore
from scripts.fault_proxy import Fault, FaultProxy


class Payload:
    """An arbitrary pickled object: loading it would run code, so it must be refused."""


def state(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(3, 4, generator=gen), "cur_nimg": step, "meta": {"tag": f"s{step}"}}


def assert_state_equal(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys()
    assert torch.equal(loaded["w"], expected["w"])
    assert loaded["cur_nimg"] == expected["cur_nimg"] and loaded["meta"] == expected["meta"]


def storage_config(
    uri: str, endpoint_url=None, keep=3, retries=3, staging="staging", outage_minutes=0.0
):
    return StorageConfig(
        uri=uri,
        endpoint_url=endpoint_url,
        keep=keep,
        retries=retries,
        multipart_mb=5,
        staging_dir=staging,
        outage_minutes=outage_minutes,
    )


def local_store(tmp_path, keep=3) -> CheckpointStore:
    return CheckpointStore(storage_config(str(tmp_path / "ckpt"), keep=keep), "run")


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
    pointer = json.loads((store.root / checkpoints.LATEST).read_text())
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


def test_a_crash_between_record_and_pointer_lists_what_resume_uses(tmp_path):
    """Killed after a snapshot's record but before latest.json: the listing stops where the
    pointer is, as load_latest does (a rerun resumes there and rewrites the newer one)."""
    store = local_store(tmp_path)
    store.save(state(1), 1)
    pointer = (tmp_path / "ckpt/run/latest.json").read_bytes()
    store.save(state(2), 2)
    (tmp_path / "ckpt/run/latest.json").write_bytes(pointer)  # as if killed before the pointer
    assert [r["name"] for r in store.records()] == [checkpoints.snapshot_name(1)]
    assert store.records()[-1]["latest"]
    assert_state_equal(store.load_latest()[0], state(1))


def test_without_pointer_unloadable_newest_falls_back(tmp_path, capsys):
    """With latest.json gone, a truncated newest snapshot is skipped with a warning."""
    store = local_store(tmp_path)
    store.save(state(1), cur_nimg=1)
    (store.root / checkpoints.LATEST).unlink()
    (store.root / "snapshot-000000000009.pt").write_bytes(b"not a checkpoint")
    loaded, uri = store.load_latest()
    assert_state_equal(loaded, state(1))
    assert uri.endswith("snapshot-000000000001.pt")
    assert "snapshot-000000000009.pt" in capsys.readouterr().err


def test_corrupt_pointer_falls_back_to_snapshots(tmp_path):
    """A garbled latest.json does not stop resuming from the snapshots that are there."""
    store = local_store(tmp_path)
    store.save(state(1), cur_nimg=1)
    (store.root / checkpoints.LATEST).write_bytes(b'{"name": "snapsh')
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


def test_nothing_loadable_is_an_error_not_a_fresh_run(tmp_path):
    """No snapshot loads: NoGoodCheckpoint naming each (None only when there are none)."""
    store = local_store(tmp_path)
    assert store.load_latest() is None
    store.save(state(1), cur_nimg=1)
    (store.root / "snapshot-000000000001.pt").write_bytes(b"")
    with pytest.raises(checkpoints.NoGoodCheckpoint, match="snapshot-000000000001.pt: fails its"):
        store.load_latest()


def test_keep_must_be_positive():
    """keep < 1 is refused by the config."""
    with pytest.raises(ValueError, match="keep"):
        storage_config("checkpoints", keep=0)


def s3_store(endpoint: str, bucket: str, keep=2, retries=3, staging=None) -> CheckpointStore:
    staging = staging or tempfile.mkdtemp(prefix="staging-")
    cfg = storage_config(f"s3://{bucket}/prefix", endpoint, keep, retries, str(staging))
    return CheckpointStore(cfg, "run")


def s3_keys(endpoint: str, bucket: str) -> list[str]:
    client = boto3.session.Session().client("s3", endpoint_url=endpoint)
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.mark.slow
def test_s3_round_trip_and_pruning(s3_env, s3_bucket, tmp_path):
    """On a real S3 server: check passes, save/load round trips, keep=2 prunes."""
    store = s3_store(s3_env, s3_bucket, keep=2, staging=tmp_path)
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
        "prefix/run/snapshot-000000000002.json",
        "prefix/run/snapshot-000000000002.pt",
        "prefix/run/snapshot-000000000003.json",
        "prefix/run/snapshot-000000000003.pt",
    ]


def test_run_folders_are_listed_on_disk_and_on_s3_with_their_summaries(s3_env, s3_bucket, tmp_path):
    """Folder.subfolders names the folders in storage.uri (S3: common prefixes, objects at
    the top are no folders); a run's summary comes from its JSON records, and a folder
    without checkpoints has none."""
    for uri, endpoint in ((str(tmp_path / "ckpt"), None), (f"s3://{s3_bucket}/prefix", s3_env)):
        cfg = storage_config(uri, endpoint, keep=2, staging=str(tmp_path / "staging"))
        for name, nimgs in (("run-b", [3, 5]), ("run-a", [2])):
            store = CheckpointStore(cfg, name)
            for nimg in nimgs:
                store.save(state(nimg), nimg, {"stage": 0, "resolution": 8, "kimg": nimg / 1e3})
        store.mark_best("snapshot-000000000002.pt", 7.5)
        storage.Folder(cfg, "reference-stats").put("stats.npz", b"x")
        storage.Folder(cfg, "").put("top.json", b"{}")
        assert storage.Folder(cfg, "").subfolders() == ["reference-stats", "run-a", "run-b"]
        summary = CheckpointStore(cfg, "run-b").summary()
        assert summary["checkpoints"] == 2 and "best" not in summary, uri
        assert summary["latest"] == {
            "name": "snapshot-000000000005.pt", "stage": 0, "resolution": 8, "kimg": 0.005
        }  # fmt: skip
        assert CheckpointStore(cfg, "run-a").summary()["best"] == {
            "stage": 0, "fid": 7.5, "kimg": 0.002
        }  # fmt: skip
        assert CheckpointStore(cfg, "reference-stats").summary() is None
    assert storage.Folder(storage_config(str(tmp_path / "none")), "").subfolders() == []


@pytest.mark.slow
def test_s3_corrupt_latest_falls_back(s3_env, s3_bucket, capsys):
    """On S3 too, a latest object failing its checksum falls back to the previous one."""
    store = s3_store(s3_env, s3_bucket, keep=3)
    store.save(state(1), cur_nimg=1)
    store.save(state(2), cur_nimg=2)
    store.wait()  # the upload is in the background: let it land before tampering
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


def test_s3_forbidden_bucket_names_the_credential_variables_not_their_values(monkeypatch):
    """A 403 on HeadBucket (S3 sends no reason with it) says wrong credentials are the usual
    cause, naming AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY but never their values."""
    from botocore.stub import Stubber

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAVALUE1234")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-value-5678")
    store = CheckpointStore(storage_config("s3://guarded/prefix", "http://127.0.0.1:9"), "run")
    with Stubber(store.folder.s3) as stub:
        stub.add_client_error("head_bucket", "403", "Forbidden", http_status_code=403)
        with pytest.raises(StorageError) as error:
            store.check()
    message = str(error.value)
    assert "usually wrong credentials" in message and "guarded" in message
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "AKIAVALUE1234" not in message and "secret-value-5678" not in message


@pytest.mark.slow
def test_s3_unreachable_endpoint_is_transient(s3_env):
    """An endpoint nobody listens on is StorageUnavailable (exit 75), not a traceback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = storage_config("s3://b/prefix", f"http://127.0.0.1:{port}", keep=1, retries=1)
    store = CheckpointStore(cfg, "run")
    with pytest.raises(StorageUnavailable, match="endpoint"):
        store.check()


def test_best_checkpoint_survives_pruning_and_is_listed(tmp_path):
    """mark_best keeps the lowest-FID checkpoint past `keep`; records() flags latest and best."""
    store = local_store(tmp_path, keep=2)
    store.save(state(1), cur_nimg=1, info={"stage": 0, "kimg": 0.001})
    assert store.mark_best(checkpoints.snapshot_name(1), fid=10.0)
    store.save(state(2), cur_nimg=2, info={"stage": 0, "kimg": 0.002})
    assert not store.mark_best(checkpoints.snapshot_name(2), fid=12.0)  # worse: best stays
    for step in (3, 4):
        store.save(state(step), cur_nimg=step, info={"stage": 1, "kimg": step / 1000})
    records = store.records()
    assert [r["name"] for r in records] == [checkpoints.snapshot_name(n) for n in (1, 3, 4)]
    assert [r["best"] for r in records] == [True, False, False]
    assert [r["latest"] for r in records] == [False, False, True]
    assert records[0]["fid"] == 10.0 and records[2]["stage"] == 1
    assert records[2]["size"] == (store.root / checkpoints.snapshot_name(4)).stat().st_size
    assert store.mark_best(checkpoints.snapshot_name(4), fid=3.0)
    store.save(state(5), cur_nimg=5)
    names = sorted(p.name for p in store.root.glob("snapshot-*.pt"))
    assert names == [checkpoints.snapshot_name(n) for n in (4, 5)]  # old best pruned now


def test_checksum_of_an_older_snapshot_is_checked_from_its_record(tmp_path, capsys):
    """Falling back past a corrupt latest also verifies the older snapshot against its record."""
    store = local_store(tmp_path)
    for step in (1, 2, 3):
        store.save(state(step), cur_nimg=step)
    for step in (2, 3):
        path = store.root / checkpoints.snapshot_name(step)
        data = bytearray(path.read_bytes())
        data[-20] ^= 0xFF
        path.write_bytes(bytes(data))
    loaded, uri = store.load_latest()
    assert_state_equal(loaded, state(1))
    assert capsys.readouterr().err.count("fails its checksum") == 2


def test_a_good_checkpoint_without_its_record_survives_two_fallback_resumes(tmp_path):
    """Resume falls back past a corrupt newest snapshot to one whose record is missing: the
    pointer it writes carries that checkpoint's hash, and the next resume loads it again
    instead of moving it to corrupt/."""
    store = local_store(tmp_path)
    for step in (1, 2):
        store.save(state(step), cur_nimg=step)
    (store.root / checkpoints.snapshot_name(1)).with_suffix(".json").unlink()
    newest = store.root / checkpoints.snapshot_name(2)
    newest.write_bytes(newest.read_bytes()[:-40])  # cut short: fails its checksum
    for _ in range(2):
        loaded, uri = store.load_latest(move_aside=True)
        assert_state_equal(loaded, state(1))
        assert uri.endswith(checkpoints.snapshot_name(1))
    pointer = json.loads((store.root / checkpoints.LATEST).read_text())
    data = (store.root / checkpoints.snapshot_name(1)).read_bytes()
    assert pointer["sha256"] == hashlib.sha256(data).hexdigest()
    assert pointer["size"] == len(data)
    assert sorted(p.name for p in (store.root / checkpoints.CORRUPT).iterdir()) == [
        "snapshot-000000000002.json",
        "snapshot-000000000002.pt",
    ]


def test_a_null_hash_in_the_pointer_is_no_mismatch(tmp_path):
    """latest.json with sha256 null (as an older version wrote it) loads its checkpoint and
    never moves it aside: only a hash that differs means corrupt."""
    store = local_store(tmp_path)
    store.save(state(1), cur_nimg=1)
    (store.root / checkpoints.snapshot_name(1)).with_suffix(".json").unlink()
    pointer = {"name": checkpoints.snapshot_name(1), "size": None, "sha256": None}
    (store.root / checkpoints.LATEST).write_text(json.dumps(pointer))
    loaded, _ = store.load_latest(move_aside=True)
    assert_state_equal(loaded, state(1))
    assert not (store.root / checkpoints.CORRUPT).exists()
    assert [r["latest"] for r in store.records()] == []  # no record: nothing to list


def fill_disk_for(monkeypatch, fragment: str) -> None:
    """Writes of a file whose name contains `fragment` fail as on a full disk, half written."""
    import errno
    import pathlib

    original = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if fragment in self.name:
            original(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


@pytest.mark.parametrize("where", ["local", "staging"])
def test_a_full_disk_is_one_line_with_path_and_bytes_and_keeps_the_last_commit(
    tmp_path, monkeypatch, where
):
    """ENOSPC while committing (the local folder, or S3's staging copy) raises one line naming
    the path and the bytes needed, as transient (StorageUnavailable); no partial file is left
    and the previous commit still loads."""
    store = local_store(tmp_path)
    store.save(state(1), cur_nimg=1)
    fill_disk_for(monkeypatch, "snapshot-000000000002")
    if where == "staging":  # S3's put_large stages the object on the local disk first
        folder = storage.Folder(storage_config(str(tmp_path / "ckpt")), "run")
        folder.staging, folder.s3 = tmp_path / "staging", object()  # S3 is never reached
        with pytest.raises(storage.StorageUnavailable) as error:
            folder.put_large(checkpoints.snapshot_name(2), b"x" * 1000)
        path, needed = folder.staging / checkpoints.snapshot_name(2), 1000
    else:
        with pytest.raises(storage.StorageUnavailable) as error:
            store.save(state(2), cur_nimg=2)
        path, needed = store.root / checkpoints.snapshot_name(2), None
    message = str(error.value)
    assert "\n" not in message and "disk full" in message and str(path) in message
    if needed is not None:
        assert f"needs {needed} bytes" in message
    assert not list(path.parent.glob("*snapshot-000000000002*"))
    loaded, uri = store.load_latest(move_aside=True)
    assert_state_equal(loaded, state(1))


def test_tensors_sha256_is_stable_and_sensitive():
    """Equal tensors hash equal (fresh copies too); a changed value, name or order does not."""
    a = {"x": torch.arange(6.0).view(2, 3), "y": torch.ones(2, dtype=torch.int64)}
    b = {k: v.clone() for k, v in a.items()}
    assert checkpoints.tensors_sha256(a) == checkpoints.tensors_sha256(b)
    b["x"][0, 0] = 0.5
    assert checkpoints.tensors_sha256(a) != checkpoints.tensors_sha256(b)
    assert checkpoints.tensors_sha256(a) != checkpoints.tensors_sha256({"y": a["y"], "x": a["x"]})
    assert checkpoints.tensors_sha256(a) != checkpoints.tensors_sha256({"z": a["x"], "y": a["y"]})


@pytest.mark.slow
def test_s3_large_checkpoint_goes_up_in_parts(s3_env, s3_bucket, tmp_path):
    """An 11 MB checkpoint with 5 MB parts is a 3-part multipart upload that round-trips."""
    store = s3_store(s3_env, s3_bucket, staging=tmp_path / "staging")
    big = {"w": torch.randn(11 * 2**20 // 4, generator=torch.Generator().manual_seed(0))}
    store.save(big, cur_nimg=7)
    store.wait()
    client = boto3.session.Session().client("s3", endpoint_url=s3_env)
    head = client.head_object(Bucket=s3_bucket, Key=f"prefix/run/{checkpoints.snapshot_name(7)}")
    assert head["ETag"].strip('"').endswith("-3")  # S3's ETag of a 3-part upload
    loaded, _ = store.load_latest()
    assert torch.equal(loaded["w"], big["w"])
    assert not list((tmp_path / "staging").rglob("*.pt"))  # the local copy goes once uploaded


@pytest.mark.slow
def test_s3_flaky_endpoint_still_commits(s3_env, s3_bucket, tmp_path):
    """8 503s and dropped connections on PUT, POST and GET are retried: the commit lands."""
    proxy = FaultProxy(s3_env)
    proxy.add(Fault("503", "PUT", times=2), Fault("drop", "PUT", times=2))
    proxy.add(Fault("503", "POST", times=2), Fault("drop", "GET", times=2))
    try:
        store = s3_store(proxy.url, s3_bucket, retries=5, staging=tmp_path / "staging")
        store.check()
        big = {"w": torch.randn(6 * 2**20 // 4, generator=torch.Generator().manual_seed(1))}
        store.save(state(1), cur_nimg=1)
        store.save(big, cur_nimg=2)
        loaded, uri = store.load_latest()
        assert len(proxy.served) == 8
    finally:
        proxy.close()
    assert torch.equal(loaded["w"], big["w"]) and uri.endswith(checkpoints.snapshot_name(2))


@pytest.mark.slow
def test_s3_permanent_failure_is_a_clear_error_and_keeps_the_local_copy(
    s3_env, s3_bucket, tmp_path
):
    """With storage.outage_minutes=0, an endpoint that only answers 503 fails the upload after
    `retries` attempts with a StorageError naming the kept local copy (raised by the next
    `wait`); the previous commit stays the latest."""
    proxy = FaultProxy(s3_env)
    try:
        store = s3_store(proxy.url, s3_bucket, retries=3, staging=tmp_path / "staging")
        store.save(state(1), cur_nimg=1)
        store.wait()
        proxy.add(Fault("503", times=-1))
        before = proxy.requests
        store.save(state(2), cur_nimg=2)  # returns: the upload is in the background
        with pytest.raises(StorageError, match="stays at") as e:
            store.wait()
        assert proxy.requests - before == 3  # the configured attempts, then the error
    finally:
        proxy.close()
    local = tmp_path / "staging" / "run" / checkpoints.snapshot_name(2)
    assert str(local) in str(e.value)
    assert_state_equal(torch.load(local, weights_only=True), state(2))
    loaded, _ = s3_store(s3_env, s3_bucket).load_latest()
    assert_state_equal(loaded, state(1))


def corrupt_object(endpoint: str, bucket: str, name: str) -> None:
    """Flip one byte of a stored checkpoint in place (same size, wrong sha256)."""
    client = boto3.session.Session().client("s3", endpoint_url=endpoint)
    key = f"prefix/run/{name}"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))


@pytest.mark.slow
def test_s3_cut_off_downloads_are_retried(s3_env, s3_bucket, capsys):
    """Checkpoint downloads cut off or dropped are retried with back-off: the latest loads."""
    proxy = FaultProxy(s3_env)
    try:
        store = s3_store(proxy.url, s3_bucket, keep=3, retries=4)
        store.save(state(1), cur_nimg=1)
        store.save(state(2), cur_nimg=2)
        proxy.add(Fault("truncate", "GET", r"snapshot-0+2\.pt", times=2))
        proxy.add(Fault("drop", "GET", r"snapshot-0+2\.pt", times=1))
        loaded, uri = store.load_latest(move_aside=True)
    finally:
        proxy.close()
    assert [kind for _, _, kind in proxy.served] == ["truncate", "truncate", "drop"]
    assert_state_equal(loaded, state(2))
    assert uri.endswith(checkpoints.snapshot_name(2))
    assert "trying older" not in capsys.readouterr().err


@pytest.mark.slow
def test_s3_checkpoint_that_cannot_be_downloaded_falls_back_and_is_kept(s3_env, s3_bucket, capsys):
    """A checkpoint no download reaches: the previous one loads, this one is kept."""
    proxy = FaultProxy(s3_env)
    try:
        store = s3_store(proxy.url, s3_bucket, keep=3, retries=3)
        store.save(state(1), cur_nimg=1)
        store.save(state(2), cur_nimg=2)
        proxy.add(Fault("truncate", "GET", r"snapshot-0+2\.pt", times=-1))
        loaded, uri = store.load_latest(move_aside=True)
    finally:
        proxy.close()
    assert len(proxy.served) == 3
    assert_state_equal(loaded, state(1))
    assert "cannot be downloaded" in capsys.readouterr().err
    keys = s3_keys(s3_env, s3_bucket)
    assert "prefix/run/snapshot-000000000002.pt" in keys
    loaded, _ = s3_store(s3_env, s3_bucket).load_latest()
    assert_state_equal(loaded, state(2))


@pytest.mark.slow
def test_s3_corrupt_checkpoints_are_moved_aside_and_never_pruned_over(s3_env, s3_bucket):
    """Corrupt checkpoints go to corrupt/; latest.json always names an object that exists."""
    store = s3_store(s3_env, s3_bucket, keep=2)
    for step in (10, 20, 30):
        store.save(state(step), cur_nimg=step)
    store.wait()
    corrupt_object(s3_env, s3_bucket, checkpoints.snapshot_name(30))
    loaded, uri = store.load_latest(move_aside=True)
    assert_state_equal(loaded, state(20))
    keys = s3_keys(s3_env, s3_bucket)
    assert "prefix/run/corrupt/snapshot-000000000030.pt" in keys
    assert "prefix/run/corrupt/snapshot-000000000030.json" in keys
    assert "prefix/run/snapshot-000000000030.pt" not in keys
    assert store._json(checkpoints.LATEST)["name"] == checkpoints.snapshot_name(20)

    corrupt_object(s3_env, s3_bucket, checkpoints.snapshot_name(20))
    with pytest.raises(checkpoints.NoGoodCheckpoint, match="snapshot-000000000020.pt: fails"):
        store.load_latest(move_aside=True)
    assert store._json(checkpoints.LATEST) is None  # it named a checkpoint now in corrupt/
    for step in (1, 2, 3):  # a restart from image 0
        store.save(state(step), cur_nimg=step)
        store.wait()
        assert f"prefix/run/{store._json(checkpoints.LATEST)['name']}" in s3_keys(s3_env, s3_bucket)
    loaded, uri = store.load_latest()
    assert_state_equal(loaded, state(3))


def test_pruning_never_deletes_the_commit_just_made(tmp_path):
    """Higher-numbered leftovers never make pruning delete the commit just made."""
    store = local_store(tmp_path, keep=1)
    store.save(state(50), cur_nimg=50)
    for step in (1, 2):
        store.save(state(step), cur_nimg=step)
        latest = json.loads((store.root / checkpoints.LATEST).read_text())["name"]
        assert (store.root / latest).is_file()
    assert sorted(p.name for p in store.root.glob("snapshot-*")) == [
        "snapshot-000000000002.json",
        "snapshot-000000000002.pt",
    ]
    assert_state_equal(store.load_latest()[0], state(2))


@pytest.mark.slow
def test_s3_failing_deletes_are_logged_and_cleaned_on_the_next_commit(s3_env, s3_bucket, capsys):
    """Failing DELETEs while pruning are logged, not fatal; the next commit cleans up."""
    proxy = FaultProxy(s3_env)
    try:
        store = s3_store(proxy.url, s3_bucket, keep=1, retries=2)
        store.save(state(1), cur_nimg=1)
        proxy.add(Fault("503", "DELETE", times=-1))
        store.save(state(2), cur_nimg=2)
        store.wait()
        assert "pruning" in capsys.readouterr().err
        proxy.clear()
        proxy.add(Fault("drop", "DELETE", r"\.json", times=-1))
        store.save(state(3), cur_nimg=3)
        store.wait()
        assert "snapshot-000000000002.json" in capsys.readouterr().err
        keys = s3_keys(s3_env, s3_bucket)
        assert "prefix/run/snapshot-000000000001.json" in keys  # an orphaned record
        assert "prefix/run/snapshot-000000000001.pt" not in keys
        proxy.clear()
        store.save(state(4), cur_nimg=4)
        store.wait()
    finally:
        proxy.close()
    assert s3_keys(s3_env, s3_bucket) == [
        "prefix/run/latest.json",
        "prefix/run/snapshot-000000000004.json",
        "prefix/run/snapshot-000000000004.pt",
    ]


@pytest.mark.slow
def test_s3_listing_never_marks_a_corrupt_checkpoint_latest(s3_env, s3_bucket):
    """records() never marks a checkpoint failing its checksum as latest; it says why."""
    store = s3_store(s3_env, s3_bucket, keep=3)
    for step in (1, 2):
        store.save(state(step), cur_nimg=step)
    store.wait()
    corrupt_object(s3_env, s3_bucket, checkpoints.snapshot_name(2))
    records = store.records()
    assert [(r["latest"], r.get("corrupt")) for r in records] == [
        (True, None),
        (False, "fails its checksum"),
    ]


@pytest.mark.slow
def test_s3_missing_object_with_a_cut_off_error_body_is_missing(s3_env, s3_bucket):
    """A 404 with its error body cut off means absent: a new run starts."""
    proxy = FaultProxy(s3_env)
    try:
        store = s3_store(proxy.url, s3_bucket)
        proxy.add(Fault("truncate", "GET", r"latest\.json", times=-1))
        assert store.load_latest(move_aside=True) is None
    finally:
        proxy.close()
    assert proxy.served


def test_each_stage_keeps_its_own_best_checkpoint(tmp_path):
    """FIDs compare within a stage only: stage 1's best (a worse number at a higher
    resolution) does not replace stage 0's, and both survive pruning."""
    store = local_store(tmp_path, keep=1)
    store.save(state(1), cur_nimg=1, info={"stage": 0})
    assert store.mark_best(checkpoints.snapshot_name(1), fid=10.0, stage=0)
    store.save(state(2), cur_nimg=2, info={"stage": 1})
    assert store.mark_best(checkpoints.snapshot_name(2), fid=30.0, stage=1)
    for step in (3, 4):
        store.save(state(step), cur_nimg=step, info={"stage": 1})
    names = sorted(p.name for p in store.root.glob("snapshot-*.pt"))
    assert names == [checkpoints.snapshot_name(n) for n in (1, 2, 4)]
    assert [r["fid"] for r in store.records() if r["best"]] == [10.0, 30.0]


def test_best_is_the_stages_lowest_marked_fid_while_its_checkpoint_exists(tmp_path):
    """best(stage) is the lowest FID marked in that stage with its kimg; None for a stage
    without one, or once its checkpoint has been moved to corrupt/."""
    store = local_store(tmp_path, keep=1)
    for nimg, fid in ((1000, 10.0), (2000, 8.0), (3000, 9.0)):
        store.save(state(nimg), cur_nimg=nimg, info={"stage": 0})
        store.mark_best(checkpoints.snapshot_name(nimg), fid=fid, stage=0)
    assert store.best(0) == {"name": checkpoints.snapshot_name(2000), "kimg": 2.0, "fid": 8.0}
    assert store.best(1) is None
    store.folder.move(checkpoints.snapshot_name(2000), checkpoints.CORRUPT)
    assert store.best(0) is None


def test_write_atomic_publishes_all_or_nothing(tmp_path):
    """write_atomic replaces the file only when its block succeeds; a block that raises or
    deletes the temporary leaves the old file, and no temporary is left behind."""
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), storage.write_atomic(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    with storage.write_atomic(path) as tmp:
        tmp.write_text("discarded")
        tmp.unlink()
    assert path.read_text() == "old"
    with storage.write_atomic(path) as tmp:
        assert tmp.parent == path.parent and not tmp.exists()
        tmp.write_text("new")
        assert path.read_text() == "old"  # readers see the old file until the block ends
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
