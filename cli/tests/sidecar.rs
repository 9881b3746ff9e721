//! Sidecar mode: `keel gateway` beside a service that is not written with Keel (Python's
//! `http.server`, `tests/sidecar/app.py`). Inbound, a sidecar in front of the app gives it
//! Keel's server (deadlines, trace context, limits, probes, metrics); outbound, the app calls
//! `127.0.0.1:<port>/users/…` and a second sidecar makes the call with Keel's client
//! (balancing, retries with a budget, breaking, deadline and trace propagation). The app only
//! passes the trace and deadline headers it got on to its own calls, as it would behind
//! Envoy or Linkerd.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use keel_test_support::{ChildGuard, free_addr, port_open, raw_exchange, status_of, wait_until};

const KEEL: &str = env!("CARGO_BIN_EXE_keel");
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn python(port: u16, out: u16, role: &str) -> ChildGuard {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sidecar/app.py");
    ChildGuard::spawn(
        "python3",
        &[script, &port.to_string(), &out.to_string(), role],
        &[],
    )
}

fn sidecar(dir: &std::path::Path, name: &str, config: String) -> ChildGuard {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, config).unwrap();
    ChildGuard::spawn(KEEL, &["gateway", "--config", file.to_str().unwrap()], &[])
}

fn get(addr: SocketAddr, path: &str, extra: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nhost: svc\r\n{extra}connection: close\r\n\r\n");
    let raw = raw_exchange(addr, req.as_bytes(), Duration::from_secs(10)).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status_of(&raw).unwrap_or(0), body)
}

/// A `keel-timeout` value in milliseconds.
fn millis(v: &str) -> u64 {
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().unwrap();
    match unit {
        "u" => n / 1_000,
        "m" => n,
        "S" => n * 1_000,
        other => panic!("unit {other} in {v}"),
    }
}

#[test]
fn a_python_service_gets_keels_server_and_client_from_two_sidecars() {
    let dir = tempfile::tempdir().unwrap();
    let (app, echo, dead) = (free_addr(), free_addr(), free_addr());
    let (inbound, outbound) = (free_addr(), free_addr());
    let (admin_in, admin_out) = (free_addr(), free_addr());
    let _echo = python(echo.port(), 0, "echo");
    let _app = python(app.port(), outbound.port(), "app");
    // In front of the app: everything under / goes to it, within 2 s.
    let _inbound = sidecar(
        dir.path(),
        "inbound",
        format!(
            "[server]\naddr = \"{inbound}\"\n\n[admin]\naddr = \"{admin_in}\"\n\n\
             [clients.app]\nendpoints = [\"{app}\"]\n\n\
             [[gateway.routes]]\nprefix = \"/\"\ncluster = \"app\"\npublic = true\ntimeout = \"2s\"\n"
        ),
    );
    // Beside it, for its calls: `users` has an endpoint that refuses every connection.
    let _outbound = sidecar(
        dir.path(),
        "outbound",
        format!(
            "[server]\naddr = \"{outbound}\"\n\n[admin]\naddr = \"{admin_out}\"\n\n\
             [clients.users]\nendpoints = [\"{dead}\", \"{echo}\"]\n\n\
             [[gateway.routes]]\nprefix = \"/users\"\nrewrite = \"/\"\ncluster = \"users\"\npublic = true\n"
        ),
    );
    for addr in [app, echo, inbound, outbound] {
        assert!(
            wait_until(Duration::from_secs(20), || port_open(addr)),
            "{addr} did not open"
        );
    }

    let traceparent = format!("traceparent: 00-{TRACE}-00f067aa0ba902b7-01\r\n");
    for i in 0..20 {
        let (status, body) = get(inbound, &format!("/orders/{i}"), &traceparent);
        assert_eq!(status, 200, "call {i}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let (inb, up) = (&v["inbound"], &v["upstream"]);
        // The app was called under the caller's trace, with a deadline within the route's.
        let tp = inb["traceparent"].as_str().unwrap();
        assert!(tp.contains(TRACE), "{tp}");
        assert!(
            millis(inb["keel-timeout"].as_str().unwrap()) <= 2_000,
            "{inb}"
        );
        // Its own call went out through the outbound sidecar: same trace, a shorter deadline
        // again, rewritten to the upstream's path, landing on the live endpoint.
        assert_eq!(up["path"], format!("/orders/{i}"));
        assert!(up["traceparent"].as_str().unwrap().contains(TRACE), "{up}");
        let (inbound_ms, upstream_ms) = (
            millis(inb["keel-timeout"].as_str().unwrap()),
            millis(up["keel-timeout"].as_str().unwrap()),
        );
        assert!(upstream_ms <= inbound_ms, "{inbound_ms} then {upstream_ms}");
    }
    // Calls that picked the refusing endpoint were retried on the other: none failed above,
    // and the outbound sidecar counted the retries.
    let (status, metrics) = get(admin_out, "/metrics", "");
    assert_eq!(status, 200);
    let retries: f64 = metrics
        .lines()
        .find(|l| l.starts_with("keel_client_retries_total") && l.contains("users"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(retries >= 1.0, "{metrics}");
    // The inbound sidecar answers the probes the app never wrote.
    assert_eq!(get(inbound, "/readyz", "").0, 200);
}
