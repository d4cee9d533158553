//! Address helpers: strict IP parsing (no leading zeros, as the API server validates)
//! and CIDRs.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[serde(alias = "IPv4", alias = "ipv4")]
    V4,
    #[serde(alias = "IPv6", alias = "ipv6")]
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Parse an IP address strictly. Rust's parser already rejects IPv4 octets with
/// leading zeros ("010.0.0.1"), which upstream's sloppy parser would read as decimal
/// and which the API server no longer admits, so such an address is an error here.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let s = s.trim();
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = parse_ip(a)?;
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = match p {
            Some(p) => {
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                p.parse::<u8>().ok()?
            }
            None => max,
        };
        if prefix > max {
            return None;
        }
        Some(Cidr { addr, prefix }.masked())
    }

    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    fn masked(self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix as u32)
                };
                IpAddr::V4((bits & mask).into())
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix as u32)
                };
                IpAddr::V6((bits & mask).into())
            }
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Cidr {
                    addr: *ip,
                    prefix: self.prefix,
                }
                .masked()
                .addr
                    == self.addr
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parse a config list of IPs and keep those of `family`; an invalid entry is an
/// error naming `field`.
pub fn ips_of_family(list: &[String], family: Family, field: &str) -> crate::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for s in list {
        let ip =
            parse_ip(s).ok_or_else(|| crate::Error::config(field, format!("invalid IP {s:?}")))?;
        if Family::of(&ip) == family {
            out.push(ip);
        }
    }
    Ok(out)
}

/// "ip:port" as Go's net.JoinHostPort writes it (IPv6 in brackets).
pub fn join_host_port(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zero_rejected() {
        assert!(parse_ip("010.0.0.1").is_none());
        assert!(parse_ip("10.0.0.1").is_some());
    }

    #[test]
    fn cidr_contains() {
        let c = Cidr::parse("10.244.0.0/16").unwrap();
        assert!(c.contains(&"10.244.3.4".parse().unwrap()));
        assert!(!c.contains(&"10.245.0.1".parse().unwrap()));
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("::/0")
            .unwrap()
            .contains(&"::1".parse().unwrap()));
    }

    #[test]
    fn host_port() {
        assert_eq!(join_host_port(&"::1".parse().unwrap(), 80), "[::1]:80");
    }
}
