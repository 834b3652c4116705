//! The P2P benchmark's network: one network namespace for the registry and one per node
//! cache, each joined to a bridge in this (the root) namespace by a veth pair whose two ends
//! are rate-limited with `tbf`, so that what a namespace sends and what it receives both
//! pass one limited link, as through a NIC and its switch port. The benchmark process stays
//! in the root namespace with an address on the bridge.
//!
//! Every name starts with [`PREFIX`]; [`Net::setup`] deletes what an earlier run left behind
//! (a killed run does not reach `Drop`), and dropping the [`Net`] deletes it all.

use std::process::Command;

use crate::support::Launch;

/// The prefix of every namespace, veth and the bridge.
pub(crate) const PREFIX: &str = "thawb-";
const BRIDGE: &str = "thawb-br0";
/// The private subnet: .1 the bridge (this process), .2 the registry, .10 on the nodes.
const SUBNET: &str = "10.231.0";
const REGISTRY_NS: &str = "thawb-reg";

/// Link shaping: rates in Mbit/s, an optional one-way delay.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Links {
    pub(crate) node_mbit: f64,
    pub(crate) registry_mbit: f64,
    /// Added (netem) to what each namespace sends, so the round trip between two
    /// namespaces is twice this. Zero: no netem.
    pub(crate) delay_ms: f64,
}

/// The namespaces, the veths and the bridge; deleted on drop (also when a panic unwinds).
pub(crate) struct Net {
    namespaces: Vec<String>,
    pub(crate) links: Links,
}

fn run(args: &[&str]) -> Result<String, String> {
    let out =
        Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("`{}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("`{}`: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Queue of a host's own sending side, in milliseconds at the link rate.
const SEND_QUEUE_MS: u32 = 100;
/// Queue of the switch port towards a host, in milliseconds at the link rate.
const RECEIVE_QUEUE_MS: u32 = 20;

/// `tbf` (behind `netem` when there is a delay) on `dev`, in namespace `ns` or this one,
/// queueing up to `queue_ms` at the rate before it drops.
fn shape(ns: Option<&str>, dev: &str, mbit: f64, delay_ms: f64, queue_ms: u32) -> Result<(), String> {
    let bytes_per_s = mbit * 1e6 / 8.0;
    // A burst of 1 ms at the rate, at least 32 KiB (a few GSO segments).
    let burst = ((bytes_per_s / 1000.0) as u64).max(32 << 10).to_string();
    let rate = format!("{}kbit", (mbit * 1000.0).round() as u64);
    let mut tc = vec!["tc"];
    if let Some(ns) = ns {
        tc.extend(["-n", ns]);
    }
    let queue = format!("{queue_ms}ms");
    let tbf = ["tbf", "rate", rate.as_str(), "burst", burst.as_str(), "latency", queue.as_str()];
    if delay_ms > 0.0 {
        let delay = format!("{}us", (delay_ms * 1000.0).round() as u64);
        run(&[&tc[..], &["qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", &delay]]
            .concat())
        .map_err(|e| format!("{e} (THAW_BENCH_LINK_DELAY_MS needs the kernel's sch_netem)"))?;
        run(&[&tc[..], &["qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:"], &tbf[..]].concat())?;
    } else {
        run(&[&tc[..], &["qdisc", "add", "dev", dev, "root"], &tbf[..]].concat())?;
    }
    Ok(())
}

/// Deletes every namespace and link named with [`PREFIX`].
fn clean() {
    if let Ok(list) = run(&["ip", "netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with(PREFIX) {
                let _ = run(&["ip", "netns", "delete", ns]);
            }
        }
    }
    if let Ok(list) = run(&["ip", "-o", "link", "show"]) {
        for link in list.lines().filter_map(|l| l.split(": ").nth(1)) {
            let link = link.split('@').next().unwrap_or(link);
            if link.starts_with(PREFIX) {
                let _ = run(&["ip", "link", "delete", link]);
            }
        }
    }
}

impl Net {
    /// Builds the registry's namespace and `nodes` node namespaces.
    pub(crate) fn setup(nodes: usize, links: Links) -> Result<Self, String> {
        assert!(nodes <= 200, "at most 200 node namespaces");
        run(&["ip", "netns", "list"]).map_err(|e| {
            format!(
                "{e}\nTHAW_BENCH_NETNS needs iproute2 (`ip`, `tc`) and root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
            )
        })?;
        clean();
        let mut net = Self { namespaces: Vec::new(), links };
        run(&["ip", "link", "add", BRIDGE, "type", "bridge"]).map_err(|e| {
            format!("{e}\nTHAW_BENCH_NETNS needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to make namespaces")
        })?;
        run(&["ip", "addr", "add", &format!("{SUBNET}.1/24"), "dev", BRIDGE])?;
        run(&["ip", "link", "set", BRIDGE, "up"])?;
        net.add(REGISTRY_NS, &format!("{SUBNET}.2"), links.registry_mbit)?;
        for i in 0..nodes {
            net.add(&Self::node_ns(i), &format!("{SUBNET}.{}", 10 + i), links.node_mbit)?;
        }
        Ok(net)
    }

    fn node_ns(i: usize) -> String {
        format!("{PREFIX}n{i}")
    }

    /// Namespace `ns` at `ip`, its `eth0` paired with `<ns>-v` on the bridge, both shaped.
    fn add(&mut self, ns: &str, ip: &str, mbit: f64) -> Result<(), String> {
        run(&["ip", "netns", "add", ns])?;
        self.namespaces.push(ns.to_owned());
        let outer = format!("{ns}-v");
        run(&["ip", "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        run(&["ip", "link", "set", &outer, "master", BRIDGE, "up"])?;
        run(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        // What the namespace sends, and (at the bridge's port) what it receives.
        // What a host sends queues deep, as in a NIC's transmit queue, which pushes back on
        // the sender's TCP rather than dropping (a 10 ms queue here dropped 17 % of the
        // registry's packets with 8 nodes pulling). What it receives passes a switch port's
        // shallower buffer.
        shape(Some(ns), "eth0", mbit, self.links.delay_ms, SEND_QUEUE_MS)?;
        shape(None, &outer, mbit, 0.0, RECEIVE_QUEUE_MS)
    }

    pub(crate) fn registry(&self) -> Launch {
        Launch::netns(REGISTRY_NS, &format!("{SUBNET}.2"))
    }

    /// Node `i`'s namespace (`i` below the count given to [`Net::setup`]).
    pub(crate) fn node(&self, i: usize) -> Launch {
        assert!(i + 1 < self.namespaces.len(), "no namespace for node {i}");
        Launch::netns(&Self::node_ns(i), &format!("{SUBNET}.{}", 10 + i))
    }

    /// Bytes the registry's namespace has sent: `eth0`'s transmit counter (frames with
    /// their Ethernet, IP and TCP headers).
    pub(crate) fn registry_tx_bytes(&self) -> u64 {
        let json = run(&["ip", "-n", REGISTRY_NS, "-s", "-j", "link", "show", "dev", "eth0"])
            .expect("reading the registry's interface counters");
        let v: serde_json::Value = serde_json::from_str(&json).expect("`ip -j` JSON");
        v[0]["stats64"]["tx"]["bytes"].as_u64().expect("tx bytes in `ip -s -j link show`")
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..) {
            let _ = run(&["ip", "netns", "delete", &ns]);
        }
        let _ = run(&["ip", "link", "delete", BRIDGE]);
        clean();
    }
}
