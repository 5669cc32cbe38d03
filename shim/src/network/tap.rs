//! Opening a pod's tap devices from the host, inside the pod's network namespace, so their
//! fds can be handed to the VMM (QEMU inherits them, Cloud Hypervisor gets them over its
//! API socket). The taps themselves are made by [`super::setup`].
use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use super::{in_netns, NetDevice, NetworkError, Result};

/// The one network namespace the NICs live in (`None`: the host's).
pub fn pod_netns(nets: &[NetDevice]) -> Result<Option<&Path>> {
    let mut all = nets.iter().map(|n| n.netns.as_deref());
    let first = all.next().flatten();
    if all.any(|ns| ns != first) {
        return Err(NetworkError::MixedNamespaces);
    }
    if let Some(ns) = first.filter(|ns| !ns.exists()) {
        return Err(NetworkError::NoNamespace(ns.display().to_string()));
    }
    Ok(first)
}

/// Opens every tap of `nets` (in their namespace, see [`pod_netns`]) and returns one fd per
/// tap, in order.
pub async fn open_taps(nets: &[NetDevice]) -> Result<Vec<OwnedFd>> {
    let netns = pod_netns(nets)?;
    let where_ = netns
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the host namespace".into());
    let taps: Vec<String> = nets.iter().map(|n| n.tap.clone()).collect();
    in_netns(netns, move || {
        taps.iter()
            .map(|tap| {
                open_tap(tap).map_err(|e| std::io::Error::new(e.kind(), format!("tap {tap}: {e}")))
            })
            .collect()
    })
    .await
    .map_err(|source| NetworkError::Io {
        context: format!("opening the taps in {where_}"),
        source,
    })
}

/// Attaches to an existing tap. TUNSETIFF would create a missing one, so existence is
/// checked first; the multi-queue flag must match how the tap was created.
fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "invalid interface name",
        ));
    }
    let cname = std::ffi::CString::new(name)?;
    // SAFETY: if_nametoindex(3) reads a NUL-terminated name; it asks a socket of this
    // thread's network namespace.
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such interface in this network namespace",
        ));
    }
    let base = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    match attach(name, base) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            attach(name, base | libc::IFF_MULTI_QUEUE as libc::c_short)
        }
        other => other,
    }
}

fn attach(name: &str, flags: libc::c_short) -> std::io::Result<OwnedFd> {
    // SAFETY: open(2) of a constant path; the result is checked.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags;
    // SAFETY: TUNSETIFF reads an ifreq that lives for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, process::Command};

    use super::*;

    fn ip(args: &[&str]) {
        let ok = Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "ip {args:?} failed (tests run as root)");
    }

    #[tokio::test]
    async fn taps_open_in_their_namespace_and_missing_ones_are_refused() {
        let ns = format!("shoji-tap-test-{}", std::process::id());
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        let net = |tap: &str| NetDevice {
            tap: tap.into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1500,
            netns: Some(PathBuf::from(format!("/run/netns/{ns}"))),
        };
        let opened = open_taps(&[net("tap0")]).await;
        let missing = open_taps(&[net("tap9")]).await;
        let mut other = net("tap0");
        other.netns = None;
        let mixed = open_taps(&[net("tap0"), other]).await;
        ip(&["netns", "delete", &ns]);
        assert_eq!(opened.unwrap().len(), 1);
        assert!(missing.unwrap_err().to_string().contains("tap9"));
        assert!(mixed
            .unwrap_err()
            .to_string()
            .contains("same network namespace"));
    }
}
