//! The optional bandwidth-limited link (`--link-mbit N`): a network namespace of the
//! benchmark's own, joined to the host by a veth pair with a `tbf` rate limit of N Mbit/s
//! on both ends (so both directions are limited). Clients run inside the namespace
//! (`ip netns exec`); the servers and their byte-counting proxies stay on the host, the
//! proxies listening on the host end of the pair. Everything is removed when the run ends.
//! Needs root, `ip` and `tc` (Debian's iproute2).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// Host end of the pair; the namespace end is `.2`. A /30 no one else on this machine uses
/// is assumed (the run fails loudly if the address is taken).
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 77, 1);
const NS_IP: &str = "10.201.77.2/30";
const NS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 77, 2);

/// Where the clients of one set of measurements run.
#[derive(Debug, Clone)]
pub(crate) struct Net {
    /// `None`: on the host, over loopback.
    pub(crate) ns: Option<String>,
    /// The address the proxies listen on and clients connect to.
    pub(crate) server_ip: IpAddr,
    /// The address clients (and daemons run as clients, the node caches) have there.
    pub(crate) client_ip: IpAddr,
    /// For the report: "loopback" or "N Mbit/s link".
    pub(crate) label: String,
}

impl Net {
    pub(crate) fn loopback() -> Self {
        Self {
            ns: None,
            server_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            label: "loopback".into(),
        }
    }

    /// A command that runs `program` where this network's clients run.
    pub(crate) fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.ns {
            None => Command::new(program),
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
        }
    }
}

/// The namespace and veth pair; removed on drop.
pub(crate) struct Link {
    ns: String,
    host_if: String,
    pub(crate) net: Net,
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {args:?}"))?;
    ensure!(
        out.status.success(),
        "{} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Link {
    pub(crate) fn create(mbit: u32) -> Result<Self> {
        remove_stale();
        let id = std::process::id();
        let ns = format!("thawbench{id}");
        let (host_if, ns_if) = (format!("tb{id}h"), format!("tb{id}n"));
        let rate = format!("{mbit}mbit");
        sh(&["ip", "netns", "add", &ns])
            .context("creating the benchmark's network namespace (needs root)")?;
        // From here on, dropping `link` removes what exists.
        let link = Self {
            ns: ns.clone(),
            host_if: host_if.clone(),
            net: Net {
                ns: Some(ns.clone()),
                server_ip: IpAddr::V4(HOST_IP),
                client_ip: IpAddr::V4(NS_ADDR),
                label: format!("{mbit} Mbit/s link"),
            },
        };
        let host_cidr = format!("{HOST_IP}/30");
        let steps: [&[&str]; 10] = [
            &["ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if],
            &["ip", "link", "set", &ns_if, "netns", &ns],
            &["ip", "addr", "add", &host_cidr, "dev", &host_if],
            &["ip", "link", "set", &host_if, "up"],
            &["ip", "netns", "exec", &ns, "ip", "addr", "add", NS_IP, "dev", &ns_if],
            &["ip", "netns", "exec", &ns, "ip", "link", "set", &ns_if, "up"],
            &["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"],
            // Token bucket on each end's egress: host → namespace and namespace → host.
            &[
                "tc", "qdisc", "add", "dev", &host_if, "root", "tbf", "rate", &rate, "burst", "1mb",
                "latency", "50ms",
            ],
            &[
                "ip", "netns", "exec", &ns, "tc", "qdisc", "add", "dev", &ns_if, "root", "tbf", "rate",
                &rate, "burst", "1mb", "latency", "50ms",
            ],
            &["ip", "netns", "exec", &ns, "ip", "route", "show"],
        ];
        for step in steps {
            sh(step).context("setting up the bandwidth-limited link")?;
        }
        Ok(link)
    }
}

/// Removes the namespaces of earlier runs that were killed before they could clean up
/// (`thawbench<pid>` whose process is gone); deleting one deletes its veth pair.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name.strip_prefix("thawbench").and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the host end.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
    }
}
