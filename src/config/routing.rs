//! `routing:`: methods an operator forwards beyond the routing table, and their checks.

use serde::Deserialize;
use std::collections::HashSet;

/// Additions to the routing table, which refuses every method it does not list: methods a
/// newer CLI added, or a CLI's own extensions, that this deployment wants forwarded.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Forwarded to any healthy backend (routed by `params.sessionId`, ownership checked,
    /// when the request carries one). Also accepts the table's host-state methods.
    #[serde(default)]
    pub allow_global: Vec<String>,
    /// Session-scoped: routed by `params.sessionId`, which the request must carry.
    #[serde(default)]
    pub allow_session: Vec<String>,
}

impl RoutingConfig {
    /// How `method` is allowed, if it is. Linear: asked only for methods the table refuses,
    /// and the lists are a handful of names.
    pub(crate) fn allowance(&self, method: &str) -> Option<crate::route::Allowed> {
        if self.allow_session.iter().any(|m| m == method) {
            Some(crate::route::Allowed::Session)
        } else if self.allow_global.iter().any(|m| m == method) {
            Some(crate::route::Allowed::Global)
        } else {
            None
        }
    }
}

impl RoutingConfig {
    /// Every name is a method the routing table does not know, or one it refuses in the one
    /// class an operator may override (`host`), and appears once over both lists.
    pub(super) fn check(&self, problems: &mut Vec<String>) {
        let mut seen = HashSet::new();
        let lists = [
            ("allow_global", &self.allow_global),
            ("allow_session", &self.allow_session),
        ];
        for (list, names) in lists {
            for m in names.iter() {
                let w = format!("routing.{list}: {m:?}");
                if m.is_empty() || m.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    problems.push(format!("{w} is not a method name"));
                    continue;
                }
                if !seen.insert(m.as_str()) {
                    problems.push(format!("{w} is listed more than once"));
                    continue;
                }
                match crate::route::lookup(m).map(|e| e.route) {
                    None => {}
                    Some(crate::route::Route::Denied(d)) if d.overridable() => {}
                    Some(crate::route::Route::Denied(d)) => problems.push(format!(
                        "{w} is refused by copilot-lb on purpose ({}), which no setting changes",
                        d.label()
                    )),
                    Some(_) => problems.push(format!(
                        "{w} is already forwarded by copilot-lb's routing table (see `copilot-lb routes`)"
                    )),
                }
            }
        }
    }
}
