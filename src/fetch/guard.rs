//! The address policy: which URLs may be fetched and which IP addresses a
//! fetch may connect to.
//!
//! Owns the classification of addresses into refused ranges ([`Rule`]), the
//! exceptions the configuration grants ([`AddressPolicy`]: loopback, private
//! ranges, explicit CIDRs), the host allowlist ([`HostAllowlist`]) and the
//! turning of a URL's host into what must be resolved ([`Target`], through
//! the `url` crate's WHATWG parser, so `127.1`, `2130706433`, `0x7f000001`
//! and `0177.0.0.1` are the IPv4 address a browser or libc would reach). Pure
//! functions: no sockets, no resolver.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use crate::config::cidr::Cidr;
use crate::config::cidr::{in_v4, in_v6};

/// A refused range, and the reason given for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Unspecified,
    Loopback,
    Private,
    SharedAddressSpace,
    LinkLocal,
    CloudMetadata,
    UniqueLocal,
    Multicast,
    Broadcast,
    Documentation,
    Benchmarking,
    Reserved,
}

impl Rule {
    /// A short name (metrics, tests).
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Unspecified => "unspecified",
            Rule::Loopback => "loopback",
            Rule::Private => "private",
            Rule::SharedAddressSpace => "shared_address_space",
            Rule::LinkLocal => "link_local",
            Rule::CloudMetadata => "cloud_metadata",
            Rule::UniqueLocal => "unique_local",
            Rule::Multicast => "multicast",
            Rule::Broadcast => "broadcast",
            Rule::Documentation => "documentation",
            Rule::Benchmarking => "benchmarking",
            Rule::Reserved => "reserved",
        }
    }

    /// The ranges the rule covers, for messages.
    pub fn ranges(self) -> &'static str {
        match self {
            Rule::Unspecified => "0.0.0.0/8, ::",
            Rule::Loopback => "127.0.0.0/8, ::1",
            Rule::Private => "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 64:ff9b:1::/48, fec0::/10",
            Rule::SharedAddressSpace => "100.64.0.0/10",
            Rule::LinkLocal => "169.254.0.0/16, fe80::/10",
            Rule::CloudMetadata => "169.254.169.254, 169.254.170.2, 100.100.100.200, fd00:ec2::254",
            Rule::UniqueLocal => "fc00::/7",
            Rule::Multicast => "224.0.0.0/4, ff00::/8",
            Rule::Broadcast => "255.255.255.255",
            Rule::Documentation => {
                "192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32, 3fff::/20"
            }
            Rule::Benchmarking => "198.18.0.0/15, 2001:2::/48",
            Rule::Reserved => {
                "192.0.0.0/24, 192.88.99.0/24, 240.0.0.0/4, 100::/64, 2001::/32 (Teredo), \
                 2001:10::/28, 5f00::/16"
            }
        }
    }

    /// How the configuration can allow the rule's addresses.
    fn allowed_by(self) -> &'static str {
        match self {
            Rule::Loopback => "fetch.allow_loopback or fetch.allowed_cidrs",
            Rule::Private | Rule::SharedAddressSpace | Rule::UniqueLocal => {
                "fetch.allow_private or fetch.allowed_cidrs"
            }
            _ => "fetch.allowed_cidrs",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The IPv4 address an IPv6 address stands for, when it embeds one that
/// the connection reaches: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`, deprecated), NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`).
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..5] == [0; 5] && s[5] == 0xffff {
        return Some(tail);
    }
    // `::` and `::1` are their own (unspecified, loopback), not 0.0.0.0/0.0.0.1.
    if s[..6] == [0; 6] && ip != Ipv6Addr::UNSPECIFIED && ip != Ipv6Addr::LOCALHOST {
        return Some(tail);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

fn classify_v4(ip: Ipv4Addr) -> Option<Rule> {
    // Exact addresses first: they lie inside wider ranges.
    const METADATA: [[u8; 4]; 3] = [
        [169, 254, 169, 254],
        [169, 254, 170, 2],
        [100, 100, 100, 200],
    ];
    if METADATA.contains(&ip.octets()) {
        return Some(Rule::CloudMetadata);
    }
    if ip == Ipv4Addr::BROADCAST {
        return Some(Rule::Broadcast);
    }
    const RANGES: &[([u8; 4], u32, Rule)] = &[
        ([0, 0, 0, 0], 8, Rule::Unspecified),
        ([10, 0, 0, 0], 8, Rule::Private),
        ([100, 64, 0, 0], 10, Rule::SharedAddressSpace),
        ([127, 0, 0, 0], 8, Rule::Loopback),
        ([169, 254, 0, 0], 16, Rule::LinkLocal),
        ([172, 16, 0, 0], 12, Rule::Private),
        ([192, 0, 0, 0], 24, Rule::Reserved),
        ([192, 0, 2, 0], 24, Rule::Documentation),
        ([192, 88, 99, 0], 24, Rule::Reserved),
        ([192, 168, 0, 0], 16, Rule::Private),
        ([198, 18, 0, 0], 15, Rule::Benchmarking),
        ([198, 51, 100, 0], 24, Rule::Documentation),
        ([203, 0, 113, 0], 24, Rule::Documentation),
        ([224, 0, 0, 0], 4, Rule::Multicast),
        ([240, 0, 0, 0], 4, Rule::Reserved),
    ];
    RANGES
        .iter()
        .find(|(net, len, _)| in_v4(ip, *net, *len))
        .map(|r| r.2)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Rule> {
    if let Some(v4) = embedded_ipv4(ip) {
        return classify_v4(v4);
    }
    if ip == Ipv6Addr::UNSPECIFIED {
        return Some(Rule::Unspecified);
    }
    if ip == Ipv6Addr::LOCALHOST {
        return Some(Rule::Loopback);
    }
    let metadata = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    if ip == metadata {
        return Some(Rule::CloudMetadata);
    }
    let v6 = |a: u16, b: u16, c: u16| Ipv6Addr::new(a, b, c, 0, 0, 0, 0, 0);
    let ranges: [(Ipv6Addr, u32, Rule); 14] = [
        (v6(0x64, 0xff9b, 1), 48, Rule::Private),
        (v6(0x100, 0, 0), 64, Rule::Reserved),
        (v6(0x2001, 0x2, 0), 48, Rule::Benchmarking),
        (v6(0x2001, 0x10, 0), 28, Rule::Reserved),
        (v6(0x2001, 0xdb8, 0), 32, Rule::Documentation),
        // Teredo: the IPv4 inside is obfuscated and the relay is anyone's.
        (v6(0x2001, 0, 0), 32, Rule::Reserved),
        (v6(0x3fff, 0, 0), 20, Rule::Documentation),
        (v6(0x5f00, 0, 0), 16, Rule::Reserved),
        (v6(0xfc00, 0, 0), 7, Rule::UniqueLocal),
        (v6(0xfe80, 0, 0), 10, Rule::LinkLocal),
        (v6(0xfec0, 0, 0), 10, Rule::Private),
        (v6(0xff00, 0, 0), 8, Rule::Multicast),
        // The rest of ::/8 (mapped and compatible forms are handled above).
        (v6(0, 0, 0), 8, Rule::Reserved),
        // Anything outside 2000::/3 (global unicast) is not yet allocated.
        (v6(0x4000, 0, 0), 2, Rule::Reserved),
    ];
    if let Some(r) = ranges.iter().find(|(net, len, _)| in_v6(ip, *net, *len)) {
        return Some(r.2);
    }
    if !in_v6(ip, v6(0x2000, 0, 0), 3) {
        return Some(Rule::Reserved);
    }
    None
}

/// The refused range `ip` falls in, or `None` for a public address.
pub fn classify(ip: IpAddr) -> Option<Rule> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// The address a connection to `ip` reaches: the IPv4 inside an
/// IPv4-mapped or -compatible IPv6 address, else `ip`. NAT64 and 6to4
/// addresses stay IPv6 (a gateway translates them).
pub fn connect_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if s[..6] == [0; 6] || (s[..5] == [0; 5] && s[5] == 0xffff) {
                match embedded_ipv4(v6) {
                    Some(v4) => IpAddr::V4(v4),
                    None => ip,
                }
            } else {
                ip
            }
        }
        v4 => v4,
    }
}

/// Why an address may not be connected to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address {addr} is {} ({}); allow it with {}", rule.as_str().replace('_', " "), rule.ranges(), rule.allowed_by())]
pub struct Refused {
    pub addr: IpAddr,
    pub rule: Rule,
}

/// Which addresses fetches may connect to: public ones, plus what the
/// configuration allows.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// `fetch.allow_loopback`.
    pub allow_loopback: bool,
    /// `fetch.allow_private`: private, shared (CGNAT) and unique-local.
    pub allow_private: bool,
    /// `fetch.allowed_cidrs`: any address inside one is allowed.
    pub allowed: Vec<Cidr>,
}

impl AddressPolicy {
    /// Checks one address (of a numeric host or a resolver's answer).
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        let reached = match ip {
            IpAddr::V6(v6) => embedded_ipv4(v6).map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self
            .allowed
            .iter()
            .any(|c| c.contains(ip) || c.contains(reached))
        {
            return Ok(());
        }
        let Some(rule) = classify(ip) else {
            return Ok(());
        };
        let allowed = match rule {
            Rule::Loopback => self.allow_loopback,
            Rule::Private | Rule::SharedAddressSpace | Rule::UniqueLocal => self.allow_private,
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(Refused { addr: ip, rule })
        }
    }
}

/// `fetch.allowed_hosts`: empty allows every host; else a host must equal an
/// entry, or end with an entry written `*.example.com` (subdomains only) or
/// `.example.com` (the domain and its subdomains). IP literals are written
/// as the URL shows them (`127.0.0.1`, `[::1]`).
#[derive(Debug, Clone, Default)]
pub struct HostAllowlist(Vec<String>);

impl HostAllowlist {
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Self {
        HostAllowlist(
            entries
                .iter()
                .map(|e| normalise_name(e.as_ref().trim()))
                .filter(|e| !e.is_empty())
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `host` (as [`url::Url::host_str`] gives it) may be fetched.
    pub fn allows(&self, host: &str) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let host = normalise_name(host);
        self.0.iter().any(|e| {
            if let Some(domain) = e.strip_prefix("*.") {
                host.len() > domain.len() && host.ends_with(&format!(".{domain}"))
            } else if let Some(domain) = e.strip_prefix('.') {
                host == domain || host.ends_with(e.as_str())
            } else {
                host == *e
            }
        })
    }
}

fn normalise_name(s: &str) -> String {
    s.trim_end_matches('.').to_ascii_lowercase()
}

/// What a URL's host asks to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A numeric host, already the address (never handed to a resolver).
    Ip(IpAddr),
    /// `localhost` and `*.localhost` (RFC 6761): loopback, without asking
    /// a resolver.
    Localhost,
    /// A name for the resolver.
    Name(String),
}

/// Why a URL is not fetched before any address is looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    #[error("not a valid URL ({0})")]
    Invalid(#[source] url::ParseError),
    #[error("the scheme {0:?} is not fetched; only http and https are")]
    Scheme(String),
    #[error("the URL has no host")]
    NoHost,
    #[error("URLs with credentials (user:password@) are not fetched")]
    Credentials,
    #[error("the host {0} is not in fetch.allowed_hosts")]
    NotAllowed(String),
}

/// Parses a URL as a browser would and checks what can be checked without
/// addresses: scheme, credentials, host allowlist.
pub fn parse_url(s: &str, hosts: &HostAllowlist) -> Result<url::Url, UrlRefused> {
    let url = url::Url::parse(s.trim()).map_err(UrlRefused::Invalid)?;
    check_url(&url, hosts)?;
    Ok(url)
}

/// The checks of [`parse_url`] on a parsed URL (redirect targets).
pub fn check_url(url: &url::Url, hosts: &HostAllowlist) -> Result<(), UrlRefused> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlRefused::Scheme(super::shorten(url.scheme())));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlRefused::Credentials);
    }
    let host = url.host_str().ok_or(UrlRefused::NoHost)?;
    if host.is_empty() {
        return Err(UrlRefused::NoHost);
    }
    if !hosts.allows(host) {
        return Err(UrlRefused::NotAllowed(super::shorten(host)));
    }
    Ok(())
}

/// What the host of an http(s) URL asks to connect to.
pub fn target(url: &url::Url) -> Result<Target, UrlRefused> {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => Ok(Target::Ip(IpAddr::V4(ip))),
        Some(url::Host::Ipv6(ip)) => Ok(Target::Ip(IpAddr::V6(ip))),
        Some(url::Host::Domain(name)) => {
            let name = normalise_name(name);
            if name.is_empty() {
                return Err(UrlRefused::NoHost);
            }
            // A name the URL parser left as a name is never numeric (WHATWG
            // turns names ending in a number into IPv4 or fails), but a
            // resolver must never see a numeric string: check anyway.
            if let Ok(ip) = name.parse::<IpAddr>() {
                return Ok(Target::Ip(ip));
            }
            if name == "localhost" || name.ends_with(".localhost") {
                return Ok(Target::Localhost);
            }
            Ok(Target::Name(name))
        }
        None => Err(UrlRefused::NoHost),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule(s: &str) -> Option<Rule> {
        classify(ip(s))
    }

    #[test]
    fn ipv4_ranges_are_classified() {
        let cases = [
            ("0.0.0.0", Some(Rule::Unspecified)),
            ("0.1.2.3", Some(Rule::Unspecified)),
            ("127.0.0.1", Some(Rule::Loopback)),
            ("127.255.255.254", Some(Rule::Loopback)),
            ("10.0.0.1", Some(Rule::Private)),
            ("172.16.0.1", Some(Rule::Private)),
            ("172.31.255.255", Some(Rule::Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(Rule::Private)),
            ("100.64.0.1", Some(Rule::SharedAddressSpace)),
            ("100.127.255.255", Some(Rule::SharedAddressSpace)),
            ("100.128.0.1", None),
            ("169.254.1.1", Some(Rule::LinkLocal)),
            ("169.254.169.254", Some(Rule::CloudMetadata)),
            ("169.254.170.2", Some(Rule::CloudMetadata)),
            ("100.100.100.200", Some(Rule::CloudMetadata)),
            ("224.0.0.1", Some(Rule::Multicast)),
            ("239.255.255.250", Some(Rule::Multicast)),
            ("255.255.255.255", Some(Rule::Broadcast)),
            ("240.0.0.1", Some(Rule::Reserved)),
            ("192.0.0.170", Some(Rule::Reserved)),
            ("192.0.2.1", Some(Rule::Documentation)),
            ("198.51.100.7", Some(Rule::Documentation)),
            ("203.0.113.9", Some(Rule::Documentation)),
            ("198.18.0.1", Some(Rule::Benchmarking)),
            ("198.19.255.255", Some(Rule::Benchmarking)),
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("93.184.216.34", None),
        ];
        for (addr, want) in cases {
            assert_eq!(rule(addr), want, "{addr}");
        }
    }

    #[test]
    fn ipv6_ranges_and_embedded_ipv4_are_classified() {
        let cases = [
            ("::", Some(Rule::Unspecified)),
            ("::1", Some(Rule::Loopback)),
            ("fe80::1", Some(Rule::LinkLocal)),
            ("febf::1", Some(Rule::LinkLocal)),
            ("fc00::1", Some(Rule::UniqueLocal)),
            ("fd12:3456::1", Some(Rule::UniqueLocal)),
            ("fd00:ec2::254", Some(Rule::CloudMetadata)),
            ("ff02::1", Some(Rule::Multicast)),
            ("2001:db8::1", Some(Rule::Documentation)),
            ("2001::1", Some(Rule::Reserved)),
            ("fec0::1", Some(Rule::Private)),
            // IPv4-mapped and -compatible: the IPv4 inside decides.
            ("::ffff:127.0.0.1", Some(Rule::Loopback)),
            ("::ffff:7f00:1", Some(Rule::Loopback)),
            ("::ffff:10.0.0.1", Some(Rule::Private)),
            ("::ffff:169.254.169.254", Some(Rule::CloudMetadata)),
            ("::ffff:0.0.0.0", Some(Rule::Unspecified)),
            ("::127.0.0.1", Some(Rule::Loopback)),
            ("::10.1.2.3", Some(Rule::Private)),
            ("::ffff:8.8.8.8", None),
            // NAT64 and 6to4 likewise.
            ("64:ff9b::127.0.0.1", Some(Rule::Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(Rule::CloudMetadata)),
            ("64:ff9b::192.168.0.1", Some(Rule::Private)),
            ("64:ff9b::8.8.8.8", None),
            ("64:ff9b:1::1", Some(Rule::Private)),
            ("2002:7f00:1::1", Some(Rule::Loopback)),
            ("2002:a00:1::", Some(Rule::Private)),
            ("2002:808:808::1", None),
            ("2606:4700:4700::1111", None),
            ("2a00:1450:4001::200e", None),
            ("4000::1", Some(Rule::Reserved)),
        ];
        for (addr, want) in cases {
            assert_eq!(rule(addr), want, "{addr}");
        }
    }

    #[test]
    fn mapped_addresses_connect_to_the_ipv4_inside() {
        assert_eq!(connect_address(ip("::ffff:127.0.0.1")), ip("127.0.0.1"));
        assert_eq!(connect_address(ip("::1")), ip("::1"));
        assert_eq!(
            connect_address(ip("64:ff9b::808:808")),
            ip("64:ff9b::808:808")
        );
        assert_eq!(connect_address(ip("10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn the_policy_refuses_by_default_and_allows_what_the_config_says() {
        let strict = AddressPolicy::default();
        for a in [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "10.0.0.1",
            "169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
            "fe80::1",
            "0.0.0.0",
            "::",
        ] {
            let e = strict.check(ip(a)).unwrap_err();
            assert_eq!(e.addr, ip(a));
        }
        assert!(strict.check(ip("8.8.8.8")).is_ok());
        let msg = strict.check(ip("10.0.0.1")).unwrap_err().to_string();
        assert!(
            msg.contains("10.0.0.1 is private") && msg.contains("fetch.allow_private"),
            "{msg}"
        );

        let loopback = AddressPolicy {
            allow_loopback: true,
            ..Default::default()
        };
        assert!(loopback.check(ip("127.0.0.1")).is_ok());
        assert!(loopback.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(loopback.check(ip("::1")).is_ok());
        assert_eq!(
            loopback.check(ip("10.0.0.1")).unwrap_err().rule,
            Rule::Private
        );
        assert_eq!(
            loopback.check(ip("169.254.169.254")).unwrap_err().rule,
            Rule::CloudMetadata
        );

        let private = AddressPolicy {
            allow_private: true,
            ..Default::default()
        };
        for a in ["10.0.0.1", "192.168.1.1", "100.64.0.1", "fd12::1"] {
            assert!(private.check(ip(a)).is_ok(), "{a}");
        }
        // Metadata and link-local need an explicit CIDR.
        for a in ["169.254.169.254", "fe80::1", "fd00:ec2::254", "127.0.0.1"] {
            assert!(private.check(ip(a)).is_err(), "{a}");
        }

        let cidr = AddressPolicy {
            allowed: vec!["10.1.0.0/16".parse().unwrap(), "fe80::/64".parse().unwrap()],
            ..Default::default()
        };
        assert!(cidr.check(ip("10.1.2.3")).is_ok());
        assert!(cidr.check(ip("::ffff:10.1.2.3")).is_ok());
        assert!(cidr.check(ip("10.2.0.1")).is_err());
        assert!(cidr.check(ip("fe80::1")).is_ok());
    }

    /// Every spelling of loopback a URL parser or libc accepts reaches the
    /// address check as loopback (or unspecified), never as a name.
    #[test]
    fn numeric_host_spellings_are_normalised_before_the_check() {
        let hosts = HostAllowlist::default();
        let strict = AddressPolicy::default();
        let cases = [
            ("http://127.0.0.1/", Rule::Loopback),
            ("http://127.1/", Rule::Loopback),
            ("http://127.0.1/", Rule::Loopback),
            ("http://2130706433/", Rule::Loopback),
            ("http://0x7f000001/", Rule::Loopback),
            ("http://0x7f.0.0.1/", Rule::Loopback),
            ("http://0177.0.0.1/", Rule::Loopback),
            ("http://017700000001/", Rule::Loopback),
            ("http://127.0.0.1./", Rule::Loopback),
            ("http://[::1]/", Rule::Loopback),
            ("http://[0:0:0:0:0:0:0:1]/", Rule::Loopback),
            ("http://[::ffff:127.0.0.1]/", Rule::Loopback),
            ("http://[::ffff:7f00:1]/", Rule::Loopback),
            ("http://[64:ff9b::7f00:1]/", Rule::Loopback),
            ("http://0.0.0.0/", Rule::Unspecified),
            ("http://0/", Rule::Unspecified),
            ("http://[::]/", Rule::Unspecified),
            (
                "http://169.254.169.254/latest/meta-data/",
                Rule::CloudMetadata,
            ),
            ("http://0xa9fea9fe/", Rule::CloudMetadata),
            ("http://2852039166/", Rule::CloudMetadata),
            ("http://[::ffff:a9fe:a9fe]/", Rule::CloudMetadata),
            ("http://[fd00:ec2::254]/", Rule::CloudMetadata),
            ("http://100.100.100.200/", Rule::CloudMetadata),
            ("http://10.1/", Rule::Private),
            ("http://[fe80::1]/", Rule::LinkLocal),
            ("HTTP://127.000.000.001:8080/x", Rule::Loopback),
        ];
        for (u, want) in cases {
            let url = parse_url(u, &hosts).unwrap_or_else(|e| panic!("{u}: {e}"));
            let Target::Ip(addr) = target(&url).unwrap() else {
                panic!("{u}: not parsed as an address: {url}");
            };
            assert_eq!(strict.check(addr).unwrap_err().rule, want, "{u}");
        }
        for u in [
            "http://localhost/",
            "http://LOCALHOST./",
            "http://img.localhost:9/",
        ] {
            let url = parse_url(u, &hosts).unwrap();
            assert_eq!(target(&url).unwrap(), Target::Localhost, "{u}");
        }
        let url = parse_url("https://Images.Example.COM./a.png", &hosts).unwrap();
        assert_eq!(
            target(&url).unwrap(),
            Target::Name("images.example.com".into())
        );
    }

    #[test]
    fn schemes_credentials_and_the_allowlist_are_checked() {
        let any = HostAllowlist::default();
        for u in [
            "file:///etc/passwd",
            "ftp://example.com/a.png",
            "gopher://example.com:70/_x",
            "data:image/png;base64,AAAA",
            "javascript:alert(1)",
        ] {
            assert!(
                matches!(parse_url(u, &any), Err(UrlRefused::Scheme(_))),
                "{u}"
            );
        }
        assert_eq!(
            parse_url("http://user:pw@example.com/", &any),
            Err(UrlRefused::Credentials)
        );
        assert!(matches!(
            parse_url("not a url", &any),
            Err(UrlRefused::Invalid(_))
        ));
        assert!(parse_url("http://1.2.3.4.5/", &any).is_err());

        let list = HostAllowlist::new(&[
            "img.example.com",
            "*.cdn.example.net",
            ".pics.org",
            "127.0.0.1",
        ]);
        assert!(list.allows("img.example.com"));
        assert!(list.allows("IMG.example.com."));
        assert!(!list.allows("evil.img.example.com"));
        assert!(!list.allows("example.com"));
        assert!(list.allows("a.cdn.example.net"));
        assert!(!list.allows("cdn.example.net"));
        assert!(!list.allows("evilcdn.example.net"));
        assert!(list.allows("pics.org") && list.allows("a.b.pics.org"));
        assert!(!list.allows("xpics.org"));
        assert!(list.allows("127.0.0.1"));
        assert!(matches!(
            parse_url("http://other.example.com/x", &list),
            Err(UrlRefused::NotAllowed(_))
        ));
        // The allowlist sees the normalised host: 127.1 is 127.0.0.1.
        assert!(parse_url("http://127.1/", &list).is_ok());
    }
}
