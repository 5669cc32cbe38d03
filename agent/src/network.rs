//! Guest networking over rtnetlink: loopback at boot; pod interfaces (found by MAC),
//! addresses, routes and the hostname on ConfigureNetwork.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::{
    packet_route::{link::LinkAttribute, route::RouteScope},
    Handle, LinkUnspec, RouteMessageBuilder,
};
use shoji_agent_api::types::{ConfigureNetworkRequest, Interface, Route};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("no interface has MAC address {0}")]
    NoSuchMac(String),
    #[error("no interface named {0:?}")]
    NoSuchDevice(String),
    #[error("setting the hostname: {0}")]
    Hostname(nix::Error),
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

fn connect() -> Result<Handle, NetworkError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

/// "Already there" answers make repeated configuration idempotent.
fn exists_ok(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(ref m))
            if m.to_io().raw_os_error() == Some(libc::EEXIST) =>
        {
            Ok(())
        }
        r => r,
    }
}

async fn index_by_name(h: &Handle, name: &str) -> Result<u32, NetworkError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) | Err(_) => Err(NetworkError::NoSuchDevice(name.to_string())),
    }
}

pub async fn loopback_up() -> Result<(), NetworkError> {
    let h = connect()?;
    let lo = index_by_name(&h, "lo").await?;
    h.link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .map_err(netlink("lo up"))
}

pub fn parse_mac(mac: &str) -> Result<Vec<u8>, NetworkError> {
    let bytes: Vec<u8> = mac
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    if bytes.len() != 6 || mac.split(':').count() != 6 {
        return Err(NetworkError::Invalid(format!("bad MAC address {mac:?}")));
    }
    Ok(bytes)
}

/// `10.0.0.5/24` → (address, prefix length).
pub fn parse_cidr(cidr: &str) -> Result<(IpAddr, u8), NetworkError> {
    let bad = || NetworkError::Invalid(format!("bad CIDR {cidr:?}"));
    let (addr, len) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if len > if addr.is_ipv4() { 32 } else { 128 } {
        return Err(bad());
    }
    Ok((addr, len))
}

async fn configure_interface(h: &Handle, iface: &Interface) -> Result<(), NetworkError> {
    let mac = parse_mac(&iface.mac)?;
    let addresses = iface
        .addresses
        .iter()
        .map(|a| parse_cidr(a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut links = h.link().get().execute();
    let mut index = None;
    while let Some(link) = links.try_next().await.map_err(netlink("listing links"))? {
        if link
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Address(m) if *m == mac))
        {
            index = Some(link.header.index);
            break;
        }
    }
    let index = index.ok_or_else(|| NetworkError::NoSuchMac(iface.mac.clone()))?;
    let what = |step: &str| format!("{step} of interface {} ({})", iface.name, iface.mac);
    // A link must be down to be renamed.
    h.link()
        .set(LinkUnspec::new_with_index(index).down().build())
        .execute()
        .await
        .map_err(netlink(what("down")))?;
    let mut change = LinkUnspec::new_with_index(index);
    if !iface.name.is_empty() {
        change = change.name(iface.name.clone());
    }
    if iface.mtu > 0 {
        change = change.mtu(iface.mtu);
    }
    h.link()
        .set(change.build())
        .execute()
        .await
        .map_err(netlink(what("name/MTU")))?;
    for (addr, len) in addresses {
        exists_ok(h.address().add(index, addr, len).execute().await)
            .map_err(netlink(what("address")))?;
    }
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink(what("up")))
}

async fn add_route(h: &Handle, r: &Route) -> Result<(), NetworkError> {
    let bad = |why: &str| NetworkError::Invalid(format!("route to {:?}: {why}", r.destination));
    let gateway: Option<IpAddr> = match r.gateway.as_str() {
        "" => None,
        g => Some(g.parse().map_err(|_| bad("bad gateway"))?),
    };
    let (dest, len) = match r.destination.as_str() {
        "default" | "" => match gateway {
            Some(IpAddr::V6(_)) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            Some(IpAddr::V4(_)) => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            None => return Err(bad("a default route needs a gateway")),
        },
        d => parse_cidr(d)?,
    };
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dest, len)
        .map_err(|e| bad(&e.to_string()))?;
    match gateway {
        Some(g) => b = b.gateway(g).map_err(|e| bad(&e.to_string()))?,
        None => b = b.scope(RouteScope::Link),
    }
    if !r.device.is_empty() {
        b = b.output_interface(index_by_name(h, &r.device).await?);
    }
    exists_ok(h.route().add(b.build()).execute().await)
        .map_err(netlink(format!("route to {}", r.destination)))
}

pub async fn configure(req: &ConfigureNetworkRequest) -> Result<(), NetworkError> {
    let h = connect()?;
    for iface in &req.interfaces {
        configure_interface(&h, iface).await?;
    }
    for route in &req.routes {
        add_route(&h, route).await?;
    }
    if !req.hostname.is_empty() {
        nix::unistd::sethostname(&req.hostname).map_err(NetworkError::Hostname)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02").unwrap(),
            vec![2, 0x42, 0xac, 0x11, 0, 2]
        );
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:zz",
            "02:42:ac:11:00:02:03",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_cidr("10.88.0.5/16").unwrap(),
            ("10.88.0.5".parse().unwrap(), 16)
        );
        assert_eq!(parse_cidr("fd00::1/64").unwrap().1, 64);
        for bad in ["10.0.0.1", "10.0.0.1/33", "x/8", "fd00::1/129"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }
}
