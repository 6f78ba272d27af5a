//! Where the admin API is and which token to send: flags first, then the config file, then
//! the defaults. Pure apart from reading the config and token files.

use super::{AdminArgs, StatusError};
use crate::config::{self, Config};

/// The admin API's port when no config names one (the example configs' admin.listen).
pub(crate) const DEFAULT_ADMIN: &str = "127.0.0.1:9464";

/// The token variable tried after `--token-env` and the config's `admin.token_env`.
pub(crate) const DEFAULT_TOKEN_ENV: &str = "COPILOT_LB_ADMIN_TOKEN";

/// A resolved admin API and token.
#[derive(Debug)]
pub(crate) struct Target {
    /// `host:port` to connect to.
    pub(crate) addr: String,
    /// The bearer token, if one was found.
    pub(crate) token: Option<Token>,
    /// The variables that were looked at, for the 401 hint.
    pub(crate) env_names: Vec<String>,
}

/// A token and where it came from. Its `Debug` never shows the value.
pub(crate) struct Token {
    pub(crate) value: String,
    /// `$NAME` or `file PATH`.
    pub(crate) source: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(from {}, redacted)", self.source)
    }
}

impl Target {
    /// What to tell the operator after a 401/403: which source was used or which to set.
    pub(crate) fn token_hint(&self) -> String {
        match &self.token {
            Some(t) => format!(
                "the admin token from {} was refused (it must equal the proxy's admin.token_env variable)",
                t.source
            ),
            None => {
                let vars: Vec<String> = self.env_names.iter().map(|v| format!("${v}")).collect();
                format!(
                    "this admin API needs its token: set {} or pass --token-file FILE",
                    vars.join(" or ")
                )
            }
        }
    }
}

/// Resolves the target from the flags, the config (`--config`, else the default path when it
/// exists) and the environment (`env`, injected for tests).
pub(crate) fn resolve(
    args: &AdminArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Target, StatusError> {
    let path = match &args.config {
        Some(p) => Some(p.clone()),
        None => config::default_path(),
    };
    let cfg = match path {
        Some(p) => Some(Config::load(&p)?),
        None => None,
    };
    let admin = cfg.as_ref().and_then(|c| c.admin.as_ref());
    let addr = match (&args.admin, admin) {
        (Some(a), _) => a.clone(),
        (None, Some(a)) => a.listen.value.clone(),
        (None, None) => DEFAULT_ADMIN.to_string(),
    };
    let addr = connectable(&addr)?;
    let mut env_names: Vec<String> = Vec::new();
    match &args.token_env {
        Some(v) => env_names.push(v.clone()),
        None => {
            if let Some(v) = admin.and_then(|a| a.token_env.clone()) {
                env_names.push(v);
            }
            env_names.push(DEFAULT_TOKEN_ENV.to_string());
        }
    }
    env_names.dedup();
    // The environment wins over the file: a file left behind must not shadow a token the
    // operator just exported.
    let from_env = env_names.iter().find_map(|name| {
        env(name).filter(|v| !v.trim().is_empty()).map(|v| Token {
            value: v.trim().to_string(),
            source: format!("${name}"),
        })
    });
    let token = match (from_env, &args.token_file) {
        (Some(t), _) => Some(t),
        (None, Some(p)) => Some(read_token_file(p)?),
        (None, None) => None,
    };
    if let Some(t) = &token {
        // It goes into an HTTP header: control characters would not survive (and are never
        // part of a token the proxy accepts).
        if t.value.chars().any(|c| c.is_control()) {
            return Err(StatusError::TokenInvalid {
                from: t.source.clone(),
            });
        }
    }
    Ok(Target {
        addr,
        token,
        env_names,
    })
}

fn read_token_file(p: &std::path::Path) -> Result<Token, StatusError> {
    let path = p.display().to_string();
    let text = std::fs::read_to_string(p).map_err(|source| StatusError::TokenFile {
        path: path.clone(),
        source,
    })?;
    let value = text.trim().to_string();
    if value.is_empty() {
        return Err(StatusError::TokenFileEmpty { path });
    }
    Ok(Token {
        value,
        source: format!("file {path}"),
    })
}

/// A listen address made connectable: a wildcard host (`0.0.0.0`, `[::]`) means "this host",
/// reached on loopback.
pub(crate) fn connectable(addr: &str) -> Result<String, StatusError> {
    config::check_addr(addr).map_err(|e| StatusError::Address {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    let bad = |reason: &str| StatusError::Address {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT"))?;
    match host {
        "0.0.0.0" | "" => Ok(format!("127.0.0.1:{port}")),
        "[::]" => Ok(format!("[::1]:{port}")),
        _ => Ok(addr.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn args() -> AdminArgs {
        AdminArgs {
            admin: None,
            config: None,
            token_env: None,
            token_file: None,
            timeout: Duration::from_secs(1),
            json: false,
        }
    }

    fn config_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn address_comes_from_the_flag_then_the_config_then_the_default() {
        let f = config_file("admin: {listen: 127.0.0.1:9555, token_env: MY_ADMIN}\n");
        let mut a = args();
        a.config = Some(f.path().into());
        assert_eq!(resolve(&a, |_| None).unwrap().addr, "127.0.0.1:9555");
        a.admin = Some("127.0.0.1:7000".into());
        assert_eq!(resolve(&a, |_| None).unwrap().addr, "127.0.0.1:7000");
        let f = config_file("listeners: [{listen: 127.0.0.1:4321}]\n");
        let mut a = args();
        a.config = Some(f.path().into());
        assert_eq!(resolve(&a, |_| None).unwrap().addr, DEFAULT_ADMIN);
    }

    #[test]
    fn wildcard_listen_addresses_are_reached_on_loopback() {
        assert_eq!(connectable("0.0.0.0:9464").unwrap(), "127.0.0.1:9464");
        assert_eq!(connectable("[::]:9464").unwrap(), "[::1]:9464");
        assert_eq!(connectable("10.0.0.5:9464").unwrap(), "10.0.0.5:9464");
        let e = connectable("nope").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn the_token_comes_from_the_config_variable_then_the_default_variable_then_the_file() {
        let f = config_file("admin: {listen: 127.0.0.1:9555, token_env: MY_ADMIN}\n");
        let tf = config_file("from-file\n");
        let mut a = args();
        a.config = Some(f.path().into());
        a.token_file = Some(tf.path().into());
        let both = |k: &str| match k {
            "MY_ADMIN" => Some("from-config-var".to_string()),
            DEFAULT_TOKEN_ENV => Some("from-default-var".to_string()),
            _ => None,
        };
        let t = resolve(&a, both).unwrap().token.unwrap();
        assert_eq!(
            (t.value.as_str(), t.source.as_str()),
            ("from-config-var", "$MY_ADMIN")
        );
        let default_only = |k: &str| (k == DEFAULT_TOKEN_ENV).then(|| "d".to_string());
        assert_eq!(resolve(&a, default_only).unwrap().token.unwrap().value, "d");
        // An empty variable is as good as unset: the file is used, trimmed.
        let empty = |_: &str| Some(String::new());
        let t = resolve(&a, empty).unwrap().token.unwrap();
        assert_eq!(t.value, "from-file");
        assert!(t.source.starts_with("file "), "{}", t.source);
        // --token-env replaces both variables.
        a.token_env = Some("OTHER".into());
        a.token_file = None;
        assert!(resolve(&a, both).unwrap().token.is_none());
        let t = resolve(&a, |k| (k == "OTHER").then(|| "o".into())).unwrap();
        assert_eq!(t.token.unwrap().value, "o");
    }

    #[test]
    fn token_file_problems_are_errors_and_debug_never_shows_a_token() {
        let mut a = args();
        let f = config_file("listeners: [{listen: 127.0.0.1:4321}]\n");
        a.config = Some(f.path().into());
        a.token_file = Some("/nonexistent/copilot-lb-token".into());
        let e = resolve(&a, |_| None).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains("/nonexistent/copilot-lb-token"),
            "{e}"
        );
        let empty = config_file("\n\n");
        a.token_file = Some(empty.path().into());
        assert!(matches!(
            resolve(&a, |_| None).unwrap_err(),
            StatusError::TokenFileEmpty { .. }
        ));
        a.token_file = None;
        let t = resolve(&a, |_| Some("s3cret-value".into())).unwrap();
        assert!(!format!("{t:?}").contains("s3cret"), "{t:?}");
        assert!(!t.token_hint().contains("s3cret"));
    }

    #[test]
    fn the_hint_without_a_token_names_every_variable_looked_at() {
        let f = config_file("admin: {listen: 127.0.0.1:9555, token_env: MY_ADMIN}\n");
        let mut a = args();
        a.config = Some(f.path().into());
        let h = resolve(&a, |_| None).unwrap().token_hint();
        assert!(
            h.contains("$MY_ADMIN") && h.contains(DEFAULT_TOKEN_ENV),
            "{h}"
        );
    }

    #[test]
    fn a_broken_config_is_an_error_with_its_place() {
        let f = config_file("admin: {listen: 127.0.0.1:9555, bogus: 1}\n");
        let mut a = args();
        a.config = Some(f.path().into());
        let e = resolve(&a, |_| None).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
