//! A generic-netlink socket for the IPVS family. Requests are batched: many messages
//! go out in one `send`, each with NLM_F_ACK, and the acks are matched by sequence
//! number, so a sync costs one round trip per batch instead of one per object, and a
//! failing message does not stop the ones after it (the kernel acks each separately).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::wire::{self, RawMsg};
use super::{Destination, IpvsError, Kernel, Op, ServiceKey, Timeouts, VirtualServer};

/// Messages per send. Each ack is its own skb in the receive queue, so the batch is
/// bounded to stay well inside the receive buffer set below.
const BATCH_MESSAGES: usize = 256;
const BATCH_BYTES: usize = 64 * 1024;
const RCVBUF: libc::c_int = 8 * 1024 * 1024;
const NETLINK_CAP_ACK: libc::c_int = 10;

pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn open() -> Result<Self, IpvsError> {
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(IpvsError::last_os("netlink socket"));
        }
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        let setopt = |level, name, val: &libc::c_int| {
            // SAFETY: val points to a c_int for the duration of the call.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    level,
                    name,
                    val as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        // Root may exceed rmem_max; otherwise take what SO_RCVBUF gives.
        if setopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &RCVBUF) != 0 {
            setopt(libc::SOL_SOCKET, libc::SO_RCVBUF, &RCVBUF);
        }
        setopt(libc::SOL_SOCKET, libc::SO_SNDBUF, &RCVBUF);
        // Error acks carry only the header of the failed request, not its payload.
        setopt(libc::SOL_NETLINK, NETLINK_CAP_ACK, &one);
        let tv = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: tv lives across the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        // SAFETY: zeroed sockaddr_nl is valid (pid 0 = kernel assigns, no groups).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sa is a valid sockaddr_nl of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(IpvsError::last_os("netlink bind"));
        }
        Ok(Netlink {
            fd,
            seq: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as u32)
                .unwrap_or(1),
            buf: vec![0u8; 1 << 20],
        })
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    pub fn send(&self, data: &[u8]) -> Result<(), IpvsError> {
        // SAFETY: zeroed sockaddr_nl addresses the kernel (pid 0).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: data and sa are valid for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                data.as_ptr() as *const libc::c_void,
                data.len(),
                0,
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(IpvsError::last_os("netlink send"));
        }
        Ok(())
    }

    /// Receive one datagram (possibly several messages) and hand each to `f`.
    pub fn recv<F>(&mut self, mut f: F) -> Result<(), IpvsError>
    where
        F: FnMut(&RawMsg<'_>) -> Result<(), IpvsError>,
    {
        loop {
            // SAFETY: buf is a valid writable buffer of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr() as *mut libc::c_void,
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(IpvsError::os(
                    "netlink receive",
                    err.raw_os_error().unwrap_or(0),
                ));
            }
            let data = &self.buf[..n as usize];
            for m in wire::split_msgs(data)? {
                f(&m)?;
            }
            return Ok(());
        }
    }

    /// Send one request and collect the payloads of its reply (a dump or a single
    /// answer); an NLMSG_ERROR with an errno becomes an error naming `context`.
    pub fn request(
        &mut self,
        req: &[u8],
        seq: u32,
        context: &str,
    ) -> Result<Vec<Vec<u8>>, IpvsError> {
        self.send(req)?;
        let mut out = Vec::new();
        let mut done = false;
        while !done {
            self.recv(|m| {
                if m.seq != seq {
                    return Ok(()); // a stale reply of an earlier, abandoned request
                }
                match m.msg_type {
                    wire::NLMSG_DONE => done = true,
                    wire::NLMSG_ERROR => {
                        let errno = wire::error_code(m.payload)?;
                        if errno != 0 {
                            return Err(IpvsError::os(context, errno));
                        }
                        done = true;
                    }
                    _ => {
                        out.push(m.payload.to_vec());
                        if m.flags & wire::NLM_F_MULTI == 0 {
                            done = true;
                        }
                    }
                }
                Ok(())
            })?;
        }
        Ok(out)
    }
}

/// A socket bound to the kernel's "IPVS" generic-netlink family.
pub struct IpvsSocket {
    nl: Netlink,
    family: u16,
}

impl IpvsSocket {
    /// Resolve the IPVS family; ENOENT when the kernel has no IPVS (module not loaded).
    pub fn open() -> Result<Self, IpvsError> {
        let mut nl = Netlink::open()?;
        let seq = nl.next_seq();
        let req = wire::encode_get_family(seq, wire::IPVS_GENL_NAME);
        let replies = nl.request(&req, seq, "resolve generic netlink family IPVS")?;
        let family = replies
            .iter()
            .find_map(|p| wire::decode_family_id(p))
            .ok_or_else(|| IpvsError::Protocol("no family id in CTRL reply".into()))?;
        Ok(IpvsSocket { nl, family })
    }

    pub fn family_id(&self) -> u16 {
        self.family
    }

    pub fn timeouts(&mut self) -> Result<Timeouts, IpvsError> {
        let seq = self.nl.next_seq();
        let req = wire::encode_get_config(self.family, seq);
        let replies = self.nl.request(&req, seq, "get IPVS timeouts")?;
        for p in replies {
            if let Some(t) = wire::decode_ipvs(&p)?.timeouts {
                return Ok(t);
            }
        }
        Err(IpvsError::Protocol(
            "no timeouts in GET_CONFIG reply".into(),
        ))
    }
}

impl Kernel for IpvsSocket {
    fn services(&mut self) -> Result<Vec<VirtualServer>, IpvsError> {
        let seq = self.nl.next_seq();
        let req = wire::encode_dump_services(self.family, seq);
        let replies = self.nl.request(&req, seq, "dump IPVS services")?;
        let mut out = Vec::with_capacity(replies.len());
        for p in replies {
            if let Some(vs) = wire::decode_ipvs(&p)?.service {
                out.push(vs);
            }
        }
        Ok(out)
    }

    fn destinations(&mut self, key: &ServiceKey) -> Result<Vec<Destination>, IpvsError> {
        let seq = self.nl.next_seq();
        let req = wire::encode_dump_dests(self.family, seq, key);
        let replies = self
            .nl
            .request(&req, seq, &format!("dump real servers of {key}"))?;
        let af = wire::af_of(&key.addr);
        let mut out = Vec::with_capacity(replies.len());
        for p in replies {
            if p.len() < wire::GENL_HDRLEN {
                continue;
            }
            for (k, v) in wire::attrs(&p[wire::GENL_HDRLEN..]) {
                if k == wire::IPVS_CMD_ATTR_DEST {
                    out.push(wire::decode_dest_nest(v, af));
                }
            }
        }
        Ok(out)
    }

    fn apply(&mut self, ops: &[Op]) -> Result<Vec<(usize, i32)>, IpvsError> {
        let mut failures = Vec::new();
        let mut start = 0;
        while start < ops.len() {
            let mut buf = Vec::with_capacity(BATCH_BYTES + 1024);
            let first_seq = self.nl.seq.wrapping_add(1);
            let mut end = start;
            while end < ops.len() && end - start < BATCH_MESSAGES && buf.len() < BATCH_BYTES {
                let seq = self.nl.next_seq();
                buf = wire::encode_op(buf, self.family, seq, &ops[end]);
                end += 1;
            }
            self.nl.send(&buf)?;
            let mut pending = end - start;
            while pending > 0 {
                self.nl.recv(|m| {
                    if m.msg_type != wire::NLMSG_ERROR {
                        return Ok(());
                    }
                    let idx = m.seq.wrapping_sub(first_seq) as usize;
                    if idx >= end - start {
                        return Ok(()); // not one of this batch
                    }
                    let errno = wire::error_code(m.payload)?;
                    if errno != 0 {
                        failures.push((start + idx, errno));
                    }
                    pending -= 1;
                    Ok(())
                })?;
            }
            start = end;
        }
        Ok(failures)
    }
}
