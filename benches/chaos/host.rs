//! Shared session storage for fake CLIs that run as separate processes.
//!
//! The fake CLI (`test_support::fake_cli`) keeps its [`Storage`] in memory (several fakes
//! share one only inside one process), and the chaos harness may not change it. So the session
//! logic and the shared storage stay in one *host* — the chaos/soak driver itself, or `chaos
//! fake-host` — which runs one in-process [`FakeCli`] per backend name on a private port and
//! writes `<dir>/<name>.addr`. Each backend's network endpoint is a separate `chaos fake-cli`
//! process ([`super::front`]) that forwards every accepted connection, byte for byte, to its
//! fake in the host. Killing that process (-9) closes all of its connections at once, so the
//! fake sees them close and releases the sessions they held, exactly like a CLI that died;
//! SIGSTOP freezes every connection of that backend (the fake keeps holding its sessions until
//! the frozen process runs again and passes the closes on, like a stopped CLI); connects are
//! refused while it is dead. What the host does not model: a killed CLI also loses turns that
//! were running inside it; here such a turn may still finish in the fake and be written to
//! storage (its answer goes nowhere).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use test_support::fake_cli::{FakeCli, FakeConfig, Storage};

/// The fakes of one run and their shared storage.
pub struct Host {
    /// The shared storage (one `COPILOT_HOME`).
    pub storage: Arc<Storage>,
    /// The fakes, by backend name.
    pub fakes: BTreeMap<String, FakeCli>,
    /// Where the address files are.
    pub dir: PathBuf,
}

impl Host {
    /// Starts one fake per name on shared storage and writes `<dir>/<name>.addr` for each.
    pub async fn start(dir: &Path, names: &[String]) -> std::io::Result<Host> {
        std::fs::create_dir_all(dir)?;
        let storage = Storage::new();
        let mut fakes = BTreeMap::new();
        for n in names {
            let f = FakeCli::start(FakeConfig {
                name: n.clone(),
                storage: Some(storage.clone()),
                ..FakeConfig::default()
            })
            .await?;
            let tmp = dir.join(format!(".{n}.addr.tmp"));
            std::fs::write(&tmp, f.addr().to_string())?;
            std::fs::rename(&tmp, addr_file(dir, n))?;
            fakes.insert(n.clone(), f);
        }
        Ok(Host {
            storage,
            fakes,
            dir: dir.to_path_buf(),
        })
    }

    /// Session id → names of the fakes where it is live now (joined by a connection). Only
    /// stored sessions count: the fake keeps a deleted session's joins until its connection
    /// detaches or closes.
    pub fn live(&self) -> BTreeMap<String, BTreeSet<String>> {
        let stored: BTreeSet<String> = self.storage.ids().into_iter().collect();
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, f) in &self.fakes {
            for s in f.sessions_live() {
                if stored.contains(&s) {
                    m.entry(s).or_default().insert(name.clone());
                }
            }
        }
        m
    }

    /// Stored sessions live on fake `name` now.
    pub fn live_on(&self, name: &str) -> usize {
        self.live().values().filter(|on| on.contains(name)).count()
    }

    /// Open connections per fake (the host side of each backend process's connections).
    pub fn connections(&self) -> BTreeMap<String, usize> {
        self.fakes
            .iter()
            .map(|(n, f)| (n.clone(), f.connections()))
            .collect()
    }
}

/// `<dir>/<name>.addr`.
pub fn addr_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.addr"))
}
