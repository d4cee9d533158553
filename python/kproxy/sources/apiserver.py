"""The API-server source: Services, EndpointSlices and this node's Node from a Kubernetes
API server, through the official ``kubernetes`` client.

One reflector per resource, as client-go's: list (``limit``/``continue`` pages), then
watch from the list's resourceVersion with ``allowWatchBookmarks`` and a server-side
timeout, in an explicit loop. A 410 Gone (HTTP status, or an ERROR event in the stream)
means the resourceVersion was compacted: the reflector relists and delivers only what
changed. Errors and dropped connections back off exponentially with jitter, and the next
watch resumes from the last resourceVersion seen. The client's own ``Watch.stream`` is
not used: it retries a 410 only once, and not at all when ``timeout_seconds`` is set, so
the relist has to be ours anyway.

Objects are read with ``_preload_content=False`` and kept as the API's JSON dicts: the
client's model classes would drop fields they do not know (newer API fields) and raise on
values they do not expect, and one object the client cannot parse must never stop the
proxy. An object without a name is skipped with a log line and counted.

Nothing is programmed before the first Service and EndpointSlice lists are in: the
handler's ``on_synced`` is called per kind after its first list (upstream's
``isInitialized``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kproxy import metrics
from kproxy.errors import ConfigError
from kproxy.healthcheck import ProxyHealthChecker, ServiceHealthServer
from kproxy.server import ProxyHealthState
from kproxy.sources import Event, Handler, Kind, object_key

log = logging.getLogger("kproxy.apiserver")

#: Upstream's informer selector (cmd/kube-proxy/app/server.go): Services and
#: EndpointSlices that name another service proxy, and headless ones, are not ours.
LABEL_SELECTOR = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
PAGE_SIZE = 500
#: client-go's reflector: watches time out server-side after 5-10 minutes.
MIN_WATCH_TIMEOUT = 300.0
#: client-go's reflector backoff: 800ms doubling to 30s, reset after 2 minutes of calm.
BACKOFF_INITIAL = 0.8
BACKOFF_CAP = 30.0
BACKOFF_RESET = 120.0
#: How long startup waits for this node's Node object (upstream's NodeManager: 30s).
NODE_WAIT = 30.0


class Gone(Exception):
    """410: the resourceVersion (or continue token) is too old; relist."""


class StreamError(Exception):
    """The watch stream carried something we cannot trust; relist."""


# ---------------------------------------------------------------------------------------
# Client construction
# ---------------------------------------------------------------------------------------


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def api_source_configured(cfg: Any) -> bool:
    """Whether the configuration points at an API server (SPEC: --kubeconfig, --master,
    or in-cluster service-account config)."""
    return bool(cfg.kubeconfig or cfg.master or in_cluster())


def build_api_client(cfg: Any) -> Any:
    """An ApiClient for --kubeconfig / --master / in-cluster config (upstream's order:
    a kubeconfig with --master overriding its server; in-cluster when neither)."""
    from kubernetes import client
    from kubernetes import config as kconfig

    config: Any = kconfig
    conf = client.Configuration()
    try:
        if cfg.kubeconfig:
            config.load_kube_config(
                config_file=cfg.kubeconfig, client_configuration=conf, persist_config=False
            )
        elif not cfg.master:
            config.load_incluster_config(client_configuration=conf)
    except (OSError, config.ConfigException, ValueError, TypeError) as e:
        flag = "--kubeconfig" if cfg.kubeconfig else "in-cluster config"
        raise ConfigError(f"{flag}: cannot load: {e}") from e
    if cfg.master:
        conf.host = str(cfg.master).rstrip("/")
    # Retries are the reflector's (with backoff); urllib3's own would hide failures.
    conf.retries = False
    api = client.ApiClient(conf)
    api.user_agent = "kproxy/kube-proxy"
    return api


# ---------------------------------------------------------------------------------------
# Rate limiting and backoff
# ---------------------------------------------------------------------------------------


class RateLimiter:
    """Token bucket as client-go's (--kube-api-qps, --kube-api-burst); qps <= 0 means
    no limit."""

    def __init__(self, qps: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.qps = qps
        self.burst = max(1, burst)
        self._clock = clock
        self._tokens = float(self.burst)
        self._last = clock()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a token; the seconds to wait before using it."""
        if self.qps <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def wait(self, stop: threading.Event) -> bool:
        """Block until a request may go out; False when stopped meanwhile."""
        delay = self.reserve()
        return not (delay > 0 and stop.wait(delay)) and not stop.is_set()


@dataclass
class Backoff:
    """Jittered exponential backoff (client-go's wait.Backoff with jitter 1.0)."""

    initial: float = BACKOFF_INITIAL
    cap: float = BACKOFF_CAP
    reset_after: float = BACKOFF_RESET
    clock: Callable[[], float] = time.monotonic
    _step: float = 0.0
    _last: float = field(default=-1e18)

    def next(self) -> float:
        now = self.clock()
        if now - self._last > self.reset_after:
            self._step = 0.0
        self._last = now
        self._step = self.initial if self._step == 0 else min(self.cap, self._step * 2)
        return self._step * (1.0 + random.random())

    def reset(self) -> None:
        self._step = 0.0


# ---------------------------------------------------------------------------------------
# Reflector
# ---------------------------------------------------------------------------------------


def _status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _lines(resp: Any, stop: threading.Event) -> Iterator[bytes]:
    """Complete lines of a streamed body; a trailing partial line (a stream that ended
    mid-event) is dropped: the next watch resumes from the last complete event."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=True):
        if stop.is_set():
            return
        buf += chunk
        while True:
            line, nl, rest = buf.partition(b"\n")
            if not nl:
                break
            buf = rest
            if line.strip():
                yield line
    if buf.strip():
        log.debug("watch stream ended mid-event (%d bytes dropped)", len(buf))


def _valid(kind: Kind, obj: Any) -> bool:
    if not isinstance(obj, dict):
        log.error("%s: object is not a JSON object, skipped", kind)
        return False
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        log.error("%s: object without metadata.name, skipped", kind)
        return False
    return True


class Reflector:
    """List-then-watch of one resource, delivering Events; owns its relist."""

    def __init__(
        self,
        kind: Kind,
        lister: Callable[..., Any],
        deliver: Callable[[list[Event]], None],
        *,
        synced: Callable[[Kind], None],
        label_selector: str | None = None,
        field_selector: str | None = None,
        limiter: RateLimiter | None = None,
        backoff: Backoff | None = None,
        page_size: int = PAGE_SIZE,
        watch_timeout: float = MIN_WATCH_TIMEOUT,
        resync_period: float = 0.0,
        connected: Callable[[Kind, bool], None] | None = None,
    ) -> None:
        self.kind = kind
        self.lister = lister
        self.deliver = deliver
        self.synced = synced
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.limiter = limiter or RateLimiter(0, 1)
        self.backoff = backoff or Backoff()
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.resync_period = resync_period
        self.connected = connected
        self.store: dict[str, dict[str, Any]] = {}
        self.resource_version = ""
        self.lists = 0
        self.watches = 0
        self._has_synced = False
        self._last_resync = time.monotonic()
        self._resp: Any = None

    # -- requests ------------------------------------------------------------------------

    def _selectors(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.label_selector:
            out["label_selector"] = self.label_selector
        if self.field_selector:
            out["field_selector"] = self.field_selector
        return out

    def _get(self, stop: threading.Event, **kwargs: Any) -> Any:
        if not self.limiter.wait(stop):
            return None
        try:
            return self.lister(_preload_content=False, **self._selectors(), **kwargs)
        except Exception as e:
            if _status_of(e) == 410:
                raise Gone(str(getattr(e, "reason", e))) from e
            raise

    # -- list ----------------------------------------------------------------------------

    def list(self, stop: threading.Event) -> bool:
        """One consistent list in pages; replaces the store and delivers the difference.
        False when stopped."""
        items: dict[str, dict[str, Any]] = {}
        cont = ""
        rv = ""
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, "_request_timeout": (10, 60)}
            if cont:
                kwargs["_continue"] = cont
            resp = self._get(stop, **kwargs)
            if resp is None:
                return False
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            if not isinstance(body, dict):
                raise StreamError(f"{self.kind} list: response is not a JSON object")
            for obj in body.get("items") or []:
                if not _valid(self.kind, obj):
                    metrics.INVALID_OBJECTS_TOTAL.labels(self.kind).inc()
                    continue
                obj.setdefault("kind", self.kind)
                items[object_key(obj)] = obj
            meta = body.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or rv)
            cont = str(meta.get("continue") or "")
            if not cont:
                break
        self.lists += 1
        events = [
            Event(self.kind, key, obj)
            for key, obj in items.items()
            if (self.store.get(key) or {}).get("metadata", {}).get("resourceVersion")
            != obj["metadata"].get("resourceVersion")
            or key not in self.store
        ]
        events += [Event(self.kind, key, None) for key in self.store if key not in items]
        self.store = items
        self.resource_version = rv
        log.info(
            "%s: listed %d objects at resourceVersion %s (%d changes)",
            self.kind,
            len(items),
            rv,
            len(events),
        )
        if events or not self._has_synced:
            self.deliver(events)
        if not self._has_synced:
            self._has_synced = True
            self.synced(self.kind)
        return True

    # -- watch ---------------------------------------------------------------------------

    def watch(self, stop: threading.Event) -> None:
        """One watch request from the current resourceVersion, until the server ends it.
        Raises Gone (relist), StreamError (relist) or the transport's errors."""
        timeout = int(self.watch_timeout * (1.0 + random.random()))
        resp = self._get(
            stop,
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=max(1, timeout),
            # the read timeout notices a silent server; bookmarks and the server-side
            # timeout keep a healthy stream well inside it
            _request_timeout=(10, timeout + 30),
        )
        if resp is None:
            return
        self.watches += 1
        self._resp = resp
        if self.connected is not None:
            self.connected(self.kind, True)
        try:
            for line in _lines(resp, stop):
                self._on_line(line)
                if self.resync_period > 0:
                    self._maybe_resync()
        finally:
            self._resp = None
            resp.release_conn()

    def _on_line(self, line: bytes) -> None:
        try:
            ev = json.loads(line)
        except ValueError as e:
            metrics.INVALID_OBJECTS_TOTAL.labels(self.kind).inc()
            raise StreamError(f"{self.kind} watch: undecodable event: {e}") from e
        if not isinstance(ev, dict):
            raise StreamError(f"{self.kind} watch: event is not a JSON object")
        typ = ev.get("type")
        obj = ev.get("object")
        if typ == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            msg = obj.get("message") if isinstance(obj, dict) else obj
            if code == 410:
                raise Gone(str(msg))
            raise StreamError(f"{self.kind} watch: ERROR event {code}: {msg}")
        if not isinstance(obj, dict):
            raise StreamError(f"{self.kind} watch: {typ} event without an object")
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if typ == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        if typ not in ("ADDED", "MODIFIED", "DELETED"):
            raise StreamError(f"{self.kind} watch: unknown event type {typ!r}")
        if rv:
            self.resource_version = rv
        if not _valid(self.kind, obj):
            metrics.INVALID_OBJECTS_TOTAL.labels(self.kind).inc()
            return
        obj.setdefault("kind", self.kind)
        key = object_key(obj)
        if typ == "DELETED":
            if self.store.pop(key, None) is None:
                return
            self.deliver([Event(self.kind, key, None)])
        else:
            self.store[key] = obj
            self.deliver([Event(self.kind, key, obj)])

    def _maybe_resync(self) -> None:
        # Upstream's informer resync (--config-sync-period): redeliver the store; the
        # change tracker drops what did not change.
        now = time.monotonic()
        if now - self._last_resync >= self.resync_period:
            self._last_resync = now
            self.deliver([Event(self.kind, k, o) for k, o in self.store.items()])

    def close(self) -> None:
        """Abort the current watch (shutdown)."""
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:  # best effort: the stream may be gone already
                pass

    # -- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        need_list = True
        while not stop.is_set():
            delay = 0.0
            started = time.monotonic()
            try:
                if need_list:
                    if not self.list(stop):
                        return
                    need_list = False
                started = time.monotonic()
                self.watch(stop)
                # The server ended the watch (its timeout): resume from the last version.
                # A watch that ends at once is a failure in disguise (client-go's "very
                # short watch"): back off so that a flapping server is not hammered.
                if time.monotonic() - started >= 1.0:
                    self.backoff.reset()
                    continue
                delay = self.backoff.next()
            except Gone as e:
                log.info("%s: resourceVersion expired (%s); relisting", self.kind, e)
                need_list = True
                delay = self.backoff.next() if self.lists > 0 and self.watches == 0 else 0.0
            except StreamError as e:
                log.error("%s: %s; relisting", self.kind, e)
                need_list = True
                delay = self.backoff.next()
            except Exception as e:
                if stop.is_set():
                    return
                status = _status_of(e)
                what = f"HTTP {status}" if status else type(e).__name__
                log.warning("%s: %s: %s; retrying", self.kind, what, str(e).splitlines()[0:1])
                if self.watches and time.monotonic() - started >= 1.0:
                    self.backoff.reset()  # a watch that worked for a while: start afresh
                delay = self.backoff.next()
            if self.connected is not None:
                self.connected(self.kind, False)
            self.watches = 0
            if delay and stop.wait(delay):
                return


# ---------------------------------------------------------------------------------------
# Health
# ---------------------------------------------------------------------------------------


class ApiHealthState(ProxyHealthState):
    """The daemon's health when fed by the API server: as upstream, plus /healthz answers
    503 once the API server has been unreachable for the health timeout (the programmed
    rules are stale; issue 7). /livez ignores it, since a restart would not bring the API
    server back, and the rules stay in place. It is reported through node eligibility
    because that is what /healthz alone looks at (so ``nodeEligible`` reads false during
    a long outage); the service health check node ports, which follow sync freshness
    only, are unaffected."""

    def __init__(self, health_timeout: float, clock: Callable[[], float] = time.time) -> None:
        super().__init__(health_timeout, clock)
        self._lost_at: float | None = None

    def set_source_lost(self, lost: bool) -> None:
        with self._lock:
            if not lost:
                self._lost_at = None
            elif self._lost_at is None:
                self._lost_at = self._clock()

    def source_stale(self) -> bool:
        with self._lock:
            lost = self._lost_at
        return lost is not None and self.now() - lost >= self.health_timeout

    @property
    def node_eligible(self) -> bool:
        return bool(super().node_eligible) and not self.source_stale()


# ---------------------------------------------------------------------------------------
# Events on the Node (best effort)
# ---------------------------------------------------------------------------------------


def _micro_time(ts: float | None = None) -> str:
    when = datetime.fromtimestamp(time.time() if ts is None else ts, tz=timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EventRecorder:
    """Posts events.k8s.io/v1 Events from a background thread; never blocks the caller
    and never fails the proxy (a full queue or an API error drops the event)."""

    def __init__(self, api_client: Any, node_name: str, limiter: RateLimiter) -> None:
        self.api_client = api_client
        self.node_name = node_name
        self.limiter = limiter
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=100)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def node_ref(self) -> dict[str, Any]:
        # upstream's NodeRef: UID is the node name (cmd/kube-proxy/app/server.go)
        return {"kind": "Node", "apiVersion": "v1", "name": self.node_name, "uid": self.node_name}

    def event(
        self,
        regarding: dict[str, Any],
        type_: str,
        reason: str,
        action: str,
        note: str = "",
    ) -> None:
        namespace = regarding.get("namespace") or "default"
        now = time.time()
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                "name": f"{regarding.get('name')}.{int(now * 1e9):x}",
                "namespace": namespace,
            },
            "eventTime": _micro_time(now),
            "reportingController": "kube-proxy",
            "reportingInstance": f"kube-proxy-{self.node_name}",
            "action": action,
            "reason": reason,
            "regarding": regarding,
            "note": note[:1024],
            "type": type_,
        }
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            log.debug("event queue full; dropped %s %s", reason, regarding.get("name"))
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="events", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        from kubernetes import client

        events_api: Any = client.EventsV1Api(self.api_client)
        while True:
            body = self._queue.get()
            if body is None or self._stop.is_set():
                return
            if not self.limiter.wait(self._stop):
                return
            try:
                resp = events_api.create_namespaced_event(
                    body["metadata"]["namespace"],
                    client.EventsV1Event.from_dict(body),
                    _preload_content=False,
                    _request_timeout=(5, 10),
                )
                resp.release_conn()
                self.sent += 1
            except Exception as e:  # best effort by design (upstream: events are lossy)
                log.debug("could not record event %s: %s", body.get("reason"), e)

    def close(self) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass


class RecordingServiceHealthServer(ServiceHealthServer):
    """Health check node ports whose failed listens are recorded as upstream's
    ``FailedToStartServiceHealthcheck`` Warning on the Service (once per failure)."""

    def __init__(
        self,
        node_port_addresses: Sequence[str],
        health_state: ProxyHealthChecker,
        recorder: EventRecorder,
    ) -> None:
        super().__init__(node_port_addresses, health_state)
        self.recorder = recorder
        self._reported: dict[int, str] = {}

    def sync_services(self, services: Mapping[int, str]) -> dict[int, str]:
        failures = super().sync_services(services)
        for port, error in failures.items():
            svc = str(services.get(port, ""))
            if self._reported.get(port) != svc:
                ns, _, name = svc.partition("/")
                self.recorder.event(
                    {"kind": "Service", "apiVersion": "v1", "namespace": ns, "name": name},
                    "Warning",
                    "FailedToStartServiceHealthcheck",
                    "Listen",
                    f"node {self.recorder.node_name} failed to start healthcheck "
                    f'"{svc}" on port {port}: {error}',
                )
            self._reported[port] = svc
        for port in list(self._reported):
            if port not in failures:
                del self._reported[port]
        return failures


# ---------------------------------------------------------------------------------------
# The source
# ---------------------------------------------------------------------------------------


class ApiServerSource:
    """Services, EndpointSlices and this node's Node from the API server."""

    def __init__(
        self,
        cfg: Any,
        api_client: Any | None = None,
        *,
        node_name: str | None = None,
        page_size: int = PAGE_SIZE,
        watch_timeout: float = MIN_WATCH_TIMEOUT,
        backoff: Callable[[], Backoff] = Backoff,
        node_wait: float = NODE_WAIT,
    ) -> None:
        self.cfg = cfg
        self.api_client = api_client if api_client is not None else build_api_client(cfg)
        self.node_name = node_name if node_name is not None else str(cfg.node_name)
        self.limiter = RateLimiter(float(cfg.kube_api_qps), int(cfg.kube_api_burst))
        self.page_size = page_size
        self.watch_timeout = float(
            os.environ.get("KPROXY_WATCH_TIMEOUT_SECONDS", "") or watch_timeout
        )
        self.backoff = backoff
        self.node_wait = node_wait
        self.recorder = EventRecorder(self.api_client, self.node_name, self.limiter)
        #: the daemon's health (set by the cli): told when the watches are lost and back
        self.health: ApiHealthState | None = None
        self.reflectors: list[Reflector] = []
        self._deliver_lock = threading.Lock()
        self._disconnected: set[Kind] = set()
        self._conn_lock = threading.Lock()

    # -- API calls -----------------------------------------------------------------------

    def _listers(self) -> dict[Kind, Callable[..., Any]]:
        from kubernetes import client

        core: Any = client.CoreV1Api(self.api_client)
        discovery: Any = client.DiscoveryV1Api(self.api_client)
        return {
            "Service": core.list_service_for_all_namespaces,
            "EndpointSlice": discovery.list_endpoint_slice_for_all_namespaces,
            "Node": core.list_node,
        }

    def node_object(self, name: str) -> dict[str, Any] | None:
        """This node's Node, waiting up to ``node_wait`` seconds for it to exist and the
        API server to answer (upstream's NodeManager); None after that."""
        from kubernetes import client

        core: Any = client.CoreV1Api(self.api_client)
        deadline = time.monotonic() + self.node_wait
        backoff = self.backoff()
        never = threading.Event()
        while True:
            try:
                self.limiter.wait(never)
                resp = core.list_node(
                    field_selector=f"metadata.name={name}",
                    _preload_content=False,
                    _request_timeout=(5, 10),
                )
                try:
                    items = json.loads(resp.data).get("items") or []
                finally:
                    resp.release_conn()
                for obj in items:
                    if _valid("Node", obj) and obj["metadata"]["name"] == name:
                        obj.setdefault("kind", "Node")
                        return dict(obj)
                problem = "not found"
            except Exception as e:
                problem = f"{type(e).__name__}: {str(e).splitlines()[0:1]}"
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("Node %s: %s; continuing without it", name, problem)
                return None
            log.info("waiting for Node %s (%s)", name, problem)
            time.sleep(min(left, backoff.next(), 2.0))

    # -- Handler plumbing ----------------------------------------------------------------

    def _connected(self, kind: Kind, ok: bool) -> None:
        with self._conn_lock:
            was = bool(self._disconnected)
            if ok:
                self._disconnected.discard(kind)
            else:
                self._disconnected.add(kind)
            now = bool(self._disconnected)
        if was == now:
            return
        if now:
            log.warning("lost the API server; keeping the programmed rules")
        else:
            log.info("API server watches re-established")
        if self.health is not None:
            self.health.set_source_lost(now)

    def run(self, handler: Handler, stop: threading.Event) -> None:
        def deliver(events: list[Event]) -> None:
            with self._deliver_lock:
                handler.on_events(events)

        def synced(kind: Kind) -> None:
            with self._deliver_lock:
                handler.on_synced(kind)

        listers = self._listers()
        selectors: dict[Kind, tuple[str | None, str | None]] = {
            "Service": (LABEL_SELECTOR, None),
            "EndpointSlice": (LABEL_SELECTOR, None),
            "Node": (None, f"metadata.name={self.node_name}"),
        }
        self.reflectors = [
            Reflector(
                kind,
                listers[kind],
                deliver,
                synced=synced,
                label_selector=label,
                field_selector=fields,
                limiter=self.limiter,
                backoff=self.backoff(),
                page_size=self.page_size,
                watch_timeout=self.watch_timeout,
                resync_period=float(self.cfg.config_sync_period),
                connected=self._connected,
            )
            for kind, (label, fields) in selectors.items()
        ]
        threads = [
            threading.Thread(target=r.run, args=(stop,), name=f"reflector-{r.kind}", daemon=True)
            for r in self.reflectors
        ]
        for t in threads:
            t.start()
        stop.wait()
        for r in self.reflectors:
            r.close()
        self.recorder.close()
        for t in threads:
            t.join(timeout=2.0)
