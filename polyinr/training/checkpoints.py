"""Checkpoints of one run in a storage folder: commit, prune, keep each stage's best, resume.

A commit is three writes: the checkpoint object, its record `snapshot-N.json` (size, sha256,
stage, kimg, weights hash), then `latest.json`; on S3 a background thread makes them while
training goes on. A crash between writes leaves the previous commit intact. Loading verifies
the checksum, falls back to the previous good checkpoint, never runs code (weights_only) and
moves checkpoints that fail their checksum or do not load aside to `corrupt/`.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import threading
import time
from pathlib import Path

import torch

from polyinr.core.config import StorageConfig
from polyinr.core.storage import Folder, StorageError, StorageUnavailable

LATEST = "latest.json"
BEST = "best.json"
CORRUPT = "corrupt"  # the folder that checkpoints failing their checksum are moved to
_IN_FLIGHT = "the last upload is still in flight; a rerun resumes from it if it lands, else earlier"


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


def _snapshot_nimg(name: str) -> int:
    return int(name[len("snapshot-") : -len(".pt")])


def _record_name(name: str) -> str:
    return name[: -len(".pt")] + ".json"


class CheckpointStore:
    """Checkpoints of one run under `<uri>/<run_name>/`, on disk or in S3."""

    def __init__(self, cfg: StorageConfig, run_name: str):
        self.folder = Folder(cfg, run_name)
        self.keep = cfg.keep
        self.uri = self.folder.uri
        self.root = self.folder.root  # the local folder; None on S3
        self.outage_minutes = cfg.outage_minutes
        self._upload: threading.Thread | None = None  # the commit in flight (S3)
        self._failure: Exception | None = None  # what ended the last one, for `wait`

    def check(self) -> None:
        """Fail now, with one clear message, if the storage cannot be written."""
        self.folder.check()

    def _names(self) -> list[str]:
        """The checkpoints stored, once the upload in flight has landed: reads see commits."""
        self.wait()
        names = self.folder.sizes()
        return sorted(n for n in names if n.startswith("snapshot-") and n.endswith(".pt"))

    def _move_aside(self, name: str, reason: str) -> None:
        """Move a checkpoint that fails its checks (and its record) to `corrupt/`."""
        print(f"warning: moving {self.uri}/{name} to {CORRUPT}/: {reason}", file=sys.stderr)
        for n in (name, _record_name(name)):
            try:
                self.folder.move(n, CORRUPT)
            except (StorageError, OSError) as e:
                if n == name:  # a missing record is normal (older versions, a crash)
                    print(f"warning: cannot move {self.uri}/{n} aside: {e}", file=sys.stderr)

    def _json(self, name: str) -> dict | None:
        raw = self.folder.get(name)
        if not raw:
            return None
        try:
            value = json.loads(raw)
        except ValueError as e:
            print(f"warning: {self.uri}/{name} is unreadable ({e})", file=sys.stderr)
            return None
        return value if isinstance(value, dict) else None

    def write(self, name: str, data: bytes) -> None:
        """Store a small object (the FID log, the run's record) beside the checkpoints."""
        self.folder.put(name, data)

    def read(self, name: str) -> bytes | None:
        """A small object written with `write`, or None when absent."""
        return self.folder.get(name)

    def save(
        self, state: dict, cur_nimg: int, info: dict | None = None, patience: float | None = None
    ) -> str | None:
        """Commit a checkpoint (object, record, then `latest.json`); prune old ones. -> its URI.

        `info` (stage, kimg, weights hash, ...) goes into the record that `records()` lists.
        On S3 the object is staged on disk (a full disk fails here), then committed by a thread
        while training goes on; a save first waits for the previous one, so commits land in
        order. `patience` (SIGTERM): wait at most this long for each upload (None: not saved).
        """
        if not self.wait(patience):
            print(f"warning: not saving kimg {cur_nimg / 1000:g}: {_IN_FLIGHT}", file=sys.stderr)
            return None
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
        if self.folder.s3 is None:
            self.folder.put_large(name, data)
            self._commit(record)
            self._prune(name)
            return record["uri"]
        local = self.folder.stage(name, data)
        self._upload = threading.Thread(
            target=self._upload_commit, args=(local, record), name="checkpoint-upload", daemon=True
        )
        self._upload.start()
        if patience is not None and not self.wait(patience):
            print(f"warning: leaving the upload of {name} (SIGTERM): {_IN_FLIGHT}", file=sys.stderr)
        return record["uri"]

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the upload in flight, at most `timeout` seconds; whether none is left.
        Raises the error that ended the last one: it did not land, the previous commit holds."""
        if self._upload is not None:
            self._upload.join(timeout)
            if self._upload.is_alive():
                return False
            self._upload = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        return True

    def _upload_commit(self, local: Path, record: dict) -> None:
        """The upload thread: the staged copy, record and `latest.json`, then prune. Transient
        failures are retried (back-off up to 30 s) for storage.outage_minutes, then kept for
        `wait` to raise, as is any other error."""
        name, failing_since, delay = record["name"], None, 1.0
        while True:
            try:
                if local.exists():  # not yet uploaded (a retry after it was skips it)
                    self.folder.upload(name, local)
                self._commit(record)
                break
            except StorageUnavailable as e:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= self.outage_minutes * 60:
                    self._failure = StorageUnavailable(
                        f"S3 has failed for {now - failing_since:.0f} s "
                        f"(storage.outage_minutes={self.outage_minutes:g}): {e}; the previous "
                        "commit is intact: rerun the same command once S3 answers"
                    )
                    return
                if failing_since == now:
                    limit = f"{self.outage_minutes:g} min (storage.outage_minutes)"
                    print(f"warning: {e}; retrying for up to {limit}", file=sys.stderr)
                time.sleep(delay)
                delay = min(2 * delay, 30.0)
            except Exception as e:  # StorageError: not transient, no retry
                self._failure = e
                return
        self._prune(name)

    def _commit(self, record: dict) -> None:
        """The record, then the `latest.json` that names the checkpoint (already stored)."""
        self.folder.put(_record_name(record["name"]), json.dumps(record).encode())
        pointer = {k: record[k] for k in ("name", "size", "sha256")}
        self.folder.put(LATEST, json.dumps(pointer).encode())

    def _prune(self, newest: str | None) -> None:
        """Keep the newest `keep` commits up to `newest` (the latest commit) and each stage's best.

        Checkpoints newer than `newest` are leftovers that no rerun reads (a crash before the
        pointer, a restarted run) and go too, so `newest` is never pruned as an old one.
        Records go after their objects; records left alone by a kill or a failed delete are
        removed on the next commit. Best-effort: a failed delete is logged and training goes on.
        """
        try:
            best = {b["name"] for b in self._bests().values()}
            listed = sorted(n for n in self.folder.sizes() if n.startswith("snapshot-"))
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
                self.folder.delete(name)
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
        self.folder.put(BEST, json.dumps({"stages": bests}).encode())
        self._prune((self._json(LATEST) or {}).get("name"))
        return True

    def best(self, stage: int) -> dict | None:
        """The stage's best checkpoint as `mark_best` recorded it: {name, kimg, fid}.

        None when none was marked, or when the marked one is gone (moved to `corrupt/`):
        as in `mark_best`, a checkpoint that is not there is no best.
        """
        self.wait()
        current = self._bests().get(str(stage))
        if current is None or current["name"] not in self._names():
            return None
        kimg = _snapshot_nimg(current["name"]) / 1000
        return {"name": current["name"], "kimg": kimg, "fid": current["fid"]}

    def summary(self) -> dict | None:
        """What a listing of runs shows, from the JSON files only (no checkpoint is read):
        uri, checkpoints (count), latest {name, stage, resolution, kimg} and best {stage, fid,
        kimg} of the last stage with one. None when the folder holds no checkpoint."""
        names = self._names()
        pointer = self._json(LATEST) or {}
        if not names and not pointer:
            return None
        latest = pointer.get("name") or names[-1]
        record = self._json(_record_name(latest)) or {}
        out = {"uri": self.uri, "checkpoints": len(names), "latest": {"name": latest}}
        out["latest"] |= {k: record[k] for k in ("stage", "resolution", "kimg") if k in record}
        out["latest"].setdefault("kimg", _snapshot_nimg(latest) / 1000)
        bests = self._bests()
        if bests:
            stage = max(bests, key=int)
            kimg = _snapshot_nimg(bests[stage]["name"]) / 1000
            out["best"] = {"stage": int(stage), "fid": bests[stage]["fid"], "kimg": kimg}
        return out

    def records(self) -> list[dict]:
        """The committed checkpoints, oldest first: each record plus `latest` and `best` flags.

        `latest` marks the newest checkpoint that matches its record (size and sha256); newer
        ones that do not carry `corrupt` with the reason, as resume skips them.
        """
        self.wait()
        latest = (self._json(LATEST) or {}).get("name")
        best = {b["name"]: b["fid"] for b in self._bests().values()}
        sizes = self.folder.sizes()
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
                data = self.folder.get(record["name"]) or b""
                recorded = record.get("sha256")  # null: nothing to check against
                if recorded and hashlib.sha256(data).hexdigest() != recorded:
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
        self.wait()
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
                    self.folder.put(LATEST, json.dumps(self._pointer_to(name)).encode())
                return state, f"{self.uri}/{name}"
            print(f"warning: {self.uri}/{name} {problem}; trying older", file=sys.stderr)
            failures.append(f"{name}: {problem}")
            if corrupt and move_aside:
                self._move_aside(name, problem)
                moved.add(name)
        aside = self.folder.sizes(CORRUPT)
        failures += [
            f"{name}: moved to {CORRUPT}/ by an earlier run"
            for name in sorted(aside)
            if name.endswith(".pt") and name not in moved
        ]
        if not failures:
            return None
        if pointer and pointer["name"] in moved:
            self.folder.delete(LATEST)
        raise NoGoodCheckpoint(f"no checkpoint of {self.uri} loads:\n  " + "\n  ".join(failures))

    def _pointer_to(self, name: str) -> dict:
        """A `latest.json` for `name`: from its record, or, when the record is missing (a kill
        mid-commit, an older version), from the object itself, so the pointer always carries
        a hash that the next resume can check (a null one threw a good checkpoint away)."""
        record = self._json(_record_name(name)) or {}
        if record.get("sha256") and record.get("size") is not None:
            return {"name": name, "size": record["size"], "sha256": record["sha256"]}
        data = self.folder.get(name) or b""
        return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def load(self, name: str, expected: dict | None = None) -> dict | None:
        """Checkpoint `name` if it matches its recorded sha256 and loads safely; else None."""
        self.wait()
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
            data = self.folder.get(name)
        except StorageError as e:
            return None, f"cannot be downloaded ({e})", False
        if data is None:
            return None, "is missing", False
        expected = expected or self._json(_record_name(name))
        # No recorded hash (null, or no record at all) is no evidence of corruption: the
        # unpickling below is the check, and only a hash that differs moves a checkpoint aside.
        recorded = (expected or {}).get("sha256")
        if recorded and hashlib.sha256(data).hexdigest() != recorded:
            return None, "fails its checksum", True
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), None, False
        except Exception as e:  # a truncated or foreign file: fall back to an older one
            return None, f"does not load ({type(e).__name__}: {e})", True
