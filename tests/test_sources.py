"""The manifest source and the change tracker (no kernel needed)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kproxy.errors import ConfigError
from kproxy.sources import Event
from kproxy.sources.manifests import ManifestSource, load_objects
from kproxy.tracker import ChangeTracker

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

SVC = """apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns, resourceVersion: "%s"}
spec: {clusterIP: 10.96.0.1, ports: [{port: %d}]}
"""


def test_examples_load() -> None:
    objs = load_objects([EXAMPLES])
    kinds = {k for k, _ in objs}
    assert kinds == {"Service", "EndpointSlice", "Node"}
    assert ("Node", "node1") in objs
    assert ("Service", "demo/web") in objs


def test_list_and_multi_doc_and_broken_document(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "kind: List\nitems:\n- " + SVC.replace("\n", "\n  ") % ("1", 80) + "\n---\n"
        "kind: Service\nmetadata: {name: broken\n---\n"
        "kind: ConfigMap\nmetadata: {name: ignored}\n---\n"
        + SVC.replace("name: a", "name: b")
        % ("1", 81)
    )
    objs = load_objects([tmp_path])
    assert set(objs) == {("Service", "ns/a"), ("Service", "ns/b")}


def test_missing_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--manifests"):
        load_objects([tmp_path / "nope.yaml"])


def test_poll_reports_changes_and_deletions(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(SVC % ("1", 80))
    src = ManifestSource([str(tmp_path)])
    first = src.poll()
    assert first is not None and [e.key for e in first] == ["ns/a"]
    assert src.poll() is None
    f.write_text(SVC % ("2", 81))
    os.utime(f, (time.time() + 5, time.time() + 5))
    changed = src.poll()
    assert changed is not None and changed[0].obj is not None
    assert changed[0].obj["spec"]["ports"][0]["port"] == 81
    f.unlink()
    gone = src.poll()
    assert gone == [Event("Service", "ns/a", None)]


def test_tracker_drops_no_op_changes() -> None:
    import yaml

    t = ChangeTracker()
    a1 = yaml.safe_load(SVC % ("1", 80))
    a2 = yaml.safe_load(SVC % ("2", 80))  # only resourceVersion differs
    b = yaml.safe_load(SVC % ("3", 81))
    assert t.update(Event("Service", "ns/a", a1))
    assert not t.update(Event("Service", "ns/a", a1))
    assert [k for _, k, _, _ in t.drain()] == ["ns/a"]
    assert not t.update(Event("Service", "ns/a", a2))
    assert t.update(Event("Service", "ns/a", b))
    # Changed back before a sync: nothing pending.
    assert not t.update(Event("Service", "ns/a", a1))
    assert t.pending("Service") == 0
    assert t.update(Event("Service", "ns/a", None))
    assert t.drain()[0][2] is None
