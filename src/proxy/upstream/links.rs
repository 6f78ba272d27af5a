//! A connection's links and the CLI's requests waiting for its client's answer, as data.

use crate::proxy::link::Link;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;

/// A connection's links and the CLI's requests waiting for this client's answer.
#[derive(Default)]
pub(crate) struct Upstream {
    pub(in crate::proxy) links: HashMap<String, Arc<Link>>,
    /// Proxy id → (the link it came on, the CLI's own id).
    pub(in crate::proxy) server_reqs: HashMap<u64, (Arc<Link>, Box<RawValue>)>,
    pub(in crate::proxy) next_srv: u64,
}

impl Upstream {
    /// Client requests written or queued on any link and not yet answered.
    pub(in crate::proxy) fn pending_client(&self) -> usize {
        self.links.values().map(|l| l.pending_client()).sum()
    }

    /// Whether the CLI waits for this client to answer something.
    pub(in crate::proxy) fn awaits_client(&self) -> bool {
        !self.server_reqs.is_empty()
    }

    /// Every link, emptied (the connection closes).
    pub(in crate::proxy) fn drain(&mut self) -> Vec<Arc<Link>> {
        self.server_reqs.clear();
        self.links.drain().map(|(_, l)| l).collect()
    }

    /// Forgets a link that ended (if it is still the current one) and what the CLI asked
    /// through it.
    pub(in crate::proxy) fn link_ended(&mut self, link: &Link) {
        if self
            .links
            .get(&link.backend.name)
            .is_some_and(|l| std::ptr::eq(Arc::as_ptr(l), link))
        {
            self.links.remove(&link.backend.name);
        }
        self.server_reqs
            .retain(|_, (l, _)| !std::ptr::eq(Arc::as_ptr(l), link));
    }
}
