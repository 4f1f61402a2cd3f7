"""Where an archive's maps go, a local folder or an ``s3://`` prefix: each scene whole, or not at all.

Layout, the same in both: ``DIR/<scene_id>/<scene_id>.tif`` (the COG) and ``<scene_id>.json`` (its
STAC item, which holds the map's key), ``DIR/collection.json``, ``DIR/summary.csv``.

* Local: a scene is written into a temp folder beside its own (``DIR/.<scene_id>.<random>.tmp``) and
  renamed into place (``tilepipe.fsutil.atomic_dir``). A lock per scene, ``DIR/.locks/<scene_id>.lock``
  (``flock``, released by the kernel when the process dies, ``kill -9`` included).
* S3: written into a local temp folder, then uploaded: the map first, the item last. The item is
  the commit point: a scene is there when its item is, and a replaced scene's old item is deleted
  before its new map goes up. A lock per scene is an object ``DIR/.locks/<scene_id>`` created only
  if absent (``If-None-Match: *``), naming its holder (host, pid and start time) and renewed while
  held; a lock whose holder is dead (same host) or whose lease ran out is taken over.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import atomic_dir, write_text
from tilepipe.geo import objects
from tilepipe.services.procs import start_time

LOCKS = ".locks"
LEASE_S = 600.0  # an S3 lock not renewed for this long is a dead holder's (renewed every LEASE_S / 4)
WAIT_STEP_S = 0.5


def item_name(scene_id: str) -> str:
    """Where a scene's item lives, relative to DIR."""
    return f"{scene_id}/{scene_id}.json"


class LocalStore:
    """A folder of maps."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.location = str(root)

    def items(self) -> dict[str, dict[str, Any]]:
        """The STAC item of every scene in the folder, by scene id."""
        found = {}
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            path = self.root / item_name(folder.name)
            if folder.is_dir() and not folder.name.startswith(".") and path.is_file():
                found[folder.name] = json.loads(path.read_text())
        return found

    def item(self, scene_id: str) -> dict[str, Any] | None:
        """One scene's item, or None."""
        path = self.root / item_name(scene_id)
        return json.loads(path.read_text()) if path.is_file() else None

    @contextmanager
    def lock(self, name: str, wait_s: float = 0.0) -> Iterator[bool]:
        """Hold ``DIR/.locks/<name>.lock``; yields False when another process holds it (after ``wait_s``)."""
        folder = self.root / LOCKS
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{name}.lock", "a") as fh:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(WAIT_STEP_S)
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextmanager
    def writing(self, scene_id: str) -> Iterator[Path]:
        """A temp folder for the scene's files, renamed onto ``DIR/<scene_id>`` when the block succeeds.

        Call it holding the scene's lock: what a killed run left for this scene is removed first.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        leftover = re.compile(rf"\.{re.escape(scene_id)}\.([a-z0-9_]{{8}}\.tmp|old)")
        for path in self.root.iterdir():
            if leftover.fullmatch(path.name):
                shutil.rmtree(path, ignore_errors=True)
        with atomic_dir(self.root / scene_id) as tmp:
            yield tmp

    def read_text(self, name: str) -> str | None:
        """A file of DIR (``collection.json``), or None."""
        path = self.root / name
        return path.read_text() if path.is_file() else None

    def write_text(self, name: str, text: str, content_type: str = "") -> None:
        """Write a file of DIR atomically."""
        write_text(self.root / name, text)


class S3Store:
    """An ``s3://bucket/prefix/`` of maps."""

    def __init__(self, uri: str) -> None:
        self.location = uri.rstrip("/") + "/"
        self.prefix = uri.rstrip("/")

    def items(self) -> dict[str, dict[str, Any]]:
        """The STAC item of every scene under the prefix, by scene id (one listing, one GET per item)."""
        found = {}
        for uri, _ in objects.list_objects(self.location):
            parts = uri.removeprefix(self.location).split("/")
            if len(parts) == 2 and not parts[0].startswith(".") and parts[1] == f"{parts[0]}.json":
                data = objects.read_object(uri)
                if data is not None:
                    found[parts[0]] = json.loads(data)
        return found

    def item(self, scene_id: str) -> dict[str, Any] | None:
        """One scene's item, or None."""
        data = objects.read_object(objects.join(self.prefix, item_name(scene_id)))
        return json.loads(data) if data is not None else None

    @contextmanager
    def lock(self, name: str, wait_s: float = 0.0) -> Iterator[bool]:
        """Hold the lock object ``DIR/.locks/<name>``; yields False when another live process holds it."""
        uri = objects.join(self.prefix, LOCKS, name)
        deadline = time.monotonic() + wait_s
        while not self._take(uri):
            if time.monotonic() >= deadline:
                yield False
                return
            time.sleep(WAIT_STEP_S)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(uri, stop), daemon=True)
        renewer.start()
        try:
            yield True
        finally:
            stop.set()
            renewer.join()
            objects.delete_object(uri)

    @staticmethod
    def _holder() -> dict[str, Any]:
        import os

        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "started": start_time(pid),
                "expires": time.time() + LEASE_S}  # fmt: skip

    def _take(self, uri: str) -> bool:
        """Create the lock object; take over one whose holder is dead or whose lease has run out."""
        if objects.create_object(uri, json.dumps(self._holder()).encode()):
            return True
        data = objects.read_object(uri)
        try:
            held = json.loads(data) if data else None
        except ValueError:
            held = None
        if held is not None and not _stale(held):
            return False
        objects.delete_object(uri)
        return objects.create_object(uri, json.dumps(self._holder()).encode())

    def _renew(self, uri: str, stop: threading.Event) -> None:
        while not stop.wait(LEASE_S / 4):
            try:
                objects.write_object(uri, json.dumps(self._holder()).encode(), "application/json")
            except TilepipeError:  # the store is away for now: the lease runs on, the next renewal may do
                pass

    @contextmanager
    def writing(self, scene_id: str) -> Iterator[Path]:
        """A local temp folder; when the block succeeds its files are uploaded, the item last."""
        with tempfile.TemporaryDirectory(prefix=f"tilepipe-map-{scene_id}-") as tmp:
            yield Path(tmp)
            item = objects.join(self.prefix, item_name(scene_id))
            objects.delete_object(item)  # a scene being replaced is absent until its new item is in
            files = sorted(Path(tmp).iterdir(), key=lambda p: p.name == f"{scene_id}.json")
            for path in files:
                kind = "application/json" if path.suffix == ".json" else "image/tiff"
                objects.upload_file(path, objects.join(self.prefix, scene_id, path.name), kind)

    def read_text(self, name: str) -> str | None:
        """An object under the prefix (``collection.json``), or None."""
        data = objects.read_object(objects.join(self.prefix, name))
        return data.decode() if data is not None else None

    def write_text(self, name: str, text: str, content_type: str = "text/plain") -> None:
        """Write an object under the prefix whole."""
        objects.write_object(objects.join(self.prefix, name), text.encode(), content_type)


def _stale(held: dict[str, Any]) -> bool:
    """True when a lock's holder is gone: a dead process of this host, or a lease not renewed in time."""
    if held.get("host") == socket.gethostname():
        now = start_time(int(held.get("pid", 0)))
        return not now or (now != held.get("started") and "?" not in (now, held.get("started")))
    return float(held.get("expires", 0)) < time.time()


def open_store(location: str | Path) -> LocalStore | S3Store:
    """The store of ``--out``: an ``s3://`` prefix or a local folder."""
    return S3Store(str(location)) if str(location).startswith("s3://") else LocalStore(Path(location))
