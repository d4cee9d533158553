"""A small Kubernetes API server that speaks the real protocol over HTTP, for tests.

It serves v1 Services, discovery.k8s.io/v1 EndpointSlices, v1 Nodes and accepts
events.k8s.io/v1 Events, with what a client's reflector relies on: lists with
``limit``/``continue`` pages from a consistent snapshot, label and field selectors,
chunked watch streams of JSON lines from a resourceVersion, monotonic resourceVersions,
BOOKMARK events, 410 Gone after compaction (as an ERROR event or an HTTP status), and
faults on demand: 5xx answers, slow answers, dropped streams, garbage or cut-off lines,
and the whole server going down and coming back on the same address.

The server can listen inside a network namespace (``netns=``) while the test drives it
from the host process: its sockets are created in the namespace, the rest is in-process.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import copy
import ctypes
import functools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Resource:
    plural: str
    prefix: str  # "/api/v1" or "/apis/<group>/<version>"
    kind: str
    api_version: str
    namespaced: bool


RESOURCES = {
    r.plural: r
    for r in (
        Resource("services", "/api/v1", "Service", "v1", True),
        Resource("endpointslices", "/apis/discovery.k8s.io/v1", "EndpointSlice",
                 "discovery.k8s.io/v1", True),
        Resource("nodes", "/api/v1", "Node", "v1", False),
        Resource("events", "/apis/events.k8s.io/v1", "Event", "events.k8s.io/v1", True),
    )
}  # fmt: skip
KIND_TO_PLURAL = {r.kind: p for p, r in RESOURCES.items()}


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body with this thread in network namespace `name` (sockets created there
    stay there)."""
    if not name:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


# ---------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------


def label_matcher(text: str) -> Callable[[dict[str, str]], bool]:
    """Equality- and existence-based label selectors (``a=b``, ``a==b``, ``a!=b``,
    ``a``, ``!a``), comma-separated."""
    reqs: list[tuple[str, str, str]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part.startswith("!"):
            reqs.append(("!", part[1:], ""))
        elif "!=" in part:
            k, v = part.split("!=", 1)
            reqs.append(("!=", k, v))
        elif "=" in part:
            k, v = part.replace("==", "=").split("=", 1)
            reqs.append(("=", k, v))
        else:
            reqs.append(("exists", part, ""))

    def match(labels: dict[str, str]) -> bool:
        for op, k, v in reqs:
            if op == "!" and k in labels:
                return False
            if op == "exists" and k not in labels:
                return False
            if op == "=" and labels.get(k) != v:
                return False
            if op == "!=" and labels.get(k) == v:
                return False
        return True

    return match


def field_matcher(text: str) -> Callable[[dict[str, Any]], bool]:
    reqs: list[tuple[str, str, bool]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        neg = "!=" in part
        k, v = part.split("!=" if neg else "=", 1)
        reqs.append((k.strip(), v.lstrip("=").strip(), neg))

    def value(obj: dict[str, Any], path: str) -> str:
        cur: Any = obj
        for p in path.split("."):
            cur = cur.get(p) if isinstance(cur, dict) else None
        return "" if cur is None else str(cur)

    def match(obj: dict[str, Any]) -> bool:
        return all((value(obj, k) == v) != neg for k, v, neg in reqs)

    return match


# ---------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------


@dataclass
class WatchRecord:
    rv: int
    plural: str
    type: str
    obj: dict[str, Any]
    prev: dict[str, Any] | None


@dataclass
class Fault:
    status: int = 500
    delay: float = 0.0
    count: int = 1
    plural: str | None = None
    watch: bool | None = None  # only watch requests (True), only non-watch (False)
    method: str | None = None

    def applies(self, method: str, plural: str, watch: bool) -> bool:
        return (
            (self.plural is None or self.plural == plural)
            and (self.watch is None or self.watch == watch)
            and (self.method is None or self.method == method)
        )


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    status: int = 0


@dataclass
class _State:
    rv: int = 100
    objects: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {p: {} for p in RESOURCES}
    )
    log: list[WatchRecord] = field(default_factory=list)
    log_rvs: list[int] = field(default_factory=list)
    compacted: int = 0
    snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    drop_generation: int = 0
    expire_generation: int = 0
    stream_poison: list[tuple[str, bytes]] = field(default_factory=list)  # (plural, raw)


class FakeApiServer:
    """See the module docstring. Thread-safe; every mutation wakes the watches."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        netns: str | None = None,
        bookmark_interval: float = 1.0,
        gone_as_http: bool = False,
        token: str | None = "kproxy-test-token",
    ) -> None:
        self.host = host
        self.port = port
        self.netns = netns
        self.bookmark_interval = bookmark_interval
        self.gone_as_http = gone_as_http
        self.token = token
        self._cond = threading.Condition()
        self._s = _State()
        self.requests: list[Request] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeApiServer:
        owner = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 64

            def process_request(self, request: Any, client_address: Any) -> None:
                owner._conns.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request: Any) -> None:
                owner._conns.discard(request)
                super().shutdown_request(request)

        class Handler(_Handler):
            server_owner = owner

        with in_netns(self.netns):
            httpd = Server((self.host, self.port), Handler)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (the server is 'down')."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        self.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    down = stop

    def up(self) -> None:
        """Listen again on the same address."""
        self.start()

    def __enter__(self) -> FakeApiServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, path: str | os.PathLike[str]) -> str:
        """Write a kubeconfig for this server; returns its path."""
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "kube-proxy", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "kube-proxy"}}],
            "current-context": "fake",
        }
        with open(path, "w") as f:
            json.dump(doc, f)
        return str(path)

    # -- objects -------------------------------------------------------------------------

    @staticmethod
    def _key(obj: dict[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or ""
        return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))

    def _record(self, plural: str, typ: str, obj: dict[str, Any], prev: Any) -> None:
        s = self._s
        s.log.append(WatchRecord(s.rv, plural, typ, obj, prev))
        s.log_rvs.append(s.rv)
        self._cond.notify_all()

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (by kind, namespace and name); returns it with its
        new resourceVersion."""
        plural = KIND_TO_PLURAL[obj["kind"]]
        res = RESOURCES[plural]
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", res.api_version)
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            meta.setdefault("namespace", "default")
        with self._cond:
            s = self._s
            key = self._key(obj)
            prev = s.objects[plural].get(key)
            s.rv += 1
            meta["resourceVersion"] = str(s.rv)
            meta.setdefault("uid", (prev or {}).get("metadata", {}).get("uid") or str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            s.objects[plural][key] = obj
            self._record(plural, "MODIFIED" if prev else "ADDED", obj, prev)
        return copy.deepcopy(obj)

    def delete(self, kind: str, key: str) -> bool:
        plural = KIND_TO_PLURAL[kind]
        with self._cond:
            s = self._s
            prev = s.objects[plural].pop(key, None)
            if prev is None:
                return False
            s.rv += 1
            gone = copy.deepcopy(prev)
            gone["metadata"]["resourceVersion"] = str(s.rv)
            self._record(plural, "DELETED", gone, prev)
        return True

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        with self._cond:
            obj = self._s.objects[KIND_TO_PLURAL[kind]].get(key)
            return copy.deepcopy(obj) if obj else None

    def objects(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [copy.deepcopy(o) for o in self._s.objects[KIND_TO_PLURAL[kind]].values()]

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._s.rv

    # -- faults --------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget history: a watch from any older resourceVersion gets 410, and list
        continue tokens expire. Open watches carry on."""
        with self._cond:
            self._s.compacted = self._s.rv
            self._s.snapshots.clear()

    def expire_watches(self) -> None:
        """Compact, and end every open watch with a 410 ERROR event (as a real API
        server does when a watcher falls out of its window)."""
        with self._cond:
            self.compact()
            self._s.expire_generation += 1
            self._cond.notify_all()

    def fail(self, status: int = 500, count: int = 1, **match: Any) -> None:
        """The next `count` matching requests answer `status`."""
        with self._cond:
            self._s.faults.append(Fault(status=status, count=count, **match))

    def slow(self, delay: float, count: int = 1, **match: Any) -> None:
        """The next `count` matching requests wait `delay` seconds before answering."""
        with self._cond:
            self._s.faults.append(Fault(status=0, delay=delay, count=count, **match))

    def clear_faults(self) -> None:
        with self._cond:
            self._s.faults.clear()

    def drop_watches(self) -> None:
        """Cut every open watch stream without the terminating chunk."""
        with self._cond:
            self._s.drop_generation += 1
            self._cond.notify_all()

    def drop_connections(self) -> None:
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.drop_watches()

    def poison_watch(self, plural: str, raw: bytes) -> None:
        """Send `raw` (e.g. a cut-off or non-JSON line) on the next watch of `plural`
        and then cut that stream."""
        with self._cond:
            self._s.stream_poison.append((plural, raw))
            self._cond.notify_all()

    def _take_fault(self, method: str, plural: str, watch: bool) -> Fault | None:
        with self._cond:
            for f in self._s.faults:
                if f.applies(method, plural, watch):
                    f.count -= 1
                    if f.count <= 0:
                        self._s.faults.remove(f)
                    return f
        return None

    # -- serving -------------------------------------------------------------------------

    def _list(self, plural: str, ns: str | None, q: dict[str, str]) -> tuple[int, Any]:
        res = RESOURCES[plural]
        labels = label_matcher(q.get("labelSelector", ""))
        fields = field_matcher(q.get("fieldSelector", ""))
        limit = int(q.get("limit") or 0)
        cont = q.get("continue", "")
        with self._cond:
            s = self._s
            if cont:
                try:
                    token, offset_text = base64.urlsafe_b64decode(cont).decode().split(":")
                    offset = int(offset_text)
                except ValueError:
                    return 400, status_body(400, "BadRequest", "invalid continue token")
                snap = s.snapshots.get(token)
                if snap is None:
                    return 410, status_body(
                        410, "Expired", "The provided continue parameter is too old"
                    )
                rv, items = snap
            else:
                token, offset, rv = uuid.uuid4().hex, 0, s.rv
                items = [
                    copy.deepcopy(o)
                    for k, o in sorted(s.objects[plural].items())
                    if (ns is None or o["metadata"].get("namespace") == ns)
                    and labels(o["metadata"].get("labels") or {})
                    and fields(o)
                ]
            page = items[offset : offset + limit] if limit else items[offset:]
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if limit and offset + limit < len(items):
                s.snapshots[token] = (rv, items)
                meta["continue"] = base64.urlsafe_b64encode(
                    f"{token}:{offset + limit}".encode()
                ).decode()
                meta["remainingItemCount"] = len(items) - offset - limit
            else:
                s.snapshots.pop(token, None)
        return 200, {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": meta,
            "items": page,
        }

    def _watch(self, h: _Handler, plural: str, ns: str | None, q: dict[str, str]) -> int:
        res = RESOURCES[plural]
        labels = label_matcher(q.get("labelSelector", ""))
        fields = field_matcher(q.get("fieldSelector", ""))
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(q.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout

        def matches(o: dict[str, Any] | None) -> bool:
            return (
                o is not None
                and (ns is None or o["metadata"].get("namespace") == ns)
                and labels(o["metadata"].get("labels") or {})
                and fields(o)
            )

        with self._cond:
            s = self._s
            rv_text = q.get("resourceVersion", "")
            since = int(rv_text) if rv_text.isdigit() else 0
            initial: list[dict[str, Any]] = []
            if rv_text in ("", "0"):
                # "any version": the current state as ADDED events, then changes
                initial = [copy.deepcopy(o) for o in s.objects[plural].values() if matches(o)]
                since = s.rv
            elif since < s.compacted:
                gone = status_body(
                    410, "Expired", f"too old resource version: {since} ({s.compacted})"
                )
                if self.gone_as_http:
                    h.send_json(410, gone)
                    return 410
                h.start_stream()
                h.write_chunk(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                h.end_stream()
                return 200
            generation = s.drop_generation
            expired = s.expire_generation
        h.start_stream()
        for o in initial:
            h.write_chunk(json.dumps({"type": "ADDED", "object": o}).encode() + b"\n")
        last_bookmark = time.monotonic()
        while True:
            out: list[bytes] = []
            with self._cond:
                s = self._s
                self._cond.wait_for(
                    functools.partial(self._wake, generation, expired, since, plural),
                    timeout=max(0.0, min(deadline - time.monotonic(), 0.2)),
                )
                if s.drop_generation != generation:
                    h.abort()
                    return 200
                if s.expire_generation != expired:
                    gone = status_body(410, "Expired", "too old resource version")
                    h.write_chunk(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                    h.end_stream()
                    return 200
                poison = [raw for p, raw in s.stream_poison if p == plural]
                if poison:
                    s.stream_poison = [(p, r) for p, r in s.stream_poison if p != plural]
                i = bisect.bisect_right(s.log_rvs, since)
                for rec in s.log[i:]:
                    since = rec.rv
                    if rec.plural != plural:
                        continue
                    now_in, was_in = matches(rec.obj), matches(rec.prev)
                    typ = rec.type
                    if typ == "MODIFIED" and now_in and not was_in:
                        typ = "ADDED"
                    elif typ == "MODIFIED" and was_in and not now_in:
                        typ = "DELETED"
                    elif not (now_in or (typ == "DELETED" and was_in)):
                        continue
                    out.append(json.dumps({"type": typ, "object": rec.obj}).encode() + b"\n")
                current = s.rv
            if poison:
                for raw in poison:
                    h.write_chunk(raw)
                h.abort()
                return 200
            for line in out:
                h.write_chunk(line)
            now = time.monotonic()
            if bookmarks and now - last_bookmark >= self.bookmark_interval:
                last_bookmark = now
                mark = {
                    "kind": res.kind,
                    "apiVersion": res.api_version,
                    "metadata": {"resourceVersion": str(max(current, since))},
                }
                h.write_chunk(json.dumps({"type": "BOOKMARK", "object": mark}).encode() + b"\n")
            if now >= deadline:
                h.end_stream()
                return 200

    def _wake(self, generation: int, expired: int, since: int, plural: str) -> bool:
        s = self._s
        return (
            s.drop_generation != generation
            or s.expire_generation != expired
            or bool(s.log_rvs and s.log_rvs[-1] > since)
            or any(p == plural for p, _ in s.stream_poison)
        )

    def _create(self, plural: str, ns: str | None, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
            return 422, status_body(422, "Invalid", "metadata.name: Required value")
        body.setdefault("kind", RESOURCES[plural].kind)
        if ns is not None:
            body["metadata"]["namespace"] = ns
        with self._cond:
            if self._key(body) in self._s.objects[plural]:
                return 409, status_body(409, "AlreadyExists", "already exists")
        return 201, self.apply(body)


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def route(path: str) -> tuple[str, str | None, str | None] | None:
    """(plural, namespace, name) for a resource path, or None."""
    for plural, res in RESOURCES.items():
        if not path.startswith(res.prefix + "/"):
            continue
        parts = path[len(res.prefix) + 1 :].strip("/").split("/")
        if parts[0] == "namespaces" and len(parts) >= 3 and parts[2] == plural and res.namespaced:
            return plural, parts[1], parts[3] if len(parts) > 3 else None
        if parts[0] == plural:
            return plural, None, parts[1] if len(parts) > 1 else None
    return None


class _Handler(BaseHTTPRequestHandler):
    server_owner: FakeApiServer
    protocol_version = "HTTP/1.1"
    server_version = "fake-kube-apiserver"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        # clients that go away (a daemon being stopped) are not the server's error
        with contextlib.suppress(ConnectionError, TimeoutError):
            super().handle()

    # -- response helpers ----------------------------------------------------------------

    def send_json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        # the stream's end closes the connection: say so, or a client may reuse it
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def abort(self) -> None:
        """Cut the connection mid-stream (no terminating chunk)."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    # -- dispatch ------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        owner = self.server_owner
        parts = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        req = Request(method, parts.path, q)
        owner.requests.append(req)
        body: Any = None
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                body = None
        if owner.token and self.headers.get("Authorization") != f"Bearer {owner.token}":
            req.status = 401
            self.send_json(401, status_body(401, "Unauthorized", "Unauthorized"))
            return
        r = route(parts.path)
        if r is None:
            req.status = 404
            self.send_json(404, status_body(404, "NotFound", f"no route for {parts.path}"))
            return
        plural, ns, name = r
        watch = q.get("watch") in ("true", "1")
        fault = owner._take_fault(method, plural, watch)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.status:
                req.status = fault.status
                self.send_json(
                    fault.status, status_body(fault.status, "InternalError", "injected fault")
                )
                return
        try:
            if method == "GET" and watch:
                req.status = owner._watch(self, plural, ns, q)
                self.close_connection = True
                return
            if method == "GET" and name is None:
                status, out = owner._list(plural, ns, q)
            elif method == "GET":
                key = f"{ns}/{name}" if ns else name
                obj = owner._s.objects[plural].get(key)
                status, out = (
                    (200, obj) if obj else (404, status_body(404, "NotFound", f"{key} not found"))
                )
            elif method == "POST" and name is None:
                status, out = owner._create(plural, ns, body)
            else:
                status, out = 405, status_body(405, "MethodNotAllowed", method)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
            return
        req.status = status
        self.send_json(status, out)

    def do_GET(self) -> None:
        try:
            self._handle("GET")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_POST(self) -> None:
        try:
            self._handle("POST")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
