//! Clusters of real `verge` processes on loopback, over QUIC with mutual TLS: certificates
//! from `verge certs`, one temporary data directory per node, fixed gossip ports (free UDP ports
//! picked up front, so a node restarts on the same address) and ephemeral API ports.

use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::{Node, free_udp_port, heads_of, make_certs, tls_args, wait_for};

/// How long a change may take to show up on another node.
pub const REPLICATION_DEADLINE: Duration = Duration::from_secs(10);
/// How long members may take to find each other.
pub const MEMBERSHIP_DEADLINE: Duration = Duration::from_secs(10);

/// One node to start: its name (also its certificate's), gossip port, seed ports and any
/// further `verge node` arguments.
pub struct Spec {
    pub name: String,
    pub gossip_port: u16,
    pub seeds: Vec<u16>,
    pub extra: Vec<String>,
}

pub fn gossip_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The `verge node` arguments of `spec` with certificates from `certs`.
pub fn node_args(certs: &Path, spec: &Spec) -> Vec<String> {
    let mut args = vec![
        "--gossip-addr".to_string(),
        gossip_addr(spec.gossip_port).to_string(),
    ];
    for seed in &spec.seeds {
        args.extend(["--peer".to_string(), gossip_addr(*seed).to_string()]);
    }
    args.extend(tls_args(certs, &spec.name));
    args.extend(spec.extra.iter().cloned());
    args
}

/// Writes `text` to `dir/file` and returns the `--config` arguments naming it.
fn config_args(dir: &Path, file: &str, text: &str) -> Vec<String> {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    vec!["--config".to_string(), path.display().to_string()]
}

/// Starts every node of `specs` at once (each waits for its own `/readyz`).
pub fn start_nodes(certs: &Path, specs: &[Spec]) -> Vec<Node> {
    thread::scope(|s| {
        let handles: Vec<_> = specs
            .iter()
            .map(|spec| s.spawn(move || Node::start_with(&spec.name, node_args(certs, spec))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A cluster of nodes whose certificates share one CA.
pub struct Cluster {
    pub certs: TempDir,
    pub nodes: Vec<Node>,
    pub ports: Vec<u16>,
    /// Arguments every node gets besides its own.
    pub extra: Vec<String>,
}

impl Cluster {
    /// `n` nodes named `{prefix}-1..=n`; node `i` is seeded with the nodes `seeds_of(i)`.
    /// Certificates for `extra` more names are made for nodes started later.
    pub fn start(
        prefix: &str,
        n: usize,
        extra: usize,
        seeds_of: impl Fn(usize) -> Vec<usize>,
    ) -> Self {
        Self::start_configured(prefix, n, extra, seeds_of, None)
    }

    /// Like [`Cluster::start`], every node reading `config` (TOML) as its config file.
    pub fn start_configured(
        prefix: &str,
        n: usize,
        extra: usize,
        seeds_of: impl Fn(usize) -> Vec<usize>,
        config: Option<&str>,
    ) -> Self {
        let (certs, names, ports) = Self::prepare(prefix, n + extra);
        let extra_args = match config {
            Some(text) => config_args(certs.path(), "verge.toml", text),
            None => Vec::new(),
        };
        let specs: Vec<Spec> = (0..n)
            .map(|i| Spec {
                name: names[i].clone(),
                gossip_port: ports[i],
                seeds: seeds_of(i).into_iter().map(|j| ports[j]).collect(),
                extra: extra_args.clone(),
            })
            .collect();
        let nodes = start_nodes(certs.path(), &specs);
        Cluster {
            certs,
            nodes,
            ports,
            extra: extra_args,
        }
    }

    /// `configs.len()` nodes named `{prefix}-1..`, node `i` seeded with `seeds_of(i)` and
    /// reading `configs[i]` (TOML) as its config file: nodes configured differently.
    pub fn start_each_configured(
        prefix: &str,
        seeds_of: impl Fn(usize) -> Vec<usize>,
        configs: &[&str],
    ) -> Self {
        let (certs, names, ports) = Self::prepare(prefix, configs.len());
        let specs: Vec<Spec> = configs
            .iter()
            .enumerate()
            .map(|(i, text)| Spec {
                name: names[i].clone(),
                gossip_port: ports[i],
                seeds: seeds_of(i).into_iter().map(|j| ports[j]).collect(),
                extra: config_args(certs.path(), &format!("{}.toml", names[i]), text),
            })
            .collect();
        let nodes = start_nodes(certs.path(), &specs);
        Cluster {
            certs,
            nodes,
            ports,
            extra: Vec::new(),
        }
    }

    /// Certificates for `{prefix}-1..=total` in a new directory, and a gossip port for each.
    fn prepare(prefix: &str, total: usize) -> (TempDir, Vec<String>, Vec<u16>) {
        let certs = tempfile::Builder::new()
            .prefix("verge-certs-")
            .tempdir()
            .unwrap();
        let names: Vec<String> = (1..=total).map(|i| format!("{prefix}-{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        make_certs(certs.path(), &refs);
        let ports: Vec<u16> = (0..total).map(|_| free_udp_port()).collect();
        (certs, names, ports)
    }

    /// Starts node number `i` (0-based, one of the `extra` ones) seeded with `seeds`.
    pub fn start_extra(&self, prefix: &str, i: usize, seeds: &[usize]) -> Node {
        let spec = Spec {
            name: format!("{prefix}-{}", i + 1),
            gossip_port: self.ports[i],
            seeds: seeds.iter().map(|j| self.ports[*j]).collect(),
            extra: self.extra.clone(),
        };
        Node::start_with(&spec.name, node_args(self.certs.path(), &spec))
    }

    /// Every node with every other listed as `up`.
    pub fn wait_connected(&self) -> Duration {
        let addrs: Vec<String> = self
            .ports
            .iter()
            .take(self.nodes.len())
            .map(|p| gossip_addr(*p).to_string())
            .collect();
        wait_all_connected(&self.nodes, &addrs)
    }
}

/// Waits until each of `nodes` lists every other address of `addrs` as `up` in `/v1/status`.
pub fn wait_all_connected(nodes: &[Node], addrs: &[String]) -> Duration {
    let start = Instant::now();
    for (i, node) in nodes.iter().enumerate() {
        let others: Vec<&String> = addrs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, a)| a)
            .collect();
        wait_for(
            MEMBERSHIP_DEADLINE,
            &format!("{} to list {others:?} as up", node.node_id),
            || {
                let up = members_up(node);
                if others.iter().all(|a| up.contains(*a)) {
                    Ok(())
                } else {
                    Err(format!(
                        "up: {up:?}; status: {}",
                        node.get("/v1/status").text()
                    ))
                }
            },
        );
    }
    start.elapsed()
}

/// The gossip addresses a node lists as `up` (not itself).
pub fn members_up(node: &Node) -> Vec<String> {
    members(node)
        .into_iter()
        .filter(|m| m["state"] == "up")
        .filter_map(|m| m["addr"].as_str().map(str::to_string))
        .collect()
}

/// The `members` of `/v1/status`.
pub fn members(node: &Node) -> Vec<Value> {
    let status = node.get("/v1/status").ok_json("GET /v1/status");
    status["members"].as_array().cloned().unwrap_or_default()
}

/// A document as read from one node: its JSON and sorted heads, or `None` when absent.
pub fn read_doc(node: &Node, id: &str) -> Option<(Value, Vec<String>)> {
    let r = node.get_doc(id);
    match r.status {
        404 => None,
        200 => {
            let body = r.json();
            let heads = heads_of(&body, &format!("GET {id} at {}", node.node_id));
            Some((body["doc"].clone(), heads))
        }
        _ => panic!("GET {id} at {}: {}", node.node_id, r.describe()),
    }
}
