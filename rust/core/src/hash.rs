//! Fixed hashes: upstream's chain-name hash (sha256 + base32) and FNV-1a for
//! in-memory change detection. Never Rust's DefaultHasher, whose output may differ
//! between toolchains.

use sha2::{Digest, Sha256};

const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// Standard base32 (RFC 4648) without padding, enough for the first 16 characters.
fn base32(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len() * 8 / 5 + 1);
    let mut buf: u64 = 0;
    let mut bits = 0u32;
    for &b in data {
        buf = (buf << 8) | b as u64;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(B32[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(B32[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The first 16 base32 characters of sha256(input), as upstream's portProtoHash.
pub fn chain_hash(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    base32(&digest)[..16].to_string()
}

/// FNV-1a, 64 bit.
pub fn fnv1a(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

pub const FNV_OFFSET: u64 = 0xcbf29ce484222325;

pub fn hash_lines(lines: &[String]) -> u64 {
    let mut h = FNV_OFFSET;
    for l in lines {
        h = fnv1a(l.as_bytes(), h);
        h = fnv1a(b"\n", h);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
    }

    #[test]
    fn upstream_chain_name() {
        // From upstream's iptables proxier tests: ns1/svc1:p80 tcp -> KUBE-SVC-XPGD46QRK7WJZT7O
        assert_eq!(chain_hash("ns1/svc1:p80tcp"), "XPGD46QRK7WJZT7O");
    }
}
