//! Route table: host and path-prefix rules, first match wins.

use crate::config::{Config, Route};

/// Compiled routes: each rule resolved to an upstream index.
#[derive(Debug, Clone)]
pub struct RouteTable {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    /// Lowercased host without port; `None` matches any host. A leading
    /// `*.` matches any subdomain.
    host: Option<String>,
    path_prefix: String,
    upstream: usize,
}

impl RouteTable {
    /// Builds the table; routes naming unknown upstreams were rejected by
    /// config validation, so they are skipped here. No routes = everything to
    /// the first upstream.
    pub fn new(cfg: &Config) -> Self {
        let index = |name: &str| cfg.upstreams.iter().position(|u| u.name == name);
        let mut rules: Vec<Rule> = cfg
            .routes
            .iter()
            .filter_map(|r: &Route| {
                Some(Rule {
                    host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                    path_prefix: r.path_prefix.clone(),
                    upstream: index(&r.upstream)?,
                })
            })
            .collect();
        if cfg.routes.is_empty() {
            rules.push(Rule {
                host: None,
                path_prefix: "/".into(),
                upstream: 0,
            });
        }
        Self { rules }
    }

    /// The upstream index for a request, or `None` when no rule matches (404).
    pub fn route(&self, host: &str, path: &str) -> Option<usize> {
        let host = host.to_ascii_lowercase();
        self.rules
            .iter()
            .find(|r| {
                let host_ok = match &r.host {
                    None => true,
                    Some(h) if h.starts_with("*.") => host.ends_with(&h[1..]),
                    Some(h) => *h == host,
                };
                host_ok && path.starts_with(&r.path_prefix)
            })
            .map(|r| r.upstream)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{Backend, Upstream};

    fn cfg(routes: Vec<Route>) -> Config {
        let b = |p: u16| Backend::new(std::net::SocketAddr::from(([127, 0, 0, 1], p)));
        let mut c = Config::minimal(vec![
            Upstream::new("a", vec![b(1)]),
            Upstream::new("b", vec![b(2)]),
        ]);
        c.routes = routes;
        c
    }

    fn route(host: Option<&str>, prefix: &str, up: &str) -> Route {
        Route {
            host: host.map(Into::into),
            path_prefix: prefix.into(),
            upstream: up.into(),
        }
    }

    #[test]
    fn no_routes_send_everything_to_first_upstream() {
        let t = RouteTable::new(&cfg(vec![]));
        assert_eq!(t.route("any", "/x"), Some(0));
    }

    #[test]
    fn first_match_wins_by_host_and_prefix() {
        let t = RouteTable::new(&cfg(vec![
            route(Some("api.example.com"), "/v2", "b"),
            route(Some("*.example.com"), "/", "a"),
            route(None, "/static", "b"),
        ]));
        assert_eq!(t.route("API.example.com", "/v2/x"), Some(1));
        assert_eq!(t.route("api.example.com", "/v1"), Some(0));
        assert_eq!(t.route("www.example.com", "/"), Some(0));
        assert_eq!(t.route("other.org", "/static/a.css"), Some(1));
        assert_eq!(t.route("other.org", "/"), None);
    }
}
