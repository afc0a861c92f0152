"""Checkpoints in a local folder or an S3 bucket (boto3 lives only here).

A checkpoint is committed in two writes: the checkpoint object, then a small `latest.json`
pointer with its name, size and sha256. Loading verifies the checksum and falls back to
the previous checkpoint when the latest is missing or corrupt. Loading never runs code:
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import torch

LATEST = "latest.json"


class StorageError(RuntimeError):
    """Checkpoint storage that cannot be reached or used."""


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """Where checkpoints go: a local folder or s3://bucket/prefix; how many are kept."""

    uri: str
    endpoint_url: str | None
    keep: int

    def __post_init__(self):
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")


class CheckpointStore:
    """Checkpoints of one run under `<uri>/<run_name>/`, on disk or in S3."""

    def __init__(self, cfg: StorageConfig, run_name: str):
        self.keep = cfg.keep
        if cfg.uri.startswith("s3://"):
            bucket, _, prefix = cfg.uri[len("s3://") :].partition("/")
            self.bucket = bucket
            self.prefix = "/".join(p for p in (prefix.strip("/"), run_name) if p)
            self.uri = f"s3://{bucket}/{self.prefix}"
            self.s3 = _s3_client(cfg.endpoint_url)
            self.root = None
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
            raise StorageError(f"cannot use bucket {self.bucket!r} ({code}): {e}") from None
        except botocore.exceptions.EndpointConnectionError as e:
            raise StorageError(f"cannot reach the S3 endpoint: {e}") from None

    # Raw object access: the only place that knows local vs S3.
    def _put(self, name: str, data: bytes) -> None:
        if self.s3 is not None:
            self.s3.upload_fileobj(io.BytesIO(data), self.bucket, f"{self.prefix}/{name}")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / name)

    def _get(self, name: str) -> bytes | None:
        if self.s3 is not None:
            try:
                obj = self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")
            except self.s3.exceptions.NoSuchKey:
                return None
            return obj["Body"].read()
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def _names(self) -> list[str]:
        if self.s3 is not None:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/"
            )
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
            names = [k[len(self.prefix) + 1 :] for k in keys]
        else:
            names = [p.name for p in self.root.glob("*")] if self.root.is_dir() else []
        return sorted(n for n in names if n.startswith("snapshot-") and n.endswith(".pt"))

    def _delete(self, name: str) -> None:
        if self.s3 is not None:
            self.s3.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")
        else:
            (self.root / name).unlink(missing_ok=True)

    def save(self, state: dict, cur_nimg: int) -> str:
        """Write a checkpoint, then point `latest.json` at it; prune old ones. -> its URI."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        name = f"snapshot-{cur_nimg:012d}.pt"
        self._put(name, data)
        pointer = {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self._put(LATEST, json.dumps(pointer).encode())
        for old in self._names()[: -self.keep]:
            self._delete(old)
        return f"{self.uri}/{name}"

    def load_latest(self) -> tuple[dict, str] | None:
        """The newest checkpoint that loads and matches its checksum, and its URI; or None."""
        pointer = None
        pointer_raw = self._get(LATEST)
        if pointer_raw:
            try:
                pointer = json.loads(pointer_raw)
                if not {"name", "sha256"} <= set(pointer):
                    raise ValueError("no name or sha256")
            except ValueError as e:  # JSONDecodeError too: fall back to listing snapshots
                print(f"warning: {self.uri}/{LATEST} is unreadable ({e})", file=sys.stderr)
                pointer = None
        candidates = self._names()[::-1]
        if pointer and pointer["name"] in candidates:
            candidates.remove(pointer["name"])
            candidates.insert(0, pointer["name"])
        for name in candidates:
            data = self._get(name)
            if data is None:
                continue
            if pointer and name == pointer["name"]:
                if hashlib.sha256(data).hexdigest() != pointer["sha256"]:
                    print(
                        f"warning: {self.uri}/{name} fails its checksum; trying older",
                        file=sys.stderr,
                    )
                    continue
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as e:  # a truncated or foreign file: fall back to an older one
                print(
                    f"warning: cannot load {self.uri}/{name} ({e}); trying older", file=sys.stderr
                )
                continue
            return state, f"{self.uri}/{name}"
        return None


def _s3_client(endpoint_url: str | None):
    import boto3
    from botocore.config import Config

    # Retries with back-off on throttling, 5xx and connection errors.
    config = Config(retries={"max_attempts": 10, "mode": "standard"})
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint, config=config)
