"""The manifest source: Services, EndpointSlices and Nodes from YAML/JSON files,
watched for changes (a change is applied like an API event)."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kproxy import metrics
from kproxy.errors import ConfigError
from kproxy.sources import KINDS, Event, Handler, Kind, object_key

log = logging.getLogger("kproxy.manifests")

SUFFIXES = (".yaml", ".yml", ".json")


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files named, and the manifest files inside directories named (sorted)."""
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES and f.is_file()))
        elif path.exists():
            out.append(path)
        else:
            raise ConfigError(f"--manifests: {path}: no such file or directory")
    return out


def _documents(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    if path.suffix == ".json":
        yield 0, json.loads(text)
        return
    # Parse document by document, so one broken document does not hide the rest.
    chunks: list[str] = []
    cur: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.rstrip() == "---" or line.startswith("--- "):
            chunks.append("".join(cur))
            cur = []
        else:
            cur.append(line)
    chunks.append("".join(cur))
    for i, chunk in enumerate(chunks):
        if not chunk.strip():
            continue
        try:
            yield i, yaml.safe_load(chunk)
        except yaml.YAMLError as e:
            log.error("%s: document %d: invalid YAML, skipped: %s", path, i, e)
            metrics.INVALID_OBJECTS_TOTAL.labels("Manifest").inc()


def _flatten(doc: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(doc, dict):
        return
    if doc.get("kind") == "List" or (
        isinstance(doc.get("kind"), str) and doc["kind"].endswith("List") and "items" in doc
    ):
        for item in doc.get("items") or []:
            yield from _flatten(item)
        return
    yield doc


def load_objects(paths: Iterable[str | os.PathLike[str]]) -> dict[tuple[Kind, str], dict[str, Any]]:
    """Every Service, EndpointSlice and Node in the files, keyed by (kind, key).
    Broken documents and objects are logged with their file and skipped."""
    objects: dict[tuple[Kind, str], dict[str, Any]] = {}
    for path in expand_paths(paths):
        objects.update(_load_file(path))
    return objects


def _load_file(path: Path) -> dict[tuple[Kind, str], dict[str, Any]]:
    out: dict[tuple[Kind, str], dict[str, Any]] = {}
    try:
        text = path.read_text()
    except OSError as e:
        log.error("%s: cannot read: %s", path, e)
        return out
    try:
        docs = list(_documents(path, text))
    except json.JSONDecodeError as e:
        log.error("%s: invalid JSON, skipped: %s", path, e)
        metrics.INVALID_OBJECTS_TOTAL.labels("Manifest").inc()
        return out
    for i, doc in docs:
        for obj in _flatten(doc):
            kind = obj.get("kind")
            if kind not in KINDS:
                continue
            name = (obj.get("metadata") or {}).get("name")
            if not isinstance(name, str) or not name:
                log.error("%s: document %d: %s without metadata.name, skipped", path, i, kind)
                metrics.INVALID_OBJECTS_TOTAL.labels(str(kind)).inc()
                continue
            k: Kind = kind
            out[(k, object_key(obj))] = obj
    return out


@dataclass
class ManifestSource:
    """Reads the files once, then polls them for changes every `interval` seconds
    (stdlib only: no inotify dependency; mtime+size+inode decide whether to re-read)."""

    paths: list[str]
    interval: float = 1.0
    _stamps: dict[Path, tuple[int, int, int]] = field(default_factory=dict)
    _current: dict[tuple[Kind, str], dict[str, Any]] = field(default_factory=dict)

    def _scan(self) -> dict[Path, tuple[int, int, int]]:
        stamps: dict[Path, tuple[int, int, int]] = {}
        try:
            files = expand_paths(self.paths)
        except ConfigError as e:
            log.error("%s", e)
            return self._stamps
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            stamps[f] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return stamps

    def poll(self) -> list[Event] | None:
        """Events since the last poll, or None when no file changed."""
        stamps = self._scan()
        if stamps == self._stamps and self._current:
            return None
        self._stamps = stamps
        new: dict[tuple[Kind, str], dict[str, Any]] = {}
        for f in sorted(stamps):
            new.update(_load_file(f))
        events = [Event(kind, key, obj) for (kind, key), obj in new.items()]
        events += [
            Event(kind, key, None) for (kind, key) in self._current if (kind, key) not in new
        ]
        self._current = new
        return events

    def current_object(self, kind: Kind, key: str) -> dict[str, Any] | None:
        return self._current.get((kind, key))

    def node_object(self, name: str) -> dict[str, Any] | None:
        return self._current.get(("Node", name))

    def run(self, handler: Handler, stop: threading.Event) -> None:
        if self.poll() is None:
            pass
        # The first delivery is the whole current state, like an informer's list.
        handler.on_events([Event(kind, key, obj) for (kind, key), obj in self._current.items()])
        for kind in KINDS:
            handler.on_synced(kind)
        while not stop.wait(self.interval):
            events = self.poll() or []
            if events:
                handler.on_events(events)
