//! Moving bytes between the client and the endpoint of one TCP connection.
//!
//! Each direction starts by copying through a scratch buffer of its thread: for the
//! small messages of request/response traffic a recv and a send cost less than two
//! splices through a pipe, and a short read shows the socket drained, so no extra read
//! is spent learning EAGAIN. The first read that fills the scratch buffer marks a bulk
//! flow, and (with splice on) the direction continues with splice(2): socket -> pipe ->
//! socket inside the kernel, no copy to user space. At most one pipe's worth (1 MiB) is
//! in flight per direction, so a slow reader stops the other side by TCP flow control
//! instead of growing a buffer. The pipe goes back to a shared pool whenever the
//! direction is drained, so idle connections hold no pipe, and no buffer either: bytes
//! a destination does not take at once are the only ones kept per connection. Where
//! splice is refused (EINVAL, e.g. a socket type without splice_read), a direction goes
//! on copying.
//!
//! Half-close: end of file on one side becomes shutdown(SHUT_WR) on the other, and the
//! other direction keeps flowing. An error on either side (a reset, a vanished peer)
//! ends both with SO_LINGER 0, so the other peer sees a RST, not a clean close.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::sys::{self, PipePool};

const CHUNK: usize = sys::PIPE_SIZE;
const COPY_BUFFER: usize = 64 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both sides closed their sending half.
    Closed,
    /// One side failed; both were reset.
    Reset,
}

/// Relay until both directions end. `up`/`down` count client->endpoint and
/// endpoint->client bytes as they move. The caller closes both sockets when it
/// returns: the direction that ends last leaves its FIN to that close (one
/// shutdown(2) less per connection).
pub async fn relay(
    client: &TcpStream,
    endpoint: &TcpStream,
    pool: &PipePool,
    use_splice: bool,
    up: &AtomicU64,
    down: &AtomicU64,
) -> (Ended, bool) {
    let mut spliced = use_splice;
    let ended = AtomicU8::new(0);
    let f1 = direction(client, endpoint, pool, use_splice, up, &ended);
    let f2 = direction(endpoint, client, pool, use_splice, down, &ended);
    tokio::pin!(f1, f2);
    let (mut done1, mut done2) = (false, false);
    while !(done1 && done2) {
        let r = tokio::select! {
            r = &mut f1, if !done1 => { done1 = true; r }
            r = &mut f2, if !done2 => { done2 = true; r }
        };
        match r {
            Ok(s) => spliced &= s,
            Err(_) => {
                sys::set_linger_zero(client.as_raw_fd());
                sys::set_linger_zero(endpoint.as_raw_fd());
                return (Ended::Reset, spliced);
            }
        }
    }
    (Ended::Closed, spliced)
}

/// One direction until end of file (then half-close `dst`). Ok(true) when it went on
/// with splice (a bulk flow), Ok(false) when it copied throughout.
async fn direction(
    src: &TcpStream,
    dst: &TcpStream,
    pool: &PipePool,
    use_splice: bool,
    count: &AtomicU64,
    ended: &AtomicU8,
) -> io::Result<bool> {
    let mut spliced = false;
    if copy_direction(src, dst, count, use_splice).await? == Copied::Bulk {
        match splice_direction(src, dst, pool, count).await {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                copy_direction(src, dst, count, false).await?;
            }
            Err(e) => return Err(e),
            Ok(()) => spliced = true,
        }
    }
    half_close(dst, ended);
    Ok(spliced)
}

/// End of file from `dst`'s peer: send FIN to `dst`, unless the other direction has
/// ended too, when both sockets are about to be closed (which sends the FIN anyway).
fn half_close(dst: &TcpStream, ended: &AtomicU8) {
    if ended.fetch_add(1, Relaxed) == 0 {
        sys::shutdown_write(dst.as_raw_fd());
    }
}

/// Keeps the pipe while bytes flow: reads into it while it has room, writes out of it
/// while the destination takes bytes, and waits only when neither moves (so reading
/// the next burst overlaps a destination that is still draining the last one). An
/// empty pipe goes back to the pool before waiting for the source.
async fn splice_direction(
    src: &TcpStream,
    dst: &TcpStream,
    pool: &PipePool,
    count: &AtomicU64,
) -> io::Result<()> {
    let chunk = CHUNK;
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut pipe: Option<sys::Pipe> = None;
    let mut held = 0usize;
    let mut eof = false;
    loop {
        let mut moved = false;
        if !eof && held < chunk {
            if held == 0 {
                src.readable().await?;
            }
            let p = match &pipe {
                Some(p) => p,
                None => pipe.insert(pool.get()?),
            };
            let w = p.w.as_raw_fd();
            // With bytes already in the pipe, EAGAIN may mean a full pipe, not an
            // empty socket: the socket's readiness is only cleared on an empty pipe.
            let r = if held == 0 {
                src.try_io(Interest::READABLE, || sys::splice(sfd, w, chunk))
            } else {
                sys::splice(sfd, w, chunk - held)
            };
            match r {
                Ok(0) => eof = true,
                Ok(n) => {
                    held += n;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if held > 0 {
            let r = pipe.as_ref().map(|p| p.r.as_raw_fd()).unwrap_or(-1);
            match dst.try_io(Interest::WRITABLE, || sys::splice(r, dfd, held)) {
                Ok(m) => {
                    held -= m;
                    count.fetch_add(m as u64, Relaxed);
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The pipe still holds bytes: dropped (closed), not returned.
                Err(e) => return Err(e),
            }
        }
        if held == 0 {
            if eof {
                if let Some(p) = pipe.take() {
                    pool.put(p);
                }
                return Ok(());
            }
            if !moved {
                if let Some(p) = pipe.take() {
                    pool.put(p);
                }
            }
        } else if !moved {
            dst.writable().await?;
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Copied {
    /// The source reached end of file.
    Eof,
    /// A read filled the scratch buffer (asked to stop there): a bulk flow.
    Bulk,
}

thread_local! {
    /// One scratch buffer per runtime thread. It is never held across an await: the
    /// bytes read into it are written out at once, and what the destination does not
    /// take is moved to the connection's own (rare, bounded) spill buffer.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Read from `src` into the thread's scratch buffer and write at once to `dst`; what
/// `dst` does not take goes to `spill`. Returns None when `src` had nothing to read,
/// else (bytes written, whether the read filled the buffer); (0, false) with an empty
/// `spill` is end of file. A short read clears `src`'s readiness (the socket is drained, as tokio assumes for
/// its own reads on epoll), so the next wait does not start with a read that fails.
fn copy_once(
    src: &TcpStream,
    dst: &TcpStream,
    spill: &mut Vec<u8>,
) -> io::Result<Option<(usize, bool)>> {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.is_empty() {
            buf.resize(COPY_BUFFER, 0);
        }
        let len = buf.len();
        let fd = src.as_raw_fd();
        let mut got = 0usize;
        let r = src.try_io(Interest::READABLE, || {
            let n = sys::recv(fd, &mut buf[..])?;
            if n > 0 && n < len {
                got = n;
                // Drained: have the readiness cleared (the bytes are kept in `got`).
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match r {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(Some((0, false)));
        }
        let mut off = 0;
        while off < n {
            match dst.try_write(&buf[off..n]) {
                Ok(m) => off += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        spill.extend_from_slice(&buf[off..n]);
        Ok(Some((off, n == len)))
    })
}

/// Copy until end of file, or (with `stop_on_bulk`) until a read fills the scratch
/// buffer; bytes read are always written out before this returns.
async fn copy_direction(
    src: &TcpStream,
    dst: &TcpStream,
    count: &AtomicU64,
    stop_on_bulk: bool,
) -> io::Result<Copied> {
    // Bytes the destination did not take at once; empty (no allocation) while it keeps up.
    let mut spill: Vec<u8> = Vec::new();
    loop {
        src.readable().await?;
        let Some((written, full)) = copy_once(src, dst, &mut spill)? else {
            continue;
        };
        count.fetch_add(written as u64, Relaxed);
        if written == 0 && spill.is_empty() {
            return Ok(Copied::Eof);
        }
        let mut off = 0;
        while off < spill.len() {
            match dst.try_write(&spill[off..]) {
                Ok(m) => {
                    off += m;
                    count.fetch_add(m as u64, Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                Err(e) => return Err(e),
            }
        }
        spill = Vec::new();
        if full && stop_on_bulk {
            return Ok(Copied::Bulk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::block_on;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (c, s) = (c.unwrap(), s.unwrap().0);
        // As the forwarder's sockets are (and no Nagle wait between two small writes).
        c.set_nodelay(true).unwrap();
        s.set_nodelay(true).unwrap();
        (c, s)
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    async fn run(use_splice: bool) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // client <-> (a | relay | b) <-> server
        let (mut client, a) = pair(&l).await;
        let (b, mut server) = pair(&l).await;
        let pool = PipePool::new(4);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let big = data(3 * 1024 * 1024 + 17);
        let big2 = big.clone();
        let relay_f = async {
            let r = relay(&a, &b, &pool, use_splice, &up, &down).await;
            drop((a, b)); // as handle_tcp does
            r
        };
        let client_f = async {
            client.write_all(&big2).await.unwrap();
            client.shutdown().await.unwrap(); // half-close: the reply must still come
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        };
        let server_f = async {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&got).await.unwrap();
            server.shutdown().await.unwrap();
            got
        };
        let ((ended, spliced), back, got) = tokio::join!(relay_f, client_f, server_f);
        assert_eq!(ended, Ended::Closed);
        assert_eq!(spliced, use_splice);
        assert!(got == big && back == big);
        assert_eq!(up.load(Relaxed), big.len() as u64);
        assert_eq!(down.load(Relaxed), big.len() as u64);
        assert!(pool.idle() <= 4);
    }

    #[test]
    fn splice_and_copy_both_ways_with_half_close() {
        block_on(run(true));
        block_on(run(false));
    }

    /// Request/response traffic stays on the copy path (no read fills the scratch
    /// buffer), and clearing readiness after short reads never strands a message:
    /// hundreds of small round trips in both directions, each waited for.
    #[test]
    fn small_messages_are_copied_and_never_stranded() {
        block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (mut client, a) = pair(&l).await;
            let (b, mut server) = pair(&l).await;
            let pool = PipePool::new(4);
            let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
            let relay_f = async {
                let r = relay(&a, &b, &pool, true, &up, &down).await;
                drop((a, b));
                r
            };
            let rounds = 400usize;
            let size = |i: usize| 1 + (i * 37) % 1500;
            let client_f = async {
                for i in 0..rounds {
                    let msg = data(size(i));
                    client.write_all(&msg).await.unwrap();
                    let mut back = vec![0u8; msg.len() * 2];
                    client.read_exact(&mut back).await.unwrap();
                    assert_eq!(&back[..msg.len()], &msg[..], "round {i}");
                    assert_eq!(&back[msg.len()..], &msg[..], "round {i}");
                }
                client.shutdown().await.unwrap();
                let mut rest = Vec::new();
                client.read_to_end(&mut rest).await.unwrap();
                rest.len()
            };
            let server_f = async {
                for i in 0..rounds {
                    let mut msg = vec![0u8; size(i)];
                    server.read_exact(&mut msg).await.unwrap();
                    // The answer in two writes: the relay sees two short reads or one.
                    server.write_all(&msg).await.unwrap();
                    server.write_all(&msg).await.unwrap();
                }
                let mut rest = Vec::new();
                server.read_to_end(&mut rest).await.unwrap();
                server.shutdown().await.unwrap();
                rest.len()
            };
            let timeout = std::time::Duration::from_secs(30);
            let all = async { tokio::join!(relay_f, client_f, server_f) };
            let ((ended, spliced), rest_c, rest_s) = tokio::time::timeout(timeout, all)
                .await
                .expect("a message was stranded");
            assert_eq!((ended, spliced), (Ended::Closed, false));
            assert_eq!((rest_c, rest_s), (0, 0));
            let sent: usize = (0..rounds).map(size).sum();
            assert_eq!(up.load(Relaxed), sent as u64);
            assert_eq!(down.load(Relaxed), 2 * sent as u64);
            assert_eq!(pool.idle(), 0, "no pipe was ever taken");
        });
    }

    #[test]
    fn reset_propagates() {
        block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (client, a) = pair(&l).await;
            let (b, mut server) = pair(&l).await;
            let pool = PipePool::new(4);
            let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
            sys::set_linger_zero(client.as_raw_fd());
            drop(client); // RST towards a
            let (ended, _) = relay(&a, &b, &pool, true, &up, &down).await;
            assert_eq!(ended, Ended::Reset);
            drop((a, b));
            let mut buf = [0u8; 8];
            let r = server.read(&mut buf).await;
            assert!(r.is_err(), "server must see a reset, got {r:?}");
        });
    }
}
