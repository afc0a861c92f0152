"""A local S3-compatible server whose buckets live in a folder: moto's S3, mirrored to disk.

moto's server speaks S3 over HTTP but keeps objects in memory only. This script restores
DIR/<bucket>/<key> into it at start, copies every change back to DIR every few seconds
(by ETag, so only changed objects are read), and once more on SIGTERM/SIGINT. A crash
loses at most the last interval's writes. For the development stack only: production
points the same code at real S3 (AWS_ENDPOINT_URL unset, or set to the provider's).

    python scripts/s3_server.py --dir .stack/s3 --port 9000 --bucket polyinr
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

TOKEN_PATH = "/_polyinr/token"  # answers --token, so stack.sh knows the server is its own
INDEX = ".etags.json"  # {bucket/key: etag} of the objects DIR holds, to copy only changes


def _client(endpoint: str):
    import boto3
    from botocore.config import Config

    # The server accepts any key pair; these are not credentials.
    return boto3.session.Session(
        aws_access_key_id="local", aws_secret_access_key="local", region_name="us-east-1"
    ).client("s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 3}))


class Mirror:
    """Keeps a folder and the server's buckets equal: restore() once, then sync() often."""

    def __init__(self, root: Path, endpoint: str):
        self.root = root.resolve()
        self.s3 = _client(endpoint)
        self.lock = threading.Lock()
        index = self.root / INDEX
        self.etags: dict[str, str] = json.loads(index.read_text()) if index.is_file() else {}

    def _path(self, bucket: str, key: str) -> Path:
        path = (self.root / bucket / key).resolve()
        if not path.is_relative_to(self.root / bucket):
            raise ValueError(f"key {key!r} escapes its bucket folder")
        return path

    def restore(self) -> int:
        """Create a bucket per folder and upload its files; returns the object count."""
        count, etags = 0, {}
        for bucket_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            self.s3.create_bucket(Bucket=bucket_dir.name)
            for path in sorted(p for p in bucket_dir.rglob("*") if p.is_file()):
                key = path.relative_to(bucket_dir).as_posix()
                self.s3.upload_file(str(path), bucket_dir.name, key)
                head = self.s3.head_object(Bucket=bucket_dir.name, Key=key)
                etags[f"{bucket_dir.name}/{key}"] = head["ETag"]
                count += 1
        self.etags = etags
        self._write_index()
        return count

    def sync(self) -> int:
        """Copy new and changed objects to the folder, drop deleted ones; returns changes."""
        with self.lock:
            seen: dict[str, str] = {}
            changed = 0
            buckets = [b["Name"] for b in self.s3.list_buckets().get("Buckets", [])]
            for bucket in buckets:
                (self.root / bucket).mkdir(parents=True, exist_ok=True)
                pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for obj in (o for page in pages for o in page.get("Contents", [])):
                    name, etag = f"{bucket}/{obj['Key']}", obj["ETag"]
                    seen[name] = etag
                    if obj["Key"].endswith("/") or self.etags.get(name) == etag:
                        continue
                    path = self._path(bucket, obj["Key"])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f".{path.name}.part")
                    self.s3.download_file(bucket, obj["Key"], str(tmp))
                    os.replace(tmp, path)
                    changed += 1
            for name in set(self.etags) - set(seen):
                bucket, _, key = name.partition("/")
                self._path(bucket, key).unlink(missing_ok=True)
                changed += 1
            for bucket_dir in (p for p in self.root.iterdir() if p.is_dir()):
                if bucket_dir.name not in buckets:  # a deleted bucket
                    shutil.rmtree(bucket_dir)
            self.etags = seen
            self._write_index()
            return changed

    def _write_index(self) -> None:
        tmp = self.root / f"{INDEX}.tmp"
        tmp.write_text(json.dumps(self.etags, indent=0, sort_keys=True))
        os.replace(tmp, self.root / INDEX)


def _listen(host: str, port: int, token: str | None):
    """moto's S3 app listening on host:port, bound here in the main thread (moto's
    ThreadedMotoServer binds in its thread and, when the port is taken, waits forever);
    None, after one line on stderr, when the port cannot be bound."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    moto_app = DomainDispatcherApplication(create_backend_app)

    def app(environ, start_response):
        if token is not None and environ.get("PATH_INFO") == TOKEN_PATH:
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [token.encode()]
        return moto_app(environ, start_response)

    try:
        # werkzeug reports a failed bind itself and raises SystemExit(1)
        return make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
    except (OSError, SystemExit) as e:
        print(
            f"s3_server: cannot listen on {host}:{port} ({e}): is the port in use?", file=sys.stderr
        )
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, type=Path, help="folder holding the buckets")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", action="append", default=[], help="create if missing")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between syncs")
    parser.add_argument(
        "--token", default=None, help=f"answer GET {TOKEN_PATH} with this (stack.sh: it is ours)"
    )
    args = parser.parse_args(argv)

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    args.dir.mkdir(parents=True, exist_ok=True)
    server = _listen(args.host, args.port, args.token)
    if server is None:
        return 1
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    endpoint = f"http://{host}:{port}"
    mirror = Mirror(args.dir, endpoint)
    restored = mirror.restore()
    for bucket in args.bucket:
        if not (args.dir / bucket).is_dir():
            mirror.s3.create_bucket(Bucket=bucket)
    mirror.sync()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"s3 server at {endpoint}, data in {args.dir} ({restored} objects restored)", flush=True)
    while not stop.wait(args.interval):
        try:
            mirror.sync()
        except Exception as e:  # keep serving; the next interval tries again
            print(f"s3_server: sync failed: {e}", file=sys.stderr, flush=True)
    mirror.sync()
    server.shutdown()
    print("s3 server stopped; data synced to disk", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
