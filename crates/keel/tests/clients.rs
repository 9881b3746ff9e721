//! `app.client(name)`: built from `[clients.<name>]`, shared, and a clear error for a typo.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use keel::{App, Error, Sources};

#[test]
fn clients_come_from_config_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keel.toml");
    std::fs::write(
        &file,
        "[clients.inventory]\nendpoints = [\"127.0.0.1:7001\"]\nprotocol = \"h2c\"\n",
    )
    .unwrap();
    let sources = Sources {
        file: Some(file),
        sets: vec![],
    };
    let loaded = sources.load_with_env(Vec::new()).unwrap();
    let sizing = keel::runtime::detect(&loaded.value.runtime);
    let app = App::new("t", loaded, sizing);

    let a = app.client("inventory").unwrap();
    let b = app.client("inventory").unwrap();
    assert!(Arc::ptr_eq(&a, &b), "one client per upstream, shared");

    let err = app.client("inventroy").unwrap_err();
    assert!(matches!(err, Error::UnknownClient(..)));
    let msg = err.to_string();
    assert!(
        msg.contains("inventroy") && msg.contains("inventory"),
        "{msg}"
    );
}
