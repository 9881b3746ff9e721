//! CPU and NUMA topology from sysfs, and the kernel's CPU-list format (`0-3,8,10-11`).

use std::path::Path;

use serde::Serialize;

use crate::SysRoot;

/// A kernel CPU list that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CPU list {input:?}: {reason}")]
pub struct CpuListError {
    /// The list as given (trimmed).
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Online CPUs and how they group into NUMA nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// `/sys/devices/system/cpu/online`; empty when it could not be read.
    pub online: Vec<usize>,
    /// NUMA nodes sorted by id. Never empty after [`Topology::read`] unless no CPUs are known.
    pub nodes: Vec<NumaNode>,
}

/// One NUMA node and the CPUs attached to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NumaNode {
    /// The `N` of `nodeN`.
    pub id: usize,
    /// CPUs on this node (memory-only nodes have none).
    pub cpus: Vec<usize>,
}

impl Topology {
    /// Reads `sys/devices/system/{cpu/online,node/node*/cpulist}` under `root`.
    ///
    /// Kernels built without NUMA have no `node` directory; they are treated as one node
    /// holding every online CPU, so per-NUMA sharding degrades to a single shard.
    pub fn read(root: &SysRoot) -> Topology {
        let online = root
            .read("sys/devices/system/cpu/online")
            .and_then(|s| parse_cpu_list(&s).ok())
            .unwrap_or_default();
        let mut nodes = read_nodes(&root.join("sys/devices/system/node"));
        if nodes.is_empty() && !online.is_empty() {
            nodes.push(NumaNode {
                id: 0,
                cpus: online.clone(),
            });
        }
        Topology { online, nodes }
    }

    /// The node a CPU belongs to, if the topology knows it.
    pub fn node_of(&self, cpu: usize) -> Option<usize> {
        self.nodes
            .iter()
            .find(|n| n.cpus.contains(&cpu))
            .map(|n| n.id)
    }
}

fn read_nodes(dir: &Path) -> Vec<NumaNode> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut nodes: Vec<NumaNode> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let id = name.to_str()?.strip_prefix("node")?.parse().ok()?;
            let list = std::fs::read_to_string(entry.path().join("cpulist")).ok()?;
            let cpus = parse_cpu_list(&list).ok()?;
            Some(NumaNode { id, cpus })
        })
        .collect();
    nodes.sort_by_key(|n| n.id);
    nodes
}

/// Parses the kernel's CPU-list format: comma-separated CPUs and inclusive ranges, e.g.
/// `"0-3,8,10-11\n"`. Returns the CPUs sorted and de-duplicated. An empty list (a memory-only
/// NUMA node prints a bare newline) is valid and empty.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, CpuListError> {
    let input = s.trim();
    let err = |reason: String| CpuListError {
        input: input.to_owned(),
        reason,
    };
    let mut cpus = Vec::new();
    if input.is_empty() {
        return Ok(cpus);
    }
    for item in input.split(',') {
        let item = item.trim();
        let num = |n: &str| {
            n.trim()
                .parse::<usize>()
                .map_err(|_| err(format!("{n:?} is not a CPU number")))
        };
        match item.split_once('-') {
            None => cpus.push(num(item)?),
            Some((lo, hi)) => {
                let (lo, hi) = (num(lo)?, num(hi)?);
                if lo > hi {
                    return Err(err(format!("range {item:?} runs backwards")));
                }
                cpus.extend(lo..=hi);
            }
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn cpu_lists_parse_ranges_singles_and_newlines() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n").unwrap(),
            [0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list("5").unwrap(), [5]);
        assert_eq!(parse_cpu_list("4-4,0").unwrap(), [0, 4]);
        assert_eq!(parse_cpu_list("\n").unwrap(), Vec::<usize>::new());
    }

    #[test]
    fn malformed_cpu_lists_are_errors() {
        for bad in ["a", "0-", "-3", "3-1", "0,,1", "1-2-3", "0-7:2"] {
            let e = parse_cpu_list(bad).unwrap_err();
            assert_eq!(e.input, bad, "{e}");
        }
    }

    fn write(root: &Path, rel: &str, body: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, body).unwrap();
    }

    #[test]
    fn two_numa_nodes_are_read_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "sys/devices/system/cpu/online", "0-7\n");
        write(dir.path(), "sys/devices/system/node/node1/cpulist", "4-7\n");
        write(dir.path(), "sys/devices/system/node/node0/cpulist", "0-3\n");
        let topo = Topology::read(&SysRoot::new(dir.path()));
        assert_eq!(topo.online, (0..8).collect::<Vec<_>>());
        assert_eq!(
            topo.nodes,
            [
                NumaNode {
                    id: 0,
                    cpus: vec![0, 1, 2, 3]
                },
                NumaNode {
                    id: 1,
                    cpus: vec![4, 5, 6, 7]
                },
            ]
        );
        assert_eq!(topo.node_of(5), Some(1));
    }

    #[test]
    fn missing_node_dir_means_one_node_with_every_online_cpu() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "sys/devices/system/cpu/online", "0-3\n");
        let topo = Topology::read(&SysRoot::new(dir.path()));
        assert_eq!(
            topo.nodes,
            [NumaNode {
                id: 0,
                cpus: vec![0, 1, 2, 3]
            }]
        );
    }
}
