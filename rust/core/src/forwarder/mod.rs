//! userspace mode's L4 forwarder: tokio runtimes on their own threads that accept the
//! flows the capture rules (`capture.rs`) redirect to them and relay them to endpoints.
//!
//! - TCP: one shard per worker thread (a current-thread runtime with its own
//!   SO_REUSEPORT listener per family, all on one port), so a connection is accepted,
//!   connected and relayed on one thread; `SO_ORIGINAL_DST` names the Service address; the
//!   endpoint is picked with the Service's algorithm (`selection.rs`: round robin by
//!   default, `kproxy.io/lb-algorithm`, ClientIP affinity); a failed connect is retried
//!   on another endpoint; bytes are copied, or spliced once a flow turns out bulk
//!   (`relay.rs`).
//! - UDP: one listener per service port and access kind (capture.rs explains why);
//!   a session per client address with an idle timeout; replies go out of the listener.
//! - Updates (`sync`) build a new lookup table and swap it in; the live per-port state
//!   (selection, counters) is updated in place under short locks. Open connections keep
//!   their endpoint when it is removed; new ones go elsewhere.

pub mod capture;
pub mod relay;
pub mod stats;
pub mod sys;
pub mod table;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::error::{Error, Result};
use crate::model::{Model, Protocol, ServicePortName};
use crate::net::{Cidr, Family};

use relay::Ended;
use stats::{GlobalSnapshot, GlobalStats, PortSnapshot};
use sys::PipePool;
use table::{build_specs, lock, PortSpec, PortState, Route, Table, TableConfig};

fn d_connect_timeout() -> u64 {
    2000
}
fn d_attempts() -> usize {
    3
}
fn d_udp_idle() -> u64 {
    30_000
}
fn d_udp_max() -> usize {
    16384
}
fn d_true() -> bool {
    true
}
fn d_pipes() -> usize {
    1024
}
fn d_backlog() -> u32 {
    4096
}
fn d_nofile() -> u64 {
    1 << 20
}
fn d_families() -> Vec<Family> {
    vec![Family::V4]
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForwarderConfig {
    /// The TCP listener port (0: the kernel picks one).
    #[serde(default)]
    pub tcp_port: u16,
    #[serde(default = "d_families")]
    pub families: Vec<Family>,
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Endpoints tried for one connection before it is reset.
    #[serde(default = "d_attempts")]
    pub connect_attempts: usize,
    #[serde(default = "d_udp_idle")]
    pub udp_idle_timeout_ms: u64,
    /// UDP sessions per listener; datagrams of new clients beyond it are dropped.
    #[serde(default = "d_udp_max")]
    pub udp_max_sessions: usize,
    /// splice(2) (default) or copy through user space.
    #[serde(default = "d_true")]
    pub splice: bool,
    /// TCP shards, and worker threads of the UDP runtime (0: one per CPU).
    #[serde(default)]
    pub workers: usize,
    #[serde(default = "d_pipes")]
    pub max_idle_pipes: usize,
    #[serde(default = "d_backlog")]
    pub backlog: u32,
    /// RLIMIT_NOFILE wanted (raised as far as allowed).
    #[serde(default = "d_nofile")]
    pub nofile: u64,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

struct Shared {
    cfg: ForwarderConfig,
    table: RwLock<Arc<Table>>,
    global: GlobalStats,
    pipes: PipePool,
}

impl Shared {
    fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Seconds on a monotonic clock (selection's `now`).
fn now_secs() -> f64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

fn now_ms() -> u64 {
    (now_secs() * 1000.0) as u64
}

/// The two UDP listeners of one service port (ClusterIP access, external access).
struct UdpPair {
    ports: (u16, u16),
    tasks: [AbortHandle; 2],
}

impl Drop for UdpPair {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What a sync produced for the Python side.
#[derive(Serialize)]
pub struct SyncOutput {
    /// `nft -f` input for the capture table.
    pub nft: String,
    pub warnings: Vec<String>,
    pub health_checks: Vec<HealthCheck>,
    pub service_ports: usize,
    /// UDP destinations now captured, in `kproxy.conntrack.clear`'s shape: entries made
    /// before they were captured (no NAT) must go, or they blackhole the client.
    pub udp_captured: Vec<UdpTarget>,
}

#[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct UdpTarget {
    /// "service-ip" (ip:port) or "nodeport" (any local address).
    pub kind: &'static str,
    pub ip: Option<String>,
    pub port: u16,
    pub protocol: &'static str,
}

#[derive(Serialize)]
pub struct HealthCheck {
    pub port: u16,
    pub service: String,
    pub local_endpoints: usize,
}

#[derive(Serialize)]
pub struct Snapshot {
    pub ports: Vec<PortSnapshot>,
    pub global: GlobalSnapshot,
}

pub struct Forwarder {
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    stop: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
    ports: Mutex<HashMap<(ServicePortName, Family), Arc<PortState>>>,
    udp: Mutex<HashMap<(ServicePortName, Family), UdpPair>>,
    tcp_port: u16,
}

fn io_err(what: &str, e: io::Error) -> Error {
    Error::config("forwarder", format!("{what}: {e}"))
}

fn unspecified(f: Family) -> IpAddr {
    match f {
        Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

fn set_v6only(fd: i32) {
    let one: libc::c_int = 1;
    // SAFETY: valid int option on a socket we own.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// One listener of the TCP shard group: SO_REUSEPORT, so every shard binds the same
/// port and the kernel spreads new connections over them by flow hash.
fn tcp_listener(f: Family, port: u16, backlog: u32) -> io::Result<std::net::TcpListener> {
    let s = match f {
        Family::V4 => TcpSocket::new_v4()?,
        Family::V6 => {
            let s = TcpSocket::new_v6()?;
            set_v6only(s.as_raw_fd());
            s
        }
    };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    // Accepted sockets inherit TCP_NODELAY: one setsockopt less per connection.
    s.set_nodelay(true)?;
    s.bind(SocketAddr::new(unspecified(f), port))?;
    let fd = s.into_raw_fd();
    // SAFETY: `fd` is the bound socket we own (into_raw_fd gave up tokio's ownership).
    let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    // SAFETY: listen(2) on a valid socket.
    if unsafe { libc::listen(fd, backlog.min(i32::MAX as u32) as libc::c_int) } != 0 {
        return Err(io::Error::last_os_error());
    }
    l.set_nonblocking(true)?;
    Ok(l)
}

fn udp_socket(f: Family) -> io::Result<UdpSocket> {
    let std = std::net::UdpSocket::bind(SocketAddr::new(unspecified(f), 0))?;
    std.set_nonblocking(true)?;
    UdpSocket::from_std(std)
}

impl Forwarder {
    /// Start the runtime and the TCP listeners (bound before this returns).
    pub fn start(cfg: ForwarderConfig) -> Result<Forwarder> {
        if cfg.families.is_empty() {
            return Err(Error::config("families", "at least one IP family"));
        }
        sys::raise_nofile(cfg.nofile);
        let workers = if cfg.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        } else {
            cfg.workers
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("kproxy-fwd")
            .enable_all()
            .build()
            .map_err(|e| io_err("tokio runtime", e))?;
        let handle = rt.handle().clone();
        let shared = Arc::new(Shared {
            pipes: PipePool::new(cfg.max_idle_pipes),
            cfg: cfg.clone(),
            table: RwLock::new(Arc::new(Table::default())),
            global: GlobalStats::default(),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        // TCP runs in shards: one thread per worker, each with its own current-thread
        // runtime and its own SO_REUSEPORT listener per family. A connection lives and
        // dies on the thread that accepted it: no wake-up of another thread, no task
        // migration, no lock shared by the accept path.
        let mut tcp_port = cfg.tcp_port;
        let mut shard_listeners: Vec<Vec<(std::net::TcpListener, bool)>> = Vec::new();
        for _ in 0..workers {
            let mut ls = Vec::new();
            for &f in &cfg.families {
                let l = tcp_listener(f, tcp_port, cfg.backlog)
                    .map_err(|e| io_err(&format!("TCP listener port {tcp_port}"), e))?;
                tcp_port = l.local_addr().map_err(|e| io_err("local_addr", e))?.port();
                ls.push((l, f == Family::V6));
            }
            shard_listeners.push(ls);
        }
        let mut threads = Vec::new();
        for (i, ls) in shard_listeners.into_iter().enumerate() {
            let shard = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| io_err("tokio runtime", e))?;
            let (shared, stop) = (shared.clone(), stop_rx.clone());
            let t = std::thread::Builder::new()
                .name(format!("kproxy-tcp-{i}"))
                .spawn(move || shard.block_on(serve_shard(ls, shared, stop)))
                .map_err(|e| io_err("thread", e))?;
            threads.push(t);
        }
        let mut done = stop_rx;
        let thread = std::thread::Builder::new()
            .name("kproxy-forwarder".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = done.wait_for(|s| *s).await;
                });
                rt.shutdown_timeout(Duration::from_secs(1));
                for t in threads {
                    let _ = t.join();
                }
            })
            .map_err(|e| io_err("thread", e))?;
        Ok(Forwarder {
            shared,
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
            ports: Mutex::new(HashMap::new()),
            udp: Mutex::new(HashMap::new()),
            tcp_port,
        })
    }

    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Apply the model: update endpoint sets in place, open/close UDP listeners, swap in
    /// the new lookup table, and return the capture rules to program.
    pub fn sync(&self, model: &Model, tcfg: &TableConfig) -> Result<SyncOutput> {
        let mut cidrs = Vec::new();
        for c in &tcfg.cluster_cidrs {
            cidrs.push(
                Cidr::parse(c).ok_or_else(|| {
                    Error::config("cluster_cidrs", format!("{c:?} is not a CIDR"))
                })?,
            );
        }
        let families: Vec<Family> = tcfg
            .families
            .iter()
            .copied()
            .filter(|f| self.shared.cfg.families.contains(f))
            .collect();
        let tcfg = TableConfig {
            families: families.clone(),
            ..tcfg.clone()
        };
        let (specs, warnings) = build_specs(model, &tcfg);
        let mut ports = lock(&self.ports);
        let mut udp = lock(&self.udp);
        let mut old = std::mem::take(&mut *ports);
        let mut udp_old = std::mem::take(&mut *udp);
        let mut table = Table {
            internal_cidrs: cidrs.clone(),
            node_ips: tcfg.node_ips.clone(),
            ..Default::default()
        };
        let mut udp_ports = capture::UdpPorts::new();
        let mut specs_ok: Vec<PortSpec> = Vec::with_capacity(specs.len());
        for spec in specs {
            let key = spec.key();
            let state = match old.remove(&key) {
                Some(st) => {
                    st.apply(&spec);
                    st
                }
                None => Arc::new(PortState::new(&spec)),
            };
            let proto = spec.name.protocol;
            if proto == Protocol::Udp {
                let pair = match udp_old.remove(&key) {
                    Some(p) => p,
                    None => match self.open_udp(&state, spec.family) {
                        Ok(p) => p,
                        Err(e) => {
                            // Not captured: the flow keeps whatever the kernel does.
                            let _ = e;
                            ports.insert(key, state);
                            continue;
                        }
                    },
                };
                udp_ports.insert(key.clone(), pair.ports);
                udp.insert(key.clone(), pair);
            }
            let int = Route {
                port: state.clone(),
                external: false,
            };
            let ext = Route {
                port: state.clone(),
                external: true,
            };
            table
                .vips
                .entry((proto, SocketAddr::new(spec.cluster_ip, spec.port)))
                .or_insert(int);
            for ip in spec.external_ips.iter().chain(&spec.load_balancer_ips) {
                table
                    .vips
                    .entry((proto, SocketAddr::new(*ip, spec.port)))
                    .or_insert(ext.clone());
            }
            if spec.node_port != 0 {
                table
                    .node_ports
                    .entry((proto, spec.family, spec.node_port))
                    .or_insert(ext);
            }
            ports.insert(key, state);
            specs_ok.push(spec);
        }
        // Removed service ports: their UDP listeners close (UdpPair::drop); TCP
        // connections already relaying hold their own Arc and finish.
        drop(udp_old);
        *self.shared.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        let nft = capture::render(&specs_ok, self.tcp_port, &udp_ports, &families, &cidrs);
        let mut hcs: BTreeMap<u16, HealthCheck> = BTreeMap::new();
        for s in &specs_ok {
            if s.health_check_node_port != 0 {
                let e = hcs.entry(s.health_check_node_port).or_insert(HealthCheck {
                    port: s.health_check_node_port,
                    service: s.name.service_key(),
                    local_endpoints: 0,
                });
                e.local_endpoints = e.local_endpoints.max(s.local.len());
            }
        }
        let mut udp_captured = Vec::new();
        for s in specs_ok
            .iter()
            .filter(|s| s.name.protocol == Protocol::Udp && s.has_endpoints)
        {
            let vips = std::iter::once(&s.cluster_ip)
                .chain(&s.external_ips)
                .chain(&s.load_balancer_ips);
            for ip in vips {
                udp_captured.push(UdpTarget {
                    kind: "service-ip",
                    ip: Some(ip.to_string()),
                    port: s.port,
                    protocol: "udp",
                });
            }
            if s.node_port != 0 {
                udp_captured.push(UdpTarget {
                    kind: "nodeport",
                    ip: None,
                    port: s.node_port,
                    protocol: "udp",
                });
            }
        }
        udp_captured.sort();
        udp_captured.dedup();
        Ok(SyncOutput {
            udp_captured,
            nft,
            warnings,
            health_checks: hcs.into_values().collect(),
            service_ports: specs_ok.len(),
        })
    }

    fn open_udp(&self, state: &Arc<PortState>, f: Family) -> io::Result<UdpPair> {
        let _g = self.handle.enter();
        let a = Arc::new(udp_socket(f)?);
        let b = Arc::new(udp_socket(f)?);
        for s in [&a, &b] {
            sys::enable_pktinfo(s.as_raw_fd(), f == Family::V6)?;
        }
        let ports = (a.local_addr()?.port(), b.local_addr()?.port());
        let t1 = self
            .handle
            .spawn(serve_udp(a, state.clone(), false, self.shared.clone()));
        let t2 = self
            .handle
            .spawn(serve_udp(b, state.clone(), true, self.shared.clone()));
        Ok(UdpPair {
            ports,
            tasks: [t1.abort_handle(), t2.abort_handle()],
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        let ports = lock(&self.ports);
        let mut out: Vec<PortSnapshot> = ports
            .values()
            .map(|p| {
                p.stats.snapshot(
                    p.name.to_string(),
                    p.name.protocol.upper(),
                    match p.family {
                        Family::V4 => "IPv4",
                        Family::V6 => "IPv6",
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.service, a.protocol, a.family).cmp(&(&b.service, b.protocol, b.family))
        });
        Snapshot {
            ports: out,
            global: self.shared.global.snapshot(self.shared.pipes.idle()),
        }
    }

    /// Stop the runtime (open connections are closed). Idempotent.
    pub fn stop(&mut self) {
        lock(&self.udp).clear();
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

fn reset(s: TcpStream) {
    sys::set_linger_zero(s.as_raw_fd());
    drop(s);
}

async fn serve_tcp(l: TcpListener, v6: bool, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let r = tokio::select! {
            r = l.accept() => r,
            _ = stop.changed() => return,
        };
        match r {
            Ok((s, peer)) => {
                tokio::spawn(handle_tcp(s, peer, v6, shared.clone()));
            }
            Err(_) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
                shared.global.accept_errors.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// One TCP shard until stop: its listeners (one per family) on its own current-thread
/// runtime. When it returns, the caller drops the runtime, and with it the
/// connections still open.
async fn serve_shard(
    listeners: Vec<(std::net::TcpListener, bool)>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let mut serving = tokio::task::JoinSet::new();
    // A timer that always expires sooner than any connect timeout: tokio wakes its own
    // driver (an eventfd write) whenever a timer is registered earlier than the
    // driver's next wake-up, which otherwise is what every connection's connect
    // timeout is.
    let ticker = tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    for (l, v6) in listeners {
        match TcpListener::from_std(l) {
            Ok(l) => {
                serving.spawn(serve_tcp(l, v6, shared.clone(), stop.clone()));
            }
            Err(_) => {
                shared.global.accept_errors.fetch_add(1, Relaxed);
            }
        }
    }
    while serving.join_next().await.is_some() {}
    ticker.abort();
}

/// A connection to an endpoint, TCP_NODELAY set. Its outcome is read from the readiness
/// event itself (a failed connect reports an error or a hang-up), which saves the
/// getsockopt(SO_ERROR) that tokio's own connect spends on every connection.
async fn connect(ep: SocketAddr) -> io::Result<TcpStream> {
    let s = match ep {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    s.set_nodelay(true)?;
    let fd = s.into_raw_fd();
    // SAFETY: `fd` is the socket we own (into_raw_fd gave up tokio's ownership).
    let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    sys::connect_start(fd, ep)?;
    let stream = TcpStream::from_std(std)?;
    let ready = stream.ready(Interest::WRITABLE).await?;
    if ready.is_write_closed() || ready.is_error() {
        let e = stream.take_error()?;
        return Err(e.unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}

async fn handle_tcp(client: TcpStream, peer: SocketAddr, v6: bool, shared: Arc<Shared>) {
    // TCP_NODELAY comes from the listener.
    let Ok(dst) = sys::original_dst(client.as_raw_fd(), v6) else {
        shared.global.unknown_destination.fetch_add(1, Relaxed);
        return reset(client);
    };
    let (route, internal) = {
        let t = shared.table();
        match t.route(Protocol::Tcp, dst) {
            Some(r) => (r.clone(), t.is_internal(&peer.ip())),
            None => {
                shared.global.unknown_destination.fetch_add(1, Relaxed);
                return reset(client);
            }
        }
    };
    let port = route.port;
    let set = port.set(port.choose(route.external, internal));
    let st = &port.stats;
    st.connections.fetch_add(1, Relaxed);
    let timeout = Duration::from_millis(shared.cfg.connect_timeout_ms);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut upstream = None;
    for _ in 0..shared.cfg.connect_attempts.max(1) {
        let Some(ep) = lock(set).pick(&peer.ip(), now_secs(), &tried) else {
            break;
        };
        match tokio::time::timeout(timeout, connect(ep)).await {
            Ok(Ok(s)) => {
                upstream = Some((s, ep));
                break;
            }
            _ => {
                st.connect_failures.fetch_add(1, Relaxed);
                lock(set).release(&ep);
                tried.push(ep);
            }
        }
    }
    let Some((up, ep)) = upstream else {
        st.no_endpoint.fetch_add(1, Relaxed);
        return reset(client);
    };
    st.active.fetch_add(1, Relaxed);
    let (ended, spliced) = relay::relay(
        &client,
        &up,
        &shared.pipes,
        shared.cfg.splice,
        &st.bytes_to_endpoints,
        &st.bytes_from_endpoints,
    )
    .await;
    if ended == Ended::Reset {
        st.resets.fetch_add(1, Relaxed);
    }
    if spliced {
        shared.global.relays_spliced.fetch_add(1, Relaxed);
    } else {
        shared.global.relays_copied.fetch_add(1, Relaxed);
    }
    st.active.fetch_sub(1, Relaxed);
    lock(set).release(&ep);
}

struct Session {
    up: Arc<UdpSocket>,
    endpoint: SocketAddr,
    generation: u64,
    last: Arc<AtomicU64>,
    id: u64,
    task: AbortHandle,
}

type Sessions = Arc<Mutex<HashMap<SocketAddr, Session>>>;

async fn serve_udp(
    sock: Arc<UdpSocket>,
    port: Arc<PortState>,
    external: bool,
    shared: Arc<Shared>,
) {
    let sessions: Sessions = Arc::new(Mutex::new(HashMap::new()));
    // Sessions die with the listener (service port removed or forwarder stopped).
    struct AbortAll(Sessions);
    impl Drop for AbortAll {
        fn drop(&mut self) {
            for (_, s) in lock(&self.0).drain() {
                s.task.abort();
            }
        }
    }
    let _guard = AbortAll(sessions.clone());
    let idle = Duration::from_millis(shared.cfg.udp_idle_timeout_ms.max(1));
    let mut next_id = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        if sock.readable().await.is_err() {
            continue;
        }
        let fd = sock.as_raw_fd();
        let (n, client, local) =
            match sock.try_io(Interest::READABLE, || sys::recv_with_dst(fd, &mut buf)) {
                Ok(x) => x,
                Err(_) => continue,
            };
        let generation = port.generation.load(Relaxed);
        let existing = {
            let mut map = lock(&sessions);
            let mut stale = false;
            if let Some(s) = map.get_mut(&client) {
                if s.generation != generation {
                    // Endpoints changed: a session whose endpoint is gone moves on.
                    let t = shared.table();
                    let set = port.set(port.choose(external, t.is_internal(&client.ip())));
                    if lock(set).contains(&s.endpoint) {
                        s.generation = generation;
                    } else {
                        stale = true;
                    }
                }
            }
            if stale {
                if let Some(s) = map.remove(&client) {
                    s.task.abort();
                    port.stats.active.fetch_sub(1, Relaxed);
                }
            }
            map.get(&client).map(|s| (s.up.clone(), s.last.clone()))
        };
        let (up, last) = match existing {
            Some(x) => x,
            None => {
                if lock(&sessions).len() >= shared.cfg.udp_max_sessions {
                    port.stats.udp_dropped.fetch_add(1, Relaxed);
                    continue;
                }
                let internal = shared.table().is_internal(&client.ip());
                let set = port.set(port.choose(external, internal));
                let Some(ep) = lock(set).pick(&client.ip(), now_secs(), &[]) else {
                    port.stats.no_endpoint.fetch_add(1, Relaxed);
                    continue;
                };
                let up = match udp_socket(port.family) {
                    Ok(u) => u,
                    Err(_) => {
                        lock(set).release(&ep);
                        port.stats.udp_dropped.fetch_add(1, Relaxed);
                        continue;
                    }
                };
                if up.connect(ep).await.is_err() {
                    lock(set).release(&ep);
                    port.stats.connect_failures.fetch_add(1, Relaxed);
                    continue;
                }
                let up = Arc::new(up);
                let last = Arc::new(AtomicU64::new(now_ms()));
                next_id += 1;
                let task = tokio::spawn(udp_replies(
                    up.clone(),
                    sock.clone(),
                    client,
                    local,
                    last.clone(),
                    idle,
                    sessions.clone(),
                    next_id,
                    port.clone(),
                    external,
                    internal,
                    ep,
                ));
                port.stats.connections.fetch_add(1, Relaxed);
                port.stats.active.fetch_add(1, Relaxed);
                lock(&sessions).insert(
                    client,
                    Session {
                        up: up.clone(),
                        endpoint: ep,
                        generation,
                        last: last.clone(),
                        id: next_id,
                        task: task.abort_handle(),
                    },
                );
                (up, last)
            }
        };
        last.store(now_ms(), Relaxed);
        match up.send(&buf[..n]).await {
            Ok(m) => {
                port.stats.bytes_to_endpoints.fetch_add(m as u64, Relaxed);
            }
            Err(_) => {
                port.stats.udp_dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn udp_replies(
    up: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    local: Option<IpAddr>,
    last: Arc<AtomicU64>,
    idle: Duration,
    sessions: Sessions,
    id: u64,
    port: Arc<PortState>,
    external: bool,
    internal: bool,
    ep: SocketAddr,
) {
    loop {
        match tokio::time::timeout(idle, up.readable()).await {
            Ok(Ok(())) => {
                let mut buf = [0u8; 65536];
                match up.try_recv(&mut buf) {
                    Ok(n) => {
                        last.store(now_ms(), Relaxed);
                        let fd = listener.as_raw_fd();
                        // From the address the client's datagram was redirected to, so
                        // conntrack rewrites the source back to the Service address.
                        match listener.try_io(Interest::WRITABLE, || {
                            sys::send_from(fd, &buf[..n], client, local)
                        }) {
                            Ok(m) => {
                                port.stats.bytes_from_endpoints.fetch_add(m as u64, Relaxed);
                            }
                            Err(_) => {
                                port.stats.udp_dropped.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        // ICMP unreachable from the endpoint: end the session.
                        port.stats.udp_dropped.fetch_add(1, Relaxed);
                        break;
                    }
                }
            }
            Ok(Err(_)) => break,
            Err(_) => {
                if now_ms().saturating_sub(last.load(Relaxed)) >= idle.as_millis() as u64 {
                    break;
                }
            }
        }
    }
    let mut map = lock(&sessions);
    if map.get(&client).is_some_and(|s| s.id == id) {
        map.remove(&client);
        port.stats.active.fetch_sub(1, Relaxed);
    }
    drop(map);
    lock(port.set(port.choose(external, internal))).release(&ep);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Run a test's future on a fresh current-thread runtime.
    pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("test runtime")
            .block_on(f)
    }

    #[test]
    fn accepted_connections_inherit_nodelay() {
        block_on(async {
            let l = TcpListener::from_std(tcp_listener(Family::V4, 0, 16).unwrap()).unwrap();
            let port = l.local_addr().unwrap().port();
            let (c, a) = tokio::join!(TcpStream::connect(("127.0.0.1", port)), l.accept());
            let (_c, (a, _)) = (c.unwrap(), a.unwrap());
            // handle_tcp does not set it on the client side itself.
            assert!(a.nodelay().unwrap());
        });
    }

    #[test]
    fn connect_reports_success_and_refusal_from_the_readiness_event() {
        block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let open = l.local_addr().unwrap();
            let s = connect(open).await.unwrap();
            assert!(s.nodelay().unwrap());
            let (a, _) = l.accept().await.unwrap();
            assert_eq!(a.peer_addr().unwrap(), s.local_addr().unwrap());
            drop(l); // nothing listens on that port any more
            let e = connect(open).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
            let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), open.port());
            assert!(connect(v6).await.is_err());
        });
    }
}
