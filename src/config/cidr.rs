//! IP networks (`10.1.0.0/16`, `fd12::/16`) as `fetch.allowed_cidrs` gives
//! them, and the prefix arithmetic the fetch guard's ranges share; a leaf.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP network, `10.1.0.0/16` or `fd12::/16` (a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u32,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => in_v4(ip, net.octets(), self.len),
            (IpAddr::V6(net), IpAddr::V6(ip)) => in_v6(ip, net, self.len),
            _ => false,
        }
    }
}

/// Why a string is not an IP network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadCidr {
    #[error("{0:?} is not an IP network like \"10.1.0.0/16\"")]
    NotANetwork(String),
    #[error("{network:?}: the prefix length must be 0 to {max}")]
    PrefixLength { network: String, max: u32 },
}

impl FromStr for Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Self, BadCidr> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| BadCidr::NotANetwork(s.to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => match l.parse::<u32>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(BadCidr::PrefixLength {
                        network: s.to_string(),
                        max,
                    })
                }
            },
        };
        Ok(Cidr { addr, len })
    }
}

/// Whether `ip` is in the IPv4 network `net/len`.
pub fn in_v4(ip: Ipv4Addr, net: [u8; 4], len: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

/// Whether `ip` is in the IPv6 network `net/len`.
pub fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, len: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_bad_ones_are_refused() {
        let c: Cidr = "192.168.0.0/16".parse().unwrap();
        assert!(c.contains(ip("192.168.4.4")));
        assert!(!c.contains(ip("192.169.0.1")));
        assert!(!c.contains(ip("::1")));
        let host: Cidr = "10.0.0.5".parse().unwrap();
        assert!(host.contains(ip("10.0.0.5")) && !host.contains(ip("10.0.0.6")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("1.2.3.4")));
        let v6: Cidr = "[fd00::]/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "nope",
            "10.0.0/8",
            "10.0.0.0/x",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
