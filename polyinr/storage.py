"""Checkpoints in a local folder or an S3 bucket (boto3 lives only here).

A checkpoint is committed in three writes: the checkpoint object, its record
`snapshot-N.json` (size, sha256, stage, kimg, weights hash), then the `latest.json` pointer.
A crash between writes leaves the previous commit intact. Loading verifies the checksum and
falls back to the previous good checkpoint; it never runs code (`torch.load(weights_only=True)`).
Checkpoints that fail their checksum or do not load are moved aside to `corrupt/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from polyinr.config import StorageConfig

LATEST = "latest.json"
BEST = "best.json"
CORRUPT = "corrupt"  # the folder that checkpoints failing their checksum are moved to
MiB = 1 << 20


class StorageError(RuntimeError):
    """Checkpoint storage that cannot be reached or used."""


class NoGoodCheckpoint(StorageError):
    """The run has checkpoints, but none of them loads."""


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of named tensors in key order (names, dtypes, shapes, bytes): stable across runs."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def snapshot_name(cur_nimg: int) -> str:
    """The object name of the checkpoint taken at cur_nimg (sorts by progress)."""
    return f"snapshot-{cur_nimg:012d}.pt"


def _record_name(name: str) -> str:
    return name[: -len(".pt")] + ".json"


class CheckpointStore:
    """Checkpoints of one run under `<uri>/<run_name>/`, on disk or in S3."""

    def __init__(self, cfg: StorageConfig, run_name: str):
        self.cfg = cfg
        self.keep = cfg.keep
        if cfg.uri.startswith("s3://"):
            bucket, _, prefix = cfg.uri[len("s3://") :].partition("/")
            if not bucket:
                raise StorageError(f"storage.uri={cfg.uri!r} names no bucket (s3://bucket/prefix)")
            self.bucket = bucket
            self.prefix = "/".join(p for p in (prefix.strip("/"), run_name) if p)
            self.uri = f"s3://{bucket}/{self.prefix}"
            self.s3 = _s3_client(cfg.endpoint_url, cfg.retries)
            self.root = None
            self.staging = Path(cfg.staging_dir) / run_name
        else:
            self.s3 = None
            self.root = Path(cfg.uri) / run_name
            self.uri = str(self.root)

    def check(self) -> None:
        """Fail now, with one clear message, if the storage cannot be written."""
        if self.s3 is None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise StorageError(f"checkpoint folder {self.root} is not writable")
            return
        import botocore.exceptions

        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.NoCredentialsError:
            raise StorageError(
                f"no AWS credentials for {self.uri}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from None
        except botocore.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            what = (
                "does not exist" if code in ("404", "NoSuchBucket") else f"cannot be used ({code})"
            )
            raise StorageError(f"bucket {self.bucket!r} of storage.uri {what}: {e}") from None
        except botocore.exceptions.BotoCoreError as e:  # endpoint unreachable, bad URL, ...
            raise StorageError(f"cannot reach the S3 endpoint for {self.uri}: {e}") from None

    # Raw object access: the only place that knows local vs S3.
    def _put(self, name: str, data: bytes) -> None:
        if self.s3 is not None:
            self._s3_call("upload", self.s3.put_object, Body=data, Key=f"{self.prefix}/{name}")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with write_atomic(self.root / name) as tmp:
            tmp.write_bytes(data)

    def _put_large(self, name: str, data: bytes) -> None:
        """A checkpoint: atomic file locally; on S3 staged on disk, then (multipart) uploaded."""
        if self.s3 is None:
            self._put(name, data)
            return
        from boto3.s3.transfer import TransferConfig

        self.staging.mkdir(parents=True, exist_ok=True)
        local = self.staging / name
        with write_atomic(local) as tmp:
            tmp.write_bytes(data)
        part = self.cfg.multipart_mb * MiB
        transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part)
        key = f"{self.prefix}/{name}"
        self._s3_call(
            f"upload (the checkpoint stays at {local})",
            self.s3.upload_file,
            str(local),
            self.bucket,
            key,
            Config=transfer,
        )
        size = self._s3_call("check", self.s3.head_object, Key=key)["ContentLength"]
        if size != len(data):
            raise StorageError(f"{self.uri}/{name} has {size} bytes, expected {len(data)}")
        local.unlink()

    def _s3_call(self, what: str, fn, *args, **kwargs):
        """One boto3 call (botocore retries it with back-off); a final failure -> StorageError."""
        import boto3.exceptions
        import botocore.exceptions

        if not args:
            kwargs.setdefault("Bucket", self.bucket)
        try:
            return fn(*args, **kwargs)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            error = e
        except boto3.exceptions.S3UploadFailedError as e:
            error = e
        raise StorageError(
            f"S3 {what} failed for {self.uri} "
            f"after {self.cfg.retries} attempts per request: {error}"
        ) from error

    def _get(self, name: str) -> bytes | None:
        if self.s3 is None:
            path = self.root / name
            return path.read_bytes() if path.is_file() else None
        import botocore.exceptions
        from botocore.retries.standard import ExponentialBackoff, RetryContext

        # botocore retries a request until its headers arrive; a body cut off after that
        # (a dropped connection, a short read) is retried here, with botocore's back-off.
        backoff = ExponentialBackoff()
        for attempt in range(1, self.cfg.retries + 1):
            try:
                obj = self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")
                data = obj["Body"].read()
            except botocore.exceptions.ClientError as e:
                # NoSuchKey; or a bare 404 when the error's XML body was cut off on the way.
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise StorageError(f"S3 download of {self.uri}/{name} failed: {e}") from e
            except botocore.exceptions.BotoCoreError as e:
                error = f"{type(e).__name__}: {e}"
            else:
                if len(data) == obj["ContentLength"]:
                    return data
                error = f"{len(data)} of {obj['ContentLength']} bytes arrived"
            if attempt < self.cfg.retries:
                time.sleep(backoff.delay_amount(RetryContext(attempt_number=attempt)))
        raise StorageError(
            f"S3 download of {self.uri}/{name} failed {self.cfg.retries} times: {error}"
        )

    def _sizes(self, folder: str = "") -> dict[str, int]:
        """Every object directly in the run's folder (or its subfolder): name -> bytes."""
        if self.s3 is None:
            where = self.root / folder
            if not where.is_dir():
                return {}
            return {p.name: p.stat().st_size for p in where.iterdir() if p.is_file()}
        import botocore.exceptions

        prefix = "/".join(filter(None, (self.prefix, folder))) + "/"
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/"
        )
        try:
            objects = [o for page in pages for o in page.get("Contents", [])]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise StorageError(f"S3 listing of {self.uri} failed: {e}") from e
        return {o["Key"][len(prefix) :]: o["Size"] for o in objects}

    def _names(self, suffix: str = ".pt") -> list[str]:
        names = self._sizes()
        return sorted(n for n in names if n.startswith("snapshot-") and n.endswith(suffix))

    def _delete(self, name: str) -> None:
        if self.s3 is not None:
            self._s3_call("delete", self.s3.delete_object, Key=f"{self.prefix}/{name}")
        else:
            (self.root / name).unlink(missing_ok=True)

    def _move_aside(self, name: str, reason: str) -> None:
        """Move a checkpoint that fails its checks (and its record) to `corrupt/`."""
        print(f"warning: moving {self.uri}/{name} to {CORRUPT}/: {reason}", file=sys.stderr)
        for n in (name, _record_name(name)):
            try:
                if self.s3 is None:
                    if (self.root / n).is_file():
                        (self.root / CORRUPT).mkdir(exist_ok=True)
                        os.replace(self.root / n, self.root / CORRUPT / n)
                    continue
                source = {"Bucket": self.bucket, "Key": f"{self.prefix}/{n}"}
                target = f"{self.prefix}/{CORRUPT}/{n}"
                self._s3_call("copy", self.s3.copy_object, CopySource=source, Key=target)
                self._delete(n)
            except (StorageError, OSError) as e:
                if n == name:  # a missing record is normal (older versions, a crash)
                    print(f"warning: cannot move {self.uri}/{n} aside: {e}", file=sys.stderr)

    def _json(self, name: str) -> dict | None:
        raw = self._get(name)
        if not raw:
            return None
        try:
            value = json.loads(raw)
        except ValueError as e:
            print(f"warning: {self.uri}/{name} is unreadable ({e})", file=sys.stderr)
            return None
        return value if isinstance(value, dict) else None

    def write(self, name: str, data: bytes) -> None:
        """Store a small object (reference statistics, the FID log) beside the checkpoints."""
        self._put(name, data)

    def read(self, name: str) -> bytes | None:
        """A small object written with `write`, or None when absent."""
        return self._get(name)

    def save(self, state: dict, cur_nimg: int, info: dict | None = None) -> str:
        """Commit a checkpoint (object, record, then `latest.json`); prune old ones. -> its URI.

        `info` (stage, kimg, weights hash, ...) goes into the record that `records()` lists.
        """
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        name = snapshot_name(cur_nimg)
        record = {
            "name": name,
            "uri": f"{self.uri}/{name}",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            **(info or {}),
        }
        self._put_large(name, data)
        self._put(_record_name(name), json.dumps(record).encode())
        self._put(LATEST, json.dumps({k: record[k] for k in ("name", "size", "sha256")}).encode())
        self._prune(name)
        return record["uri"]

    def _prune(self, newest: str | None) -> None:
        """Keep the newest `keep` commits up to `newest` (the latest commit) and each stage's best.

        Checkpoints newer than `newest` are leftovers that no rerun reads (a crash before the
        pointer, a restarted run) and go too, so `newest` is never pruned as an old one.
        Records go after their objects; records left alone by a kill or a failed delete are
        removed on the next commit. Best-effort: a failed delete is logged and training goes on.
        """
        try:
            best = {b["name"] for b in self._bests().values()}
            listed = sorted(n for n in self._sizes() if n.startswith("snapshot-"))
        except StorageError as e:
            print(f"warning: not pruning {self.uri}: {e}", file=sys.stderr)
            return
        names = [n for n in listed if n.endswith(".pt")]
        records = [n for n in listed if n.endswith(".json")]
        committed = [n for n in names if newest is None or n <= newest]
        old = [n for n in committed[: -self.keep] if n not in best and n != newest]
        old += [n for n in names if newest is not None and n > newest and n not in best]
        kept = set(names) - set(old)
        doomed = old + [r for r in records if r[: -len(".json")] + ".pt" not in kept]
        for name in sorted(set(doomed), key=lambda n: (n.endswith(".json"), n)):
            try:
                self._delete(name)
            except (StorageError, OSError) as e:
                print(
                    f"warning: pruning {self.uri}/{name} failed ({e}); the next commit retries",
                    file=sys.stderr,
                )

    def _bests(self) -> dict[str, dict]:
        """Per progressive stage (as a string), the best checkpoint's {name, fid}."""
        return (self._json(BEST) or {}).get("stages", {})

    def mark_best(self, name: str, fid: float, stage: int = 0) -> bool:
        """Record checkpoint `name` as its stage's best so far if its FID beats the current one.

        FIDs are compared within a stage only (one resolution). Each stage's best survives
        pruning. Returns whether `name` is now the best of its stage.
        """
        names = self._names()
        if name not in names:
            raise StorageError(f"no checkpoint {self.uri}/{name} to mark as best")
        bests = self._bests()
        current = bests.get(str(stage))
        if current and current["name"] in names and current["fid"] <= fid:
            return current["name"] == name
        bests[str(stage)] = {"name": name, "fid": float(fid)}
        self._put(BEST, json.dumps({"stages": bests}).encode())
        self._prune((self._json(LATEST) or {}).get("name"))
        return True

    def records(self) -> list[dict]:
        """The committed checkpoints, oldest first: each record plus `latest` and `best` flags.

        `latest` marks the newest checkpoint that matches its record (size and sha256); newer
        ones that do not carry `corrupt` with the reason, as resume skips them.
        """
        latest = (self._json(LATEST) or {}).get("name")
        best = {b["name"]: b["fid"] for b in self._bests().values()}
        sizes = self._sizes()
        names = sorted(n for n in sizes if n.startswith("snapshot-") and n.endswith(".pt"))
        if latest in names:  # newer ones were never committed: a crash before the pointer
            names = names[: names.index(latest) + 1]
        out = []
        for name in names:
            record = self._json(_record_name(name))
            if record is None:  # never committed (a crash mid-commit) or from an older version
                continue
            record["latest"] = False
            record["best"] = name in best
            if record["best"]:
                record["fid"] = best[name]
            out.append(record)
        for record in reversed(out):
            problem = None
            if record.get("size") not in (None, sizes[record["name"]]):
                problem = f"{sizes[record['name']]} bytes, its record says {record['size']}"
            else:
                data = self._get(record["name"]) or b""
                if hashlib.sha256(data).hexdigest() != record.get("sha256"):
                    problem = "fails its checksum"
            if problem is None:
                record["latest"] = True
                break
            record["corrupt"] = problem
        return out

    def load_latest(self, move_aside: bool = False) -> tuple[dict, str] | None:
        """The newest checkpoint that loads and matches its checksum, and its URI.

        None when the run has no checkpoint; NoGoodCheckpoint when it has some but none
        loads. With `move_aside` (one process only), checkpoints that fail their checksum or
        do not load go to `corrupt/`, and `latest.json` names the one that loaded.
        """
        pointer = self._json(LATEST)
        if pointer is not None and not {"name", "sha256"} <= set(pointer):
            print(f"warning: {self.uri}/{LATEST} has no name or sha256", file=sys.stderr)
            pointer = None
        candidates = self._names()[::-1]
        if pointer and pointer["name"] in candidates:
            # Newer objects than the pointer's were never committed: try the pointer first.
            candidates = candidates[candidates.index(pointer["name"]) :]
        failures, moved = [], set()
        for name in candidates:
            expected = pointer if pointer and pointer["name"] == name else None
            state, problem, corrupt = self._try_load(name, expected)
            if state is not None:
                if pointer and pointer["name"] in moved:  # never point at a moved object
                    self._put(LATEST, json.dumps(self._pointer_to(name)).encode())
                return state, f"{self.uri}/{name}"
            print(f"warning: {self.uri}/{name} {problem}; trying older", file=sys.stderr)
            failures.append(f"{name}: {problem}")
            if corrupt and move_aside:
                self._move_aside(name, problem)
                moved.add(name)
        aside = sorted(n for n in self._sizes(CORRUPT) if n.endswith(".pt") and n not in moved)
        failures += [f"{name}: moved to {CORRUPT}/ by an earlier run" for name in aside]
        if not failures:
            return None
        if pointer and pointer["name"] in moved:
            self._delete(LATEST)
        raise NoGoodCheckpoint(f"no checkpoint of {self.uri} loads:\n  " + "\n  ".join(failures))

    def _pointer_to(self, name: str) -> dict:
        record = self._json(_record_name(name)) or {}
        return {"name": name, "size": record.get("size"), "sha256": record.get("sha256")}

    def load(self, name: str, expected: dict | None = None) -> dict | None:
        """Checkpoint `name` if it matches its recorded sha256 and loads safely; else None."""
        state, problem, _ = self._try_load(name, expected)
        if problem is not None:
            print(f"warning: {self.uri}/{name} {problem}", file=sys.stderr)
        return state

    def _try_load(self, name: str, expected: dict | None) -> tuple[dict | None, str | None, bool]:
        """(state, None, False) if `name` loads; else (None, why, whether it is corrupt).

        Corrupt: it fails its checksum or does not unpickle safely. Missing or not
        downloadable (the network, the endpoint) is not corrupt: the object may be fine.
        """
        try:
            data = self._get(name)
        except StorageError as e:
            return None, f"cannot be downloaded ({e})", False
        if data is None:
            return None, "is missing", False
        expected = expected or self._json(_record_name(name))
        if expected and hashlib.sha256(data).hexdigest() != expected["sha256"]:
            return None, "fails its checksum", True
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), None, False
        except Exception as e:  # a truncated or foreign file: fall back to an older one
            return None, f"does not load ({type(e).__name__}: {e})", True


_TMP_IDS = itertools.count()  # with the pid, a unique temporary name per write_atomic call


@contextlib.contextmanager
def write_atomic(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; when the block ends, flush that file to
    disk and rename it onto `path`, so readers see the old file or all of the new one.

    A block that raises leaves `path` untouched and the temporary removed; a block that
    deletes the temporary itself publishes nothing. The temporary is `.<name>.<pid>-<n>.tmp`,
    unique per process and call, so concurrent writers never share one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{next(_TMP_IDS)}.tmp")
    try:
        yield tmp
        if tmp.exists():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _s3_client(endpoint_url: str | None, attempts: int):
    import boto3
    from botocore.config import Config

    # botocore's standard mode retries throttling, 5xx and connection errors with
    # exponential back-off and jitter, up to `attempts` tries per request (each part too).
    config = Config(
        retries={"total_max_attempts": attempts, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint, config=config)
