"""One writer per scores table: a lease that a second job cannot take while the first holds it.

A lease is a small JSON file, ``OUTPUT/_lease/<generation>.json``, created whole with the
store's own atomic create-if-absent (link(2) of a written file on local disk, a conditional PUT
``If-None-Match: *`` on S3), so of two jobs that race for generation N+1 exactly one gets it.
The holder rewrites its file whole every ``ttl_s / 3`` seconds (a heartbeat thread); a lease
whose heartbeat is older than ``ttl_s`` is stale (an unreadable one counts from its file's
time), and so is one held by a process of this host that no longer exists (a
kill -9): the next job takes generation N+1 at once instead of waiting out the ttl. Nothing is
ever deleted to take a lease, so no job can delete a lease another has just taken.
Readers of the table skip ``_lease/`` (names starting with ``_``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow.fs as pafs

from cxr.data.storage import StorageConfig, filesystem_for, is_s3, s3_client

log = logging.getLogger(__name__)
LEASE_DIR = "_lease"


class LeaseHeld(RuntimeError):
    """Another job holds the lease of this output."""


@dataclass
class Lease:
    """``with Lease(output, job_id, storage):`` holds the output's lease for the block, or raises
    ``LeaseHeld`` naming the holder."""

    output: str
    job_id: str
    storage: StorageConfig | None = None
    ttl_s: float = 600.0
    generation: int | None = field(default=None, init=False)
    lost: str | None = field(default=None, init=False)      # why the heartbeat found the lease gone
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # --- the files ---------------------------------------------------------------------------

    def _dir(self) -> str:
        return f"{self.output.rstrip('/')}/{LEASE_DIR}"

    def _uri(self, generation: int) -> str:
        return f"{self._dir()}/{generation:012d}.json"

    def _generations(self) -> list[int]:
        fs, path = filesystem_for(self._dir(), self.storage)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except FileNotFoundError:        # created by a racer between the check and the listing
            infos = []
        names = (os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File)
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _read(self, generation: int) -> dict | None:
        """The record of a generation; None if the file is gone. A file that is not a valid
        record counts as held by an unknown job until ``ttl_s`` after it was last written:
        unreadable must never mean free."""
        fs, path = filesystem_for(self._uri(generation), self.storage)
        try:
            with fs.open_input_stream(path) as f:
                record = json.loads(f.read())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            return {**record, "heartbeat": float(record["heartbeat"]), "ttl_s": float(record["ttl_s"]),
                    "job_id": str(record["job_id"])}
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                return None
            return {"job_id": "unknown (an unreadable lease file)", "host": "?", "pid": None,
                    "heartbeat": (info.mtime_ns or 0) / 1e9, "ttl_s": self.ttl_s, "heartbeat_at": str(info.mtime)}
        except OSError as e:
            if "NoSuchKey" in str(e) or "does not exist" in str(e):
                return None
            raise

    def _record(self) -> bytes:
        return json.dumps({"job_id": self.job_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": time.time(), "ttl_s": self.ttl_s,
                           "heartbeat_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()

    def _create(self, generation: int) -> bool:
        """Create this generation's file if absent; False if another job created it first."""
        uri = self._uri(generation)
        if is_s3(uri):
            bucket, key = uri[len("s3://"):].split("/", 1)
            client = s3_client(self.storage or StorageConfig())
            try:
                client.put_object(Bucket=bucket, Key=key, Body=self._record(), IfNoneMatch="*")
            except client.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
            return True
        # Local disk: the whole record is written to a file of our own, then linked to the
        # generation's name. link(2) fails if the name exists, so the file appears complete,
        # and only once (an open(..., "x") would show racers an empty file first).
        tmp = self._scratch(uri)
        try:
            os.link(tmp, uri)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def _scratch(self, uri: str, record: bytes | None = None) -> str:
        """The record in a new file beside ``uri`` (a ``.tmp`` name readers do not take)."""
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        tmp = f"{uri}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(record or self._record())
        return tmp

    def _write(self, generation: int, record: bytes | None = None) -> None:
        """Rewrite this generation's record whole: one PUT on S3, a rename over it on disk."""
        uri = self._uri(generation)
        if is_s3(uri):
            fs, path = filesystem_for(uri, self.storage)
            with fs.open_output_stream(path) as f:
                f.write(record or self._record())
        else:
            os.replace(self._scratch(uri, record), uri)

    # --- the protocol ------------------------------------------------------------------------

    def holder(self) -> tuple[int, dict | None] | None:
        """The newest generation and its record, if any."""
        generations = self._generations()
        return (generations[-1], self._read(generations[-1])) if generations else None

    @staticmethod
    def stale(record: dict | None, now: float | None = None) -> bool:
        """Released, unreadable, past its ttl, or held by a process of this host that is gone."""
        if record is None or record.get("released"):
            return True
        if (now or time.time()) - float(record.get("heartbeat", 0)) > float(record.get("ttl_s", 0)):
            return True
        if record.get("host") == socket.gethostname() and record.get("pid") is not None:
            try:
                os.kill(int(record["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError):
                pass
        return False

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lease, waiting up to ``wait_s`` for a held one to be released or go stale
        (a retried pod on another host cannot see that the killed driver is gone)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._try_acquire()
            except LeaseHeld:
                if time.monotonic() >= deadline:
                    raise
                log.info("waiting for the lease of %s", self.output)
                time.sleep(max(0.05, min(10.0, self.ttl_s / 4, deadline - time.monotonic())))

    def _try_acquire(self) -> None:
        for _ in range(5):          # a lost race re-reads the newest lease before giving up
            current = self.holder()
            if current is not None and not self.stale(current[1]):
                generation, record = current
                raise LeaseHeld(f"output {self.output} is being written by job {record['job_id']} "
                                f"(host {record.get('host', '?')}, pid {record.get('pid', '?')}, last heartbeat "
                                f"{record.get('heartbeat_at', '?')}); run again when it ends, or after "
                                f"{record['ttl_s']:.0f} s without a heartbeat")
            generation = current[0] + 1 if current else 0
            if self._create(generation):
                self.generation = generation
                if current is not None:
                    log.info("took the lease of %s over from a stale holder (%s)", self.output, current[1])
                self._thread = threading.Thread(target=self._heartbeat, name="cxr-lease", daemon=True)
                self._thread.start()
                return
        raise LeaseHeld(f"output {self.output}: another job took the lease while this one tried")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                newest = self._generations()
                if newest and newest[-1] != self.generation:
                    self.lost = f"job {self._read(newest[-1]) or {}} took the lease after a missed heartbeat"
                    log.error("lease of %s lost: %s", self.output, self.lost)
                    return
                self._write(self.generation)
            except OSError as e:        # one failed heartbeat is retried at the next beat
                log.warning("lease heartbeat for %s failed: %s", self.output, e)

    def release(self) -> None:
        """Mark the lease released (kept as the newest generation, so the next job takes N+1)
        and clear the generations before it."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.generation is None or self.lost:
            return
        try:
            fs, _ = filesystem_for(self._dir(), self.storage)
            self._write(self.generation, json.dumps({**json.loads(self._record()), "released": True}).encode())
            for old in self._generations():
                if old < self.generation:
                    fs.delete_file(filesystem_for(self._uri(old), self.storage)[1])
        except OSError as e:
            # Never hides why a job ends: the lease then goes stale after ttl_s without heartbeats.
            log.warning("could not release the lease of %s (it expires in %.0f s): %s", self.output, self.ttl_s,
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
        self.generation = None
