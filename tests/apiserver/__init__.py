"""An in-repo Kubernetes API server for tests: real HTTP, the real list/watch protocol,
faults on demand. See :mod:`apiserver.server`."""

from apiserver.server import RESOURCES, FakeApiServer, in_netns, label_matcher, status_body

__all__ = ["RESOURCES", "FakeApiServer", "in_netns", "label_matcher", "status_body"]
