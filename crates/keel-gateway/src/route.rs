//! Routes: which upstream cluster a request goes to, and with what path.
//!
//! A route matches on the host, the path (a prefix, an exact path or a template), the method
//! and headers; **the first route that matches wins**, in the order they are written, so put
//! the narrow routes before the broad ones. Every match runs on the path after
//! [`crate::path::normalize`], so `/api/users/../admin` is `/admin` before any route sees it.
//!
//! - `prefix = "/api/users"` matches `/api/users` and everything below it (`/api/users/…`),
//!   never `/api/usersX`: a prefix without a trailing `/` ends at a segment boundary. With a
//!   trailing `/` (`"/api/users/"`) it matches what is below only.
//! - `exact = "/healthz"` matches that path alone.
//! - `template = "/api/users/{id}/orders"`: `{name}` matches one non-empty segment,
//!   `{*name}` (last only) the rest of the path, possibly empty.
//! - `rewrite` replaces what matched: the prefix (`/api/users` → `/users` sends
//!   `/api/users/u1` as `/users/u1`), the exact path, or the whole path of a template, where
//!   `{name}` inserts what that variable captured. No rewrite: the path goes as it came.
//! - `methods = ["GET", "HEAD"]` (none: any), `headers = { "content-type" = "application/grpc" }`
//!   (the value `"*"`: present with any value), `host = "api.example.com"` or
//!   `"*.example.com"` (compared without the port, case-insensitively; none: any).

use std::borrow::Cow;
use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};

/// One route as written in config (`[[gateway.routes]]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// A name for logs and metrics (default: the path pattern).
    pub name: String,
    /// Host to match (`"*.example.com"` for any subdomain); empty: any.
    pub host: String,
    /// Path prefix, ending at a segment boundary.
    pub prefix: String,
    /// Exact path.
    pub exact: String,
    /// Path template with `{var}` and a final `{*rest}`.
    pub template: String,
    /// Methods to match; empty: any.
    pub methods: Vec<String>,
    /// Headers that must be present, with this value or (`"*"`) any.
    pub headers: BTreeMap<String, String>,
    /// The upstream: a client named in `[clients.<name>]`.
    pub cluster: String,
    /// What replaces the matched path (see the module docs); empty: forwarded as it came.
    pub rewrite: String,
    /// Scope family a caller needs: `"users"` asks for `users:read` on GET, HEAD and
    /// OPTIONS and `users:write` on other methods (`users:*` grants both); empty: none
    /// beyond a valid credential.
    pub scope: String,
    /// No credential needed at all (health pages, public assets).
    pub public: bool,
    /// Most time a request on this route may take upstream (`"2s"`): the request's
    /// deadline is brought forward to it, travels to the upstream as such, and when it
    /// passes the gateway answers 504. None: the request's own deadline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<keel_config::Duration>,
    /// How failed calls on this route are retried: `"client"` (the cluster's settings),
    /// `"idempotent"` (any failure, as for an idempotent upstream — for read routes of a
    /// cluster that also takes writes) or `"never"` (one attempt). Retries stay within the
    /// deadline and the cluster's retry budget either way.
    pub retry: RouteRetry,
}

/// `retry` of a route.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteRetry {
    /// The cluster's own settings.
    #[default]
    Client,
    /// Any failure may be retried.
    Idempotent,
    /// One attempt only.
    Never,
}

/// A config that does not make a route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {index} ({name}): {field} = {value:?}: {reason}")]
pub struct RouteError {
    /// Its position in the list, from 0.
    pub index: usize,
    /// Its name or pattern.
    pub name: String,
    /// The offending key.
    pub field: &'static str,
    /// Its value.
    pub value: String,
    /// Why it is refused.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// Without a trailing `/`; `open` when the config had one (then only what is below).
    Prefix {
        prefix: String,
        open: bool,
    },
    Exact(String),
    Template(Vec<Part>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(String),
    Rest(String),
}

#[derive(Debug, Clone)]
enum HostMatch {
    Any,
    Exact(String),
    /// `.example.com` for `*.example.com`.
    Suffix(String),
}

/// A route, ready to match.
#[derive(Debug, Clone)]
pub struct Route {
    name: String,
    host: HostMatch,
    pattern: Pattern,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, Option<HeaderValue>)>,
    cluster: String,
    rewrite: Option<String>,
    scope: Option<String>,
    public: bool,
    timeout: Option<std::time::Duration>,
    retry: RouteRetry,
}

impl Route {
    /// The route's name (or its pattern when it has none).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cluster it sends to.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The scope family it needs, if any.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// Its own time limit, if it has one.
    pub fn timeout(&self) -> Option<std::time::Duration> {
        self.timeout
    }

    /// How its calls are retried.
    pub fn retry(&self) -> RouteRetry {
        self.retry
    }

    /// Whether it needs no credential.
    pub fn is_public(&self) -> bool {
        self.public
    }

    /// The scope `method` needs on this route: `<family>:read` for safe methods,
    /// `<family>:write` for the rest.
    pub fn needs(&self, method: &Method) -> Option<(&str, &'static str)> {
        let family = self.scope.as_deref()?;
        let what = if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            "read"
        } else {
            "write"
        };
        Some((family, what))
    }

    fn compile(index: usize, c: &RouteConfig) -> Result<Route, RouteError> {
        let shown = if !c.name.is_empty() {
            c.name.clone()
        } else {
            [&c.prefix, &c.exact, &c.template]
                .into_iter()
                .find(|p| !p.is_empty())
                .cloned()
                .unwrap_or_default()
        };
        let err = |field: &'static str, value: &str, reason: &str| RouteError {
            index,
            name: shown.clone(),
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        };
        let set = [
            ("prefix", &c.prefix),
            ("exact", &c.exact),
            ("template", &c.template),
        ];
        let mut given = set.iter().filter(|(_, v)| !v.is_empty());
        let Some((field, path)) = given.next() else {
            return Err(err(
                "prefix",
                "",
                "a route needs one of prefix, exact or template",
            ));
        };
        if let Some((other, _)) = given.next() {
            return Err(err(
                other,
                "",
                &format!("a route has one path pattern, and {field} is set too"),
            ));
        }
        if !path.starts_with('/') {
            return Err(err(field, path, "must start with /"));
        }
        // A pattern is compared with normalised paths, so one that normalisation would change
        // could never match (or worse, match something else than it says).
        let policy = crate::path::PathPolicy::default();
        let plain = path.replace(['{', '}', '*'], "x");
        match crate::path::normalize(&plain, &policy) {
            Ok(n) if n == plain => {}
            _ => {
                return Err(err(
                    field,
                    path,
                    "must be a normalised path: no dot-segments, escapes, `//` or control bytes",
                ));
            }
        }
        let pattern = match *field {
            "prefix" => {
                let open = path.len() > 1 && path.ends_with('/');
                let prefix = if path.as_str() == "/" {
                    String::new()
                } else {
                    path.trim_end_matches('/').to_string()
                };
                Pattern::Prefix { prefix, open }
            }
            "exact" => Pattern::Exact(path.to_string()),
            _ => Pattern::Template(parse_template(path).map_err(|r| err("template", path, r))?),
        };
        if !c.rewrite.is_empty() {
            if !c.rewrite.starts_with('/') {
                return Err(err("rewrite", &c.rewrite, "must start with /"));
            }
            if let Pattern::Template(parts) = &pattern {
                for var in vars_in(&c.rewrite).map_err(|r| err("rewrite", &c.rewrite, r))? {
                    let known = parts
                        .iter()
                        .any(|p| matches!(p, Part::Var(v) | Part::Rest(v) if v == var));
                    if !known {
                        return Err(err(
                            "rewrite",
                            &c.rewrite,
                            &format!("{{{var}}} is not a variable of the template"),
                        ));
                    }
                }
            } else if c.rewrite.contains(['{', '}']) {
                return Err(err("rewrite", &c.rewrite, "variables need a template"));
            }
        }
        let host = match c.host.to_ascii_lowercase() {
            h if h.is_empty() => HostMatch::Any,
            h => match h.strip_prefix("*.") {
                Some(rest) if !rest.is_empty() && !rest.contains('*') => {
                    HostMatch::Suffix(format!(".{rest}"))
                }
                _ if h.contains('*') || h.contains(':') || h.contains('/') => {
                    return Err(err(
                        "host",
                        &c.host,
                        "a host name, or *.domain for its subdomains (no port)",
                    ));
                }
                _ => HostMatch::Exact(h),
            },
        };
        let methods = c
            .methods
            .iter()
            .map(|m| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| err("methods", m, "not an HTTP method"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let headers = c
            .headers
            .iter()
            .map(|(name, value)| {
                let n = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| err("headers", name, "not a header name"))?;
                let v = if value == "*" {
                    None
                } else {
                    Some(
                        HeaderValue::from_str(value)
                            .map_err(|_| err("headers", value, "not a header value"))?,
                    )
                };
                Ok((n, v))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if c.cluster.is_empty() {
            return Err(err(
                "cluster",
                "",
                "every route names the client (a [clients.<name>]) it sends to",
            ));
        }
        if let Some(t) = c.timeout
            && std::time::Duration::from(t).is_zero()
        {
            return Err(err(
                "timeout",
                "0s",
                "must be longer than zero (leave it out for the request's own deadline)",
            ));
        }
        if c.public && !c.scope.is_empty() {
            return Err(err(
                "scope",
                &c.scope,
                "a public route checks no credential, so it cannot ask for a scope",
            ));
        }
        Ok(Route {
            name: shown,
            host,
            pattern,
            methods,
            headers,
            cluster: c.cluster.clone(),
            rewrite: (!c.rewrite.is_empty()).then(|| c.rewrite.clone()),
            scope: (!c.scope.is_empty()).then(|| c.scope.clone()),
            public: c.public,
            timeout: c.timeout.map(Into::into),
            retry: c.retry,
        })
    }

    /// The path this route forwards `path` as, when it matches it.
    fn path_match<'p>(&self, path: &'p str) -> Option<Cow<'p, str>> {
        match &self.pattern {
            Pattern::Prefix { prefix, open } => {
                let rest = path.strip_prefix(prefix.as_str())?;
                let at_boundary = if *open {
                    rest.starts_with('/')
                } else {
                    rest.is_empty() || rest.starts_with('/') || prefix.is_empty()
                };
                if !at_boundary {
                    return None;
                }
                Some(match &self.rewrite {
                    None => Cow::Borrowed(path),
                    Some(to) => {
                        let to = to.trim_end_matches('/');
                        let mut out = String::with_capacity(to.len() + rest.len() + 1);
                        out.push_str(to);
                        out.push_str(rest);
                        if out.is_empty() {
                            out.push('/');
                        }
                        Cow::Owned(out)
                    }
                })
            }
            Pattern::Exact(p) => (p == path).then(|| match &self.rewrite {
                None => Cow::Borrowed(path),
                Some(to) => Cow::Owned(to.clone()),
            }),
            Pattern::Template(parts) => {
                let captured = match_template(parts, path)?;
                Some(match &self.rewrite {
                    None => Cow::Borrowed(path),
                    Some(to) => Cow::Owned(fill(to, &captured)),
                })
            }
        }
    }

    fn host_matches(&self, host: Option<&str>) -> bool {
        let want = match &self.host {
            HostMatch::Any => return true,
            other => other,
        };
        let Some(host) = host else { return false };
        // Without the port; an IPv6 literal keeps its brackets.
        let name = match host.rsplit_once(':') {
            Some((h, port))
                if !port.is_empty()
                    && port.bytes().all(|b| b.is_ascii_digit())
                    && (!h.contains(':') || h.ends_with(']')) =>
            {
                h
            }
            _ => host,
        };
        match want {
            HostMatch::Exact(h) => name.eq_ignore_ascii_case(h),
            HostMatch::Suffix(s) => {
                name.len() > s.len() && name[name.len() - s.len()..].eq_ignore_ascii_case(s)
            }
            HostMatch::Any => true,
        }
    }
}

fn parse_template(t: &str) -> Result<Vec<Part>, &'static str> {
    let mut parts = Vec::new();
    let segments: Vec<&str> = t[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut literal = String::new();
    for (i, seg) in segments.iter().enumerate() {
        match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(var) => {
                let (rest, name) = match var.strip_prefix('*') {
                    Some(n) => (true, n),
                    None => (false, var),
                };
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err("a variable is {name} or {*name}, the name letters, digits and _");
                }
                if rest && i != last {
                    return Err("{*name} must be the last segment");
                }
                literal.push('/');
                parts.push(Part::Literal(std::mem::take(&mut literal)));
                parts.push(if rest {
                    Part::Rest(name.to_string())
                } else {
                    Part::Var(name.to_string())
                });
            }
            None if seg.contains(['{', '}']) => return Err("a variable takes a whole segment"),
            None => {
                literal.push('/');
                literal.push_str(seg);
            }
        }
    }
    if !literal.is_empty() {
        parts.push(Part::Literal(literal));
    }
    Ok(parts)
}

fn vars_in(rewrite: &str) -> Result<Vec<&str>, &'static str> {
    let mut out = Vec::new();
    let mut rest = rewrite;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').ok_or("an unclosed {")? + open;
        out.push(rest[open + 1..close].trim_start_matches('*'));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err("a } without {");
    }
    Ok(out)
}

fn match_template<'r, 'p>(parts: &'r [Part], path: &'p str) -> Option<Vec<(&'r str, &'p str)>> {
    let mut captured = Vec::new();
    let mut rest = path;
    for part in parts {
        match part {
            Part::Literal(l) => rest = rest.strip_prefix(l.as_str())?,
            Part::Var(name) => {
                let end = rest.find('/').unwrap_or(rest.len());
                if end == 0 {
                    return None;
                }
                captured.push((name.as_str(), &rest[..end]));
                rest = &rest[end..];
            }
            Part::Rest(name) => {
                captured.push((name.as_str(), rest));
                rest = "";
            }
        }
    }
    rest.is_empty().then_some(captured)
}

/// `to` with each `{name}` (or `{*name}`) replaced by what it captured. Captures come from a
/// normalised path, so they hold no dot-segment that could climb out of `to`.
fn fill(to: &str, captured: &[(&str, &str)]) -> String {
    let mut out =
        String::with_capacity(to.len() + captured.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut rest = to;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').map_or(rest.len(), |c| c + open);
        let name = rest[open + 1..close].trim_start_matches('*');
        if let Some((_, v)) = captured.iter().find(|(n, _)| *n == name) {
            out.push_str(v);
        }
        rest = rest.get(close + 1..).unwrap_or("");
    }
    out.push_str(rest);
    // `/users/{*rest}` with an empty rest leaves `/users/`; two slashes never come out.
    while out.contains("//") {
        out = out.replace("//", "/");
    }
    out
}

/// The routes of a gateway, in order.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

/// A request's route and the path to forward.
#[derive(Debug)]
pub struct Matched<'r, 'p> {
    /// The route.
    pub route: &'r Route,
    /// The path the upstream gets.
    pub path: Cow<'p, str>,
}

impl Routes {
    /// Compile `configs`; the first that does not make a route is the error.
    pub fn new(configs: &[RouteConfig]) -> Result<Routes, RouteError> {
        let routes = configs
            .iter()
            .enumerate()
            .map(|(i, c)| Route::compile(i, c))
            .collect::<Result<_, _>>()?;
        Ok(Routes { routes })
    }

    /// Every route, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// The first route matching the request. `path` must be normalised
    /// ([`crate::path::normalize`]); `host` is the request's `Host` (or `:authority`).
    pub fn find<'r, 'p>(
        &'r self,
        host: Option<&str>,
        method: &Method,
        path: &'p str,
        headers: &HeaderMap,
    ) -> Option<Matched<'r, 'p>> {
        self.routes.iter().find_map(|route| {
            if !route.methods.is_empty() && !route.methods.contains(method) {
                return None;
            }
            if !route.host_matches(host) {
                return None;
            }
            let headers_match = route
                .headers
                .iter()
                .all(|(n, v)| match (headers.get(n), v) {
                    (Some(_), None) => true,
                    (Some(got), Some(want)) => got == want,
                    (None, _) => false,
                });
            if !headers_match {
                return None;
            }
            let path = route.path_match(path)?;
            Some(Matched { route, path })
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route(f: impl FnOnce(&mut RouteConfig)) -> RouteConfig {
        let mut c = RouteConfig {
            cluster: "up".into(),
            ..RouteConfig::default()
        };
        f(&mut c);
        c
    }

    fn find(routes: &Routes, method: Method, path: &str) -> Option<(String, String)> {
        routes
            .find(
                Some("api.example.com:8443"),
                &method,
                path,
                &HeaderMap::new(),
            )
            .map(|m| (m.route.name().to_string(), m.path.into_owned()))
    }

    #[test]
    fn a_prefix_ends_at_a_segment_boundary_and_is_rewritten() {
        let routes = Routes::new(&[route(|c| {
            c.prefix = "/api/users".into();
            c.rewrite = "/users".into();
        })])
        .unwrap();
        let path = |p: &str| find(&routes, Method::GET, p).map(|(_, p)| p);
        assert_eq!(path("/api/users"), Some("/users".into()));
        assert_eq!(path("/api/users/"), Some("/users/".into()));
        assert_eq!(path("/api/users/u1"), Some("/users/u1".into()));
        assert_eq!(path("/api/usersX"), None);
        assert_eq!(path("/api/user"), None);
        assert_eq!(path("/api"), None);

        let open = Routes::new(&[route(|c| c.prefix = "/static/".into())]).unwrap();
        assert!(find(&open, Method::GET, "/static/a.css").is_some());
        assert!(find(&open, Method::GET, "/static").is_none());
        let root = Routes::new(&[route(|c| {
            c.prefix = "/".into();
            c.rewrite = "/v2".into();
        })])
        .unwrap();
        assert_eq!(find(&root, Method::GET, "/a/b").unwrap().1, "/v2/a/b");
    }

    #[test]
    fn the_first_match_wins_and_methods_hosts_and_headers_narrow_it() {
        let routes = Routes::new(&[
            route(|c| {
                c.name = "grpc".into();
                c.prefix = "/api".into();
                c.headers
                    .insert("content-type".into(), "application/grpc".into());
            }),
            route(|c| {
                c.name = "writes".into();
                c.prefix = "/api".into();
                c.methods = vec!["post".into(), "PUT".into()];
            }),
            route(|c| {
                c.name = "other-host".into();
                c.prefix = "/api".into();
                c.host = "*.other.org".into();
            }),
            route(|c| {
                c.name = "this-host".into();
                c.prefix = "/api".into();
                c.host = "API.example.com".into();
            }),
            route(|c| {
                c.name = "any".into();
                c.prefix = "/".into();
            }),
        ])
        .unwrap();
        let name = |m: Method, p: &str| find(&routes, m, p).unwrap().0;
        assert_eq!(name(Method::POST, "/api/x"), "writes");
        assert_eq!(name(Method::GET, "/api/x"), "this-host");
        assert_eq!(name(Method::GET, "/other"), "any");
        let mut grpc = HeaderMap::new();
        grpc.insert("content-type", HeaderValue::from_static("application/grpc"));
        let m = routes.find(None, &Method::POST, "/api/x", &grpc).unwrap();
        assert_eq!(m.route.name(), "grpc");
        let m = routes
            .find(
                Some("a.b.other.org"),
                &Method::GET,
                "/api/x",
                &HeaderMap::new(),
            )
            .unwrap();
        assert_eq!(m.route.name(), "other-host");
        let m = routes
            .find(Some("other.org"), &Method::GET, "/api/x", &HeaderMap::new())
            .unwrap();
        assert_eq!(m.route.name(), "any", "*.other.org is its subdomains only");
    }

    #[test]
    fn templates_capture_segments_and_fill_the_rewrite() {
        let routes = Routes::new(&[
            route(|c| {
                c.template = "/api/users/{id}/orders/{*rest}".into();
                c.rewrite = "/orders/{rest}?user={id}".into();
            }),
            route(|c| {
                c.template = "/api/users/{id}".into();
                c.rewrite = "/users/{id}".into();
            }),
        ])
        .unwrap();
        let path = |p: &str| find(&routes, Method::GET, p).map(|(_, p)| p);
        assert_eq!(path("/api/users/u1"), Some("/users/u1".into()));
        assert_eq!(
            path("/api/users/u1/orders/o9"),
            Some("/orders/o9?user=u1".into())
        );
        assert_eq!(
            path("/api/users/u1/orders/"),
            Some("/orders/?user=u1".into())
        );
        assert_eq!(path("/api/users/"), None, "{{id}} is one non-empty segment");
        assert_eq!(path("/api/users/u1/x"), None);
    }

    #[test]
    fn bad_routes_are_refused_with_the_key_value_and_reason() {
        let err = |f: fn(&mut RouteConfig)| Routes::new(&[route(f)]).unwrap_err().to_string();
        assert!(err(|_| {}).contains("needs one of prefix, exact or template"));
        assert!(
            err(|c| {
                c.prefix = "/a".into();
                c.exact = "/b".into();
            })
            .contains("exact")
        );
        assert!(err(|c| c.prefix = "api".into()).contains("must start with /"));
        assert!(err(|c| c.prefix = "/api/../admin".into()).contains("normalised"));
        assert!(err(|c| c.prefix = "/api//x".into()).contains("normalised"));
        assert!(err(|c| c.prefix = "/a%2Fb".into()).contains("normalised"));
        assert!(err(|c| c.template = "/a/{*rest}/b".into()).contains("last segment"));
        assert!(err(|c| c.template = "/a/x{id}".into()).contains("whole segment"));
        assert!(
            err(|c| {
                c.template = "/a/{id}".into();
                c.rewrite = "/b/{name}".into();
            })
            .contains("{name} is not a variable")
        );
        assert!(
            err(|c| {
                c.prefix = "/a".into();
                c.cluster = String::new();
            })
            .contains("cluster")
        );
        assert!(
            err(|c| {
                c.prefix = "/a".into();
                c.methods = vec!["GE T".into()];
            })
            .contains("not an HTTP method")
        );
        assert!(
            err(|c| {
                c.prefix = "/a".into();
                c.host = "example.com:80".into();
            })
            .contains("no port")
        );
        let e = err(|c| {
            c.prefix = "/a".into();
            c.public = true;
            c.scope = "users".into();
        });
        assert!(e.contains("route 0 (/a): scope = \"users\""), "{e}");
    }

    #[test]
    fn scopes_follow_the_method() {
        let routes = Routes::new(&[route(|c| {
            c.prefix = "/a".into();
            c.scope = "users".into();
        })])
        .unwrap();
        let r = routes.iter().next().unwrap();
        assert_eq!(r.needs(&Method::GET), Some(("users", "read")));
        assert_eq!(r.needs(&Method::HEAD), Some(("users", "read")));
        assert_eq!(r.needs(&Method::DELETE), Some(("users", "write")));
        assert_eq!(
            r.needs(&Method::from_bytes(b"PURGE").unwrap()),
            Some(("users", "write"))
        );
    }

    proptest! {
        /// Whatever a client sends, once normalised, a prefix route forwards nothing but
        /// its rewrite target and what lay below its prefix.
        #[test]
        fn a_prefix_route_never_widens(raw in "(/(\\.|\\.\\.|%2e|%2E|%2f|users|api|[a-z]{1,3}|;|\\\\)){0,8}/?") {
            let routes = Routes::new(&[route(|c| {
                c.prefix = "/api/users".into();
                c.rewrite = "/users".into();
            })]).unwrap();
            if let Ok(path) = crate::path::normalize(&raw, &crate::path::PathPolicy::default()) {
                if let Some(m) = routes.find(None, &Method::GET, &path, &HeaderMap::new()) {
                    prop_assert!(path == "/api/users" || path.starts_with("/api/users/"), "{path}");
                    prop_assert!(m.path == "/users" || m.path.starts_with("/users/"), "{}", m.path);
                    prop_assert!(!m.path.split('/').any(|s| s == ".." || s == "."), "{}", m.path);
                }
            }
        }
    }
}
