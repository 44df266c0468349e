//! Loopback ports for local clusters (the demo, the tests).
//!
//! A port taken with `bind(":0")` comes from the kernel's ephemeral range,
//! the same range the kernel draws from for the local side of every outgoing
//! connection. When the process listening on it is killed and restarted, any
//! connection opened in between may have taken the port, and the restart
//! fails with "Address already in use". Ports chosen here lie below the
//! ephemeral range, where the kernel never assigns on its own, and are never
//! handed out twice by one process.

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Lowest port considered (above the well-known and most registered ones).
const FLOOR: u16 = 10_000;

/// Ports this process has handed out already.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// `n` distinct loopback ports, free right now, outside the ephemeral range.
/// They are held together while they are chosen, then released.
pub fn loopback_ports(n: usize) -> io::Result<Vec<u16>> {
    let (low, high) = candidate_range();
    let span = u32::from(high - low);
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    let mut held = Vec::with_capacity(n);
    let mut next = seed() % span;
    for _ in 0..span {
        if held.len() == n {
            break;
        }
        // A stride coprime with most spans spreads concurrent processes apart.
        next = (next + 7_919) % span;
        #[allow(clippy::cast_possible_truncation)] // next < span, a u16 difference
        let port = low + next as u16;
        if handed.contains(&port) {
            continue;
        }
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            held.push((port, listener));
        }
    }
    if held.len() < n {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!(
                "only {} of {n} free loopback ports in {low}..{high}",
                held.len()
            ),
        ));
    }
    let ports: Vec<u16> = held.iter().map(|(p, _)| *p).collect();
    handed.extend(&ports);
    Ok(ports)
}

/// One loopback port, as [`loopback_ports`].
pub fn loopback_port() -> io::Result<u16> {
    Ok(loopback_ports(1)?[0])
}

/// `[FLOOR, start of the ephemeral range)`, or a range just above it when the
/// ephemeral range starts too low to leave room.
fn candidate_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > FLOOR + 2_000 {
        (FLOOR, ephemeral_low)
    } else {
        (2_000, FLOOR)
    }
}

fn seed() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id().wrapping_mul(2_654_435_761)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let (_, high) = candidate_range();
        let a = loopback_ports(20).unwrap();
        let b = loopback_ports(20).unwrap();
        let all: HashSet<u16> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), 40, "no port handed out twice");
        for p in all {
            assert!(p < high, "port {p} is inside the ephemeral range");
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).expect("port is free");
        }
    }
}
