//! Every config key is documented: `docs/operations.md` must name each `section.key` of the
//! root config, so adding a key without documenting it fails CI.
#![allow(clippy::unwrap_used)]

fn leaf_keys(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_keys(&p, v, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn every_config_key_is_in_operations_md() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/operations.md"
    ))
    .expect("docs/operations.md exists");
    let mut keys = Vec::new();
    leaf_keys(
        "",
        &serde_json::to_value(keel::Config::default()).unwrap(),
        &mut keys,
    );
    assert!(keys.len() > 20, "flattening found too few keys: {keys:?}");
    // `clients` is an open map, empty by default: document one entry's keys.
    keys.retain(|k| k != "clients");
    leaf_keys(
        "clients.<name>",
        &serde_json::to_value(keel_client::config::UpstreamSettings::default()).unwrap(),
        &mut keys,
    );
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(missing.is_empty(), "undocumented config keys: {missing:?}");
}
