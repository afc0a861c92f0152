"""A folder of named objects on a local disk or under an S3 prefix (boto3 lives only here).

Local writes are atomic; S3 requests are retried with botocore's back-off, and large objects
are staged on disk, then uploaded in parts. Checkpoints on top of it:
`polyinr.training.checkpoints`.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from polyinr.core.config import StorageConfig
from polyinr.core.errors import StorageError, StorageUnavailable

MiB = 1 << 20


class Folder:
    """The objects under `<cfg.uri>/<name>/`, a local folder or an S3 prefix."""

    def __init__(self, cfg: StorageConfig, name: str):
        self.retries = cfg.retries
        self.multipart_mb = cfg.multipart_mb
        if cfg.uri.startswith("s3://"):
            bucket, _, prefix = cfg.uri[len("s3://") :].partition("/")
            if not bucket:
                raise StorageError(f"storage.uri={cfg.uri!r} names no bucket (s3://bucket/prefix)")
            self.bucket = bucket
            self.prefix = "/".join(p for p in (prefix.strip("/"), name) if p)
            self.uri = f"s3://{bucket}/{self.prefix}"
            self.s3 = _s3_client(cfg.endpoint_url, cfg.retries)
            self.root = None
            self.staging = Path(cfg.staging_dir) / name
        else:
            self.s3 = None
            self.root = Path(cfg.uri) / name
            self.uri = str(self.root)

    def check(self) -> None:
        """Fail now, with one clear message, if the folder cannot be written."""
        if self.s3 is None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise StorageError(f"storage folder {self.root} is not writable")
            return
        import botocore.exceptions

        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.NoCredentialsError:
            raise StorageError(
                f"no AWS credentials for {self.uri}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from None
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            kind = failure(e)
            if kind is StorageUnavailable:
                raise kind(f"cannot reach the S3 endpoint for {self.uri}: {e}") from None
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "?")
            what = (
                "does not exist" if code in ("404", "NoSuchBucket") else f"cannot be used ({code})"
            )
            if code in ("403", "Forbidden", "AccessDenied", "InvalidAccessKeyId"):
                # HEAD answers carry no body, so S3 says only "Forbidden": name the usual cause.
                what = (
                    f"refused access ({code}), usually wrong credentials: check "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that they "
                    "may use this bucket"
                )
            raise kind(f"bucket {self.bucket!r} of storage.uri {what}: {e}") from None

    def put(self, name: str, data: bytes) -> None:
        """Store a small object in one request (an atomic file locally)."""
        if self.s3 is not None:
            self._call("upload", self.s3.put_object, Body=data, Key=f"{self.prefix}/{name}")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        write_file(self.root / name, data)

    def put_large(self, name: str, data: bytes) -> None:
        """A large object: an atomic file locally; on S3 staged on disk, then (multipart)
        uploaded and its size checked. A failed upload leaves the staged copy in place."""
        if self.s3 is None:
            self.put(name, data)
            return
        self.upload(name, self.stage(name, data))

    def stage(self, name: str, data: bytes) -> Path:
        """S3: write the object's local copy under storage.staging_dir, to `upload` later."""
        self.staging.mkdir(parents=True, exist_ok=True)
        local = self.staging / name
        write_file(local, data)
        return local

    def upload(self, name: str, local: Path) -> None:
        """S3: upload a staged copy (in parts above multipart_mb), check the stored size, then
        remove the copy. A failed upload leaves it in place."""
        from boto3.s3.transfer import TransferConfig

        part = self.multipart_mb * MiB
        transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part)
        key, expected = f"{self.prefix}/{name}", local.stat().st_size
        self._call(
            f"upload (the object stays at {local})",
            self.s3.upload_file,
            str(local),
            self.bucket,
            key,
            Config=transfer,
        )
        size = self._call("check", self.s3.head_object, Key=key)["ContentLength"]
        if size != expected:
            raise StorageError(f"{self.uri}/{name} has {size} bytes, expected {expected}")
        local.unlink()

    def get(self, name: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        if self.s3 is None:
            path = self.root / name
            return path.read_bytes() if path.is_file() else None
        import botocore.exceptions
        from botocore.retries.standard import ExponentialBackoff, RetryContext

        # botocore retries a request until its headers arrive; a body cut off after that
        # (a dropped connection, a short read) is retried here, with botocore's back-off.
        backoff = ExponentialBackoff()
        for attempt in range(1, self.retries + 1):
            try:
                obj = self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")
                data = obj["Body"].read()
            except botocore.exceptions.ClientError as e:  # botocore retried 5xx already
                # NoSuchKey; or a bare 404 when the error's XML body was cut off on the way.
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise failure(e)(f"S3 download of {self.uri}/{name} failed: {e}") from e
            except botocore.exceptions.BotoCoreError as e:
                if failure(e) is StorageError:  # no credentials: no retry
                    raise StorageError(f"S3 download of {self.uri}/{name} failed: {e}") from e
                error = f"{type(e).__name__}: {e}"
            else:
                if len(data) == obj["ContentLength"]:
                    return data
                error = f"{len(data)} of {obj['ContentLength']} bytes arrived"
            if attempt < self.retries:
                time.sleep(backoff.delay_amount(RetryContext(attempt_number=attempt)))
        raise StorageUnavailable(
            f"S3 download of {self.uri}/{name} failed {self.retries} times: {error}"
        )

    def sizes(self, subfolder: str = "") -> dict[str, int]:
        """Every object directly in the folder (or its subfolder): name -> bytes."""
        if self.s3 is None:
            where = self.root / subfolder
            if not where.is_dir():
                return {}
            return {p.name: p.stat().st_size for p in where.iterdir() if p.is_file()}
        import botocore.exceptions

        prefix = "/".join(filter(None, (self.prefix, subfolder))) + "/"
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/"
        )
        try:
            objects = [o for page in pages for o in page.get("Contents", [])]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise failure(e)(f"S3 listing of {self.uri} failed: {e}") from e
        return {o["Key"][len(prefix) :]: o["Size"] for o in objects}

    def subfolders(self) -> list[str]:
        """The names of the folders directly in this one (S3: the common prefixes), sorted."""
        if self.s3 is None:
            if not self.root.is_dir():
                return []
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        import botocore.exceptions

        prefix = f"{self.prefix}/" if self.prefix else ""
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/"
        )
        try:
            common = [c["Prefix"] for page in pages for c in page.get("CommonPrefixes", [])]
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise StorageError(f"S3 listing of {self.uri} failed: {e}") from e
        return sorted(c[len(prefix) :].rstrip("/") for c in common)

    def delete(self, name: str) -> None:
        """Remove the object; an absent one is not an error."""
        if self.s3 is not None:
            self._call("delete", self.s3.delete_object, Key=f"{self.prefix}/{name}")
        else:
            (self.root / name).unlink(missing_ok=True)

    def move(self, name: str, subfolder: str) -> None:
        """Move the object into a subfolder (on S3: copy, then delete); absent: nothing."""
        if self.s3 is None:
            if (self.root / name).is_file():
                (self.root / subfolder).mkdir(exist_ok=True)
                os.replace(self.root / name, self.root / subfolder / name)
            return
        source = {"Bucket": self.bucket, "Key": f"{self.prefix}/{name}"}
        target = f"{self.prefix}/{subfolder}/{name}"
        self._call("copy", self.s3.copy_object, CopySource=source, Key=target)
        self.delete(name)

    def swap(self, name: str, data: bytes | None, expected: bytes | None) -> bool:
        """Compare and swap: replace object `name` by `data` (None: delete it) only if it now
        holds `expected` (None: it does not exist); returns whether it did.

        Locally under an flock on `.<name>.lock`. On S3 by conditional requests: a put with
        If-None-Match: * creates, If-Match: <ETag> replaces or deletes; 412 or 409 is False.
        A server that ignores these headers makes this a plain write: callers read back.
        """
        if self.s3 is None:
            import fcntl

            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / f".{name}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self.get(name) != expected:
                    return False
                if data is None:
                    self.delete(name)
                else:
                    write_file(self.root / name, data)
                return True
        key, condition = f"{self.prefix}/{name}", {"IfNoneMatch": "*"}
        if expected is not None:
            try:
                current = self._call("download", self.s3.get_object, Key=key)
            except StorageError as e:
                if _status(e) == 404:
                    return False
                raise
            if current["Body"].read() != expected:
                return False
            condition = {"IfMatch": current["ETag"]}
        try:
            if data is None:
                self._call("delete", self.s3.delete_object, Key=key, **condition)
            else:
                self._call("upload", self.s3.put_object, Key=key, Body=data, **condition)
        except StorageError as e:
            if _status(e) in (404, 409, 412):  # changed (or gone) since we read it
                return False
            raise
        return True

    def _call(self, what: str, fn, *args, **kwargs):
        """One boto3 call (botocore retries it with back-off); a final failure -> StorageError,
        StorageUnavailable when it is transient (see `failure`)."""
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
        raise failure(error)(
            f"S3 {what} failed for {self.uri} after {self.retries} attempts per request: {error}"
        ) from error


def failure(error: BaseException) -> type[StorageError]:
    """StorageUnavailable for what a later retry can fix (no connection, a timeout, a cut-off
    body, 5xx or throttling, after botocore's retries); StorageError for the rest (no
    credentials, access denied, no bucket, a bad endpoint URL)."""
    import botocore.exceptions

    # boto3's S3UploadFailedError wraps the ClientError (or connection error) it caught.
    while error.__context__ is not None and not isinstance(
        error, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError
    ):
        error = error.__context__
    transient = (
        botocore.exceptions.ConnectionError,
        botocore.exceptions.HTTPClientError,
        botocore.exceptions.IncompleteReadError,
    )
    if isinstance(error, transient):
        return StorageUnavailable
    if isinstance(error, botocore.exceptions.ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = error.response.get("Error", {}).get("Code", "")
        if status >= 500 or status == 429 or code in ("SlowDown", "Throttling", "RequestTimeout"):
            return StorageUnavailable
    return StorageError


def _status(error: StorageError) -> int | None:
    """The HTTP status of the S3 answer behind a StorageError (None: no answer)."""
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


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


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (write_atomic). A full disk is one line naming the
    path and the bytes needed: StorageUnavailable (exit 75), since freeing space makes the
    same command work, and the file it would have replaced (the previous commit) is intact."""
    try:
        with write_atomic(path) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"cannot write {path}: {e.strerror or e}") from None
        free = shutil.disk_usage(path.parent).free
        raise StorageUnavailable(
            f"disk full: writing {path} needs {len(data)} bytes, {free} are free there; the "
            "previous checkpoint is intact: free space and rerun the same command"
        ) from None


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
