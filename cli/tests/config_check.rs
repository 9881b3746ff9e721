//! `keel config check` as a user runs it: exit codes and the error text for each kind of mistake.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

fn check(contents: &str, name: &str, env: &[(&str, &str)]) -> (Output, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    let mut cmd = Command::new(KEEL);
    cmd.args(["config", "check"]).arg(&path);
    // Keep the developer's own KEEL_* variables out of the test.
    for (k, _) in std::env::vars() {
        if k.starts_with("KEEL_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

#[test]
fn a_valid_file_prints_the_effective_config_and_its_hash() {
    let (out, stdout, _) = check("[server]\nmax_body_bytes = \"1MiB\"\n", "keel.toml", &[]);
    assert!(out.status.success());
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(stdout.contains("# hash: "), "{stdout}");
    assert!(stdout.contains("max_body_bytes = \"1MiB\""), "{stdout}");
    // Defaults are shown too: the output is the whole effective config.
    assert!(stdout.contains("idle_timeout = \"1m15s\""), "{stdout}");
}

#[test]
fn a_bad_value_names_key_value_layer_and_reason() {
    let (out, _, stderr) = check(
        "[server]\nheader_read_timeout = \"fast\"\n",
        "keel.toml",
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    for needle in [
        "server.header_read_timeout",
        "\"fast\"",
        "keel.toml",
        "needs a unit",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in: {stderr}");
    }
}

#[test]
fn a_semantic_violation_is_reported_with_its_reason() {
    let (out, _, stderr) = check("server:\n  max_header_bytes: 4KiB\n", "keel.yaml", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("server.max_header_bytes") && stderr.contains("at least 8KiB"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_key_gets_a_did_you_mean_hint() {
    let (out, _, stderr) = check(
        "[server]\naddress = \"0.0.0.0:80\"\nbaclog = 10\n[admn]\nenabled = true\n",
        "keel.toml",
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("unknown key `server.address`"), "{stderr}");
    assert!(stderr.contains("did you mean `server.addr`"), "{stderr}");
    assert!(stderr.contains("did you mean `server.backlog`"), "{stderr}");
    // Every unknown key is reported at once, not one per attempt.
    assert!(
        stderr.contains("`admn`") && stderr.contains("did you mean `admin`"),
        "{stderr}"
    );
}

#[test]
fn a_malformed_file_reports_path_and_line() {
    let (out, _, stderr) = check(
        "[server]\naddr = \"0.0.0.0:80\nbacklog = 5\n",
        "broken.toml",
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("broken.toml") && stderr.contains("TOML") && stderr.contains("line 2"),
        "{stderr}"
    );
}

#[test]
fn a_missing_file_is_an_error() {
    let out = Command::new(KEEL)
        .args(["config", "check", "/nonexistent/keel.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/keel.toml"));
}

#[test]
fn env_overrides_the_file_and_flags_override_env() {
    let (out, stdout, _) = check(
        "[server]\nbacklog = 100\nmax_headers = 50\n",
        "keel.toml",
        &[
            ("KEEL_SERVER__BACKLOG", "200"),
            ("KEEL_SERVER__MAX_HEADERS", "60"),
        ],
    );
    assert!(out.status.success());
    assert!(stdout.contains("backlog = 200"), "{stdout}");
    assert!(stdout.contains("max_headers = 60"), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(&path, "[server]\nbacklog = 100\n").unwrap();
    let out = Command::new(KEEL)
        .args(["config", "check"])
        .arg(&path)
        .args(["--set", "server.backlog=300"])
        .env("KEEL_SERVER__BACKLOG", "200")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("backlog = 300"), "{stdout}");
}
