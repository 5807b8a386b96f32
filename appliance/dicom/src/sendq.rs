//! How many bytes written to a TCP connection its peer has not yet
//! acknowledged (unsent + in flight: what `SIOCOUTQ` reports), so a wait
//! can tell a slow link that still drains from a peer that went silent.
//!
//! Read from `/proc/self/net/tcp` and `tcp6` (the `tx_queue` column, the
//! kernel's `write_seq - snd_una`) rather than by ioctl: the crate forbids
//! unsafe code. `/proc/self/net` stays visible under the service's
//! `ProcSubset=pid`. A lookup is one small file read; callers poll once a
//! second, only while they wait.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The connection's unacknowledged bytes, or `None` when it cannot be
/// told (no procfs, connection not listed): callers then fall back to a
/// plain timeout.
pub fn unacknowledged(local: SocketAddr, peer: SocketAddr) -> Option<u64> {
    let table = match local {
        SocketAddr::V4(_) => "/proc/self/net/tcp",
        SocketAddr::V6(_) => "/proc/self/net/tcp6",
    };
    let text = std::fs::read_to_string(table).ok()?;
    find(&text, local, peer)
}

/// The `tx_queue` of the line for `local` → `peer` in a /proc/net/tcp
/// table.
fn find(table: &str, local: SocketAddr, peer: SocketAddr) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let mut f = line.split_whitespace();
        let (_sl, l, r, _state, queues) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        if address(l)? != local || address(r)? != peer {
            return None;
        }
        u64::from_str_radix(queues.split(':').next()?, 16).ok()
    })
}

/// `0100007F:0CEA` (IPv4) or 32 hex digits (IPv6) and a port: the kernel
/// prints each 32-bit word of the network-order address as a native
/// integer, the port in host order.
fn address(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(ip.get(8 * i..8 * i + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[4 * i..4 * i + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_connection_is_found_by_its_addresses() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
             0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   \
             1: 0100007F:9C40 0100007F:0CEA 01 0001F400:00000000 01:00000014 00000000     0        0 2 1 0 20 4 30 10 -1\n";
        if cfg!(target_endian = "little") {
            let local: SocketAddr = "127.0.0.1:40000".parse().expect("test setup");
            let peer: SocketAddr = "127.0.0.1:3306".parse().expect("test setup");
            assert_eq!(find(v4, local, peer), Some(0x1F400));
            assert_eq!(find(v4, peer, local), None);
        }
    }

    /// Against the kernel: bytes a peer does not read stay queued.
    #[test]
    fn bytes_the_peer_has_not_taken_are_counted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("test setup");
        let mut client = std::net::TcpStream::connect(listener.local_addr().expect("test setup"))
            .expect("test setup");
        let (server, _) = listener.accept().expect("test setup");
        let (local, peer) = (
            client.local_addr().expect("test setup"),
            client.peer_addr().expect("test setup"),
        );
        assert_eq!(unacknowledged(local, peer), Some(0));
        // Fill the receiver's window and our send buffer; loopback acks
        // what the receive buffer holds, the rest stays queued here.
        client.set_nonblocking(true).expect("test setup");
        let chunk = vec![0u8; 1 << 16];
        let mut written = 0u64;
        while let Ok(n) = client.write(&chunk) {
            written += n as u64;
        }
        let queued = unacknowledged(local, peer).expect("listed");
        assert!(queued > 0 && queued <= written, "{queued} of {written}");
        drop(server);
    }
}
