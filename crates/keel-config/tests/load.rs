//! End-to-end behaviour of `Loader`: layering, provenance, error messages, redaction, hashing.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use keel_config::{ByteSize, ConfigError, Duration, Format, Loader, Validate, Validator};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct Server {
    addr: String,
    listeners: u32,
    keepalive: bool,
    header_read_timeout: Duration,
    max_body_bytes: ByteSize,
    upload_limit: ByteSize,
    allowed_origins: Vec<String>,
    ports: Vec<u16>,
    name: Option<String>,
    workers: Option<u32>,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".into(),
            listeners: 1,
            keepalive: true,
            header_read_timeout: Duration::from_secs(30),
            max_body_bytes: ByteSize::mib(1),
            // Not a whole KiB, so it serializes as an integer.
            upload_limit: ByteSize::b(1000),
            allowed_origins: vec!["https://example.com".into()],
            ports: vec![80],
            name: None,
            workers: None,
        }
    }
}

impl Validate for Server {
    fn validate(&self, v: &mut Validator) {
        v.check(
            self.listeners >= 1,
            "listeners",
            self.listeners,
            "must be at least 1",
        );
        v.check(
            !self.addr.is_empty(),
            "addr",
            format!("{:?}", self.addr),
            "must not be empty",
        );
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct Tls {
    cert: String,
    key: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct Database {
    url: String,
    password: String,
    auth_token: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct Root {
    server: Server,
    labels: BTreeMap<String, String>,
    tls: Option<Tls>,
    database: Database,
}

impl Validate for Root {
    fn validate(&self, v: &mut Validator) {
        v.nested("server", &self.server);
    }
}

fn base() -> Loader {
    Loader::defaults(&Root::default()).unwrap()
}

fn toml(loader: Loader, contents: &str) -> Loader {
    loader
        .file_contents("x.toml", Format::Toml, contents)
        .unwrap()
}

fn env(loader: Loader, vars: &[(&str, &str)]) -> Loader {
    loader.env_vars(
        "KEEL",
        vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
}

fn load_err(loader: Loader) -> ConfigError {
    loader.load::<Root>().unwrap_err()
}

fn lines(err: &ConfigError) -> Vec<String> {
    err.to_string().lines().map(str::to_owned).collect()
}

#[test]
fn defaults_only() {
    let loaded = base().load::<Root>().unwrap();
    assert_eq!(loaded.value, Root::default());
    assert_eq!(loaded.source_of("server.addr"), Some("defaults"));
    assert_eq!(loaded.source_of("server"), Some("defaults"));
    assert_eq!(loaded.source_of("server.nope"), None);
    assert_eq!(loaded.layers().len(), 1);
    assert_eq!(loaded.layers()[0].name, "defaults");
    assert_eq!(loaded.sources().count(), 0);
}

#[test]
fn toml_file_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(&path, "[server]\naddr = \"0.0.0.0:80\"\nlisteners = 4\n").unwrap();

    let loaded = base().file(&path).unwrap().load::<Root>().unwrap();
    assert_eq!(loaded.value.server.addr, "0.0.0.0:80");
    assert_eq!(loaded.value.server.listeners, 4);
    assert!(
        loaded.value.server.keepalive,
        "untouched keys keep their defaults"
    );

    let layer = format!("file {}", path.display());
    assert_eq!(loaded.source_of("server.addr"), Some(layer.as_str()));
    assert_eq!(loaded.source_of("server.keepalive"), Some("defaults"));
    assert_eq!(loaded.layers()[1].name, layer);
    assert_eq!(loaded.layers()[1].keys, 2);
}

#[test]
fn yaml_file_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.yml");
    std::fs::write(
        &path,
        "server:\n  header_read_timeout: 1m30s\n  max_body_bytes: 64KiB\n  ports: [80, 443]\n",
    )
    .unwrap();

    let loaded = base().file(&path).unwrap().load::<Root>().unwrap();
    assert_eq!(
        loaded.value.server.header_read_timeout,
        Duration::from_secs(90)
    );
    assert_eq!(loaded.value.server.max_body_bytes, ByteSize::kib(64));
    assert_eq!(loaded.value.server.ports, [80, 443]);

    let inline = base()
        .file_contents("inline.yaml", Format::Yaml, "server:\n  keepalive: false\n")
        .unwrap()
        .load::<Root>()
        .unwrap();
    assert!(!inline.value.server.keepalive);
    assert_eq!(
        inline.source_of("server.keepalive"),
        Some("file inline.yaml")
    );
}

#[test]
fn env_overrides_file_and_flag_overrides_env() {
    let loader = toml(
        base(),
        "[server]\nlisteners = 2\naddr = \"file\"\nkeepalive = false\n",
    );
    let loader = env(
        loader,
        &[
            ("KEEL_SERVER__LISTENERS", "3"),
            ("KEEL_SERVER__ADDR", "env"),
            ("KEEL_CONFIG", "/etc/keel.toml"),
            ("OTHER_SERVER__ADDR", "ignored"),
        ],
    );
    let loaded = loader
        .set("server.addr", "flag")
        .set_arg("server.max_body_bytes=2MiB")
        .unwrap()
        .load::<Root>()
        .unwrap();

    assert!(!loaded.value.server.keepalive);
    assert_eq!(loaded.value.server.listeners, 3);
    assert_eq!(loaded.value.server.addr, "flag");
    assert_eq!(loaded.value.server.max_body_bytes, ByteSize::mib(2));

    assert_eq!(loaded.source_of("server.keepalive"), Some("file x.toml"));
    assert_eq!(
        loaded.source_of("server.listeners"),
        Some("env KEEL_SERVER__LISTENERS")
    );
    assert_eq!(
        loaded.source_of("server.addr"),
        Some("flag --set server.addr")
    );
    assert_eq!(
        loaded.source_of("server.max_body_bytes"),
        Some("flag --set server.max_body_bytes")
    );
    assert_eq!(
        loaded.source_of("server.header_read_timeout"),
        Some("defaults")
    );

    let layers: Vec<_> = loaded
        .layers()
        .iter()
        .map(|l| (l.name.as_str(), l.keys))
        .collect();
    assert_eq!(
        layers,
        [
            ("defaults", 14),
            ("file x.toml", 3),
            ("env KEEL_*", 2),
            ("flags --set", 2)
        ]
    );
}

#[test]
fn unknown_key_with_and_without_hint() {
    let err = load_err(toml(base(), "[server]\nadr = \"x\"\n"));
    assert_eq!(
        err.to_string(),
        "unknown key `server.adr` (from file x.toml); did you mean `server.addr`?"
    );

    let err = load_err(toml(base(), "[server]\ncompletely_unrelated = 1\n"));
    assert_eq!(
        err.to_string(),
        "unknown key `server.completely_unrelated` (from file x.toml)"
    );

    let err = load_err(base().set("sever.addr", "x"));
    assert_eq!(
        err.to_string(),
        "unknown key `sever` (from flag --set sever.addr); did you mean `server`?"
    );
}

#[test]
fn several_unknown_keys_are_reported_together() {
    let loader = toml(
        base(),
        "labells = \"x\"\n[server]\nlistenrs = 2\nkeepalive = false\n",
    );
    let loader = env(loader, &[("KEEL_SERVER__ADDRES", "x")]);
    let err = load_err(loader.set("bogus.key", "1"));
    assert_eq!(err.problems().len(), 4, "{err}");
    assert_eq!(
        lines(&err),
        [
            "unknown key `labells` (from file x.toml); did you mean `labels`?",
            "unknown key `server.listenrs` (from file x.toml); did you mean `server.listeners`?",
            "unknown key `server.addres` (from env KEEL_SERVER__ADDRES); did you mean `server.addr`?",
            "unknown key `bogus` (from flag --set bogus.key)",
        ]
    );
}

#[test]
fn open_maps_and_unset_options_accept_any_subkeys() {
    let loader = toml(
        base(),
        "[labels]\nteam = \"core\"\n\n[tls]\ncert = \"/c.pem\"\n",
    );
    let loader = env(
        loader,
        &[("KEEL_LABELS__TIER", "1"), ("KEEL_TLS__KEY", "/k.pem")],
    );
    let loaded = loader.load::<Root>().unwrap();

    assert_eq!(loaded.value.labels["team"], "core");
    // "1" is guessed to be a number, rejected by the String map, and retried as a string.
    assert_eq!(loaded.value.labels["tier"], "1");
    assert_eq!(
        loaded.value.tls,
        Some(Tls {
            cert: "/c.pem".into(),
            key: "/k.pem".into()
        })
    );
    assert_eq!(loaded.source_of("tls.key"), Some("env KEEL_TLS__KEY"));
    assert_eq!(loaded.source_of("labels.team"), Some("file x.toml"));
}

#[test]
fn bad_env_values_name_key_value_layer_and_reason() {
    let err = load_err(env(base(), &[("KEEL_SERVER__KEEPALIVE", "maybe")]));
    let message = err.to_string();
    for part in [
        "`server.keepalive`",
        "\"maybe\"",
        "env KEEL_SERVER__KEEPALIVE",
        "expected a boolean",
    ] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }

    let err = load_err(env(base(), &[("KEEL_SERVER__LISTENERS", "abc")]));
    assert_eq!(
        err.to_string(),
        "invalid value \"abc\" for `server.listeners` (from env KEEL_SERVER__LISTENERS): expected an integer"
    );

    // Both reported at once.
    let err = load_err(env(
        base(),
        &[
            ("KEEL_SERVER__KEEPALIVE", "maybe"),
            ("KEEL_SERVER__LISTENERS", "abc"),
        ],
    ));
    assert_eq!(err.problems().len(), 2);
}

#[test]
fn bad_values_in_files_carry_serde_reasons() {
    let err = load_err(toml(base(), "[server]\nheader_read_timeout = \"fast\"\n"));
    assert_eq!(
        err.to_string(),
        "invalid value \"fast\" for `server.header_read_timeout` (from file x.toml): a duration needs a unit, e.g. \"30s\" or \"250ms\""
    );

    let err = load_err(toml(base(), "[server]\nheader_read_timeout = 30\n"));
    assert!(
        err.to_string()
            .starts_with("invalid value 30 for `server.header_read_timeout`"),
        "{err}"
    );

    let err = load_err(toml(base(), "[server]\nlisteners = \"four\"\n"));
    let message = err.to_string();
    assert!(
        message.contains("`server.listeners` (from file x.toml)"),
        "{message}"
    );
    assert!(message.contains("expected u32"), "{message}");

    let err = load_err(toml(base(), "[server]\nports = [80, \"x\"]\n"));
    assert!(
        err.to_string()
            .contains("invalid value \"x\" for `server.ports[1]` (from file x.toml)"),
        "{err}"
    );
}

#[test]
fn option_string_and_option_u32_from_env() {
    let loader = env(
        base(),
        &[("KEEL_SERVER__NAME", "123"), ("KEEL_SERVER__WORKERS", "8")],
    );
    let loaded = loader.load::<Root>().unwrap();
    assert_eq!(loaded.value.server.name.as_deref(), Some("123"));
    assert_eq!(loaded.value.server.workers, Some(8));
    assert_eq!(
        loaded.source_of("server.name"),
        Some("env KEEL_SERVER__NAME")
    );

    let err = load_err(env(base(), &[("KEEL_SERVER__WORKERS", "eight")]));
    let message = err.to_string();
    assert!(
        message.starts_with(
            "invalid value \"eight\" for `server.workers` (from env KEEL_SERVER__WORKERS): "
        ),
        "{message}"
    );

    let err = load_err(env(base(), &[("KEEL_SERVER__", "x")]));
    assert!(err.to_string().contains("invalid key `server.`"), "{err}");
}

#[test]
fn comma_lists_from_env_and_flags() {
    let loaded = env(
        base(),
        &[(
            "KEEL_SERVER__ALLOWED_ORIGINS",
            "https://a.example, https://b.example",
        )],
    )
    .set("server.ports", "80,443")
    .load::<Root>()
    .unwrap();
    assert_eq!(
        loaded.value.server.allowed_origins,
        ["https://a.example", "https://b.example"]
    );
    assert_eq!(loaded.value.server.ports, [80, 443]);

    let loaded = base()
        .set("server.allowed_origins", "[\"x,y\"]")
        .load::<Root>()
        .unwrap();
    assert_eq!(loaded.value.server.allowed_origins, ["x,y"]);
}

#[test]
fn byte_sizes_from_env_whatever_the_default_printed_as() {
    let loaded = env(
        base(),
        &[
            ("KEEL_SERVER__UPLOAD_LIMIT", "1MiB"),
            ("KEEL_SERVER__MAX_BODY_BYTES", "512"),
        ],
    )
    .load::<Root>()
    .unwrap();
    assert_eq!(loaded.value.server.upload_limit, ByteSize::mib(1));
    assert_eq!(loaded.value.server.max_body_bytes, ByteSize::b(512));

    let err = load_err(env(base(), &[("KEEL_SERVER__UPLOAD_LIMIT", "1 parsec")]));
    assert_eq!(
        err.to_string(),
        "invalid value \"1 parsec\" for `server.upload_limit` (from env KEEL_SERVER__UPLOAD_LIMIT): expected an integer"
    );
}

#[test]
fn validation_errors_are_aggregated_with_sources() {
    let loader = toml(base(), "[server]\naddr = \"\"\n");
    let err = load_err(loader.set("server.listeners", "0"));
    assert_eq!(
        lines(&err),
        [
            "invalid value 0 for `server.listeners` (from flag --set server.listeners): must be at least 1",
            "invalid value \"\" for `server.addr` (from file x.toml): must not be empty",
        ]
    );
}

#[test]
fn unknown_keys_and_validation_failures_together() {
    let loader = toml(base(), "[server]\nlisteners = 0\nadr = \"x\"\n");
    let err = load_err(loader);
    assert_eq!(err.problems().len(), 2, "{err}");
    assert!(matches!(err.problems()[0], ConfigError::UnknownKey { .. }));
    assert!(matches!(err.problems()[1], ConfigError::Invalid { .. }));
}

#[test]
fn file_errors() {
    let dir = tempfile::tempdir().unwrap();

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\naddr = \n").unwrap();
    let message = base().file(&bad).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!(
            "cannot parse config file {} as TOML: ",
            bad.display()
        )),
        "{message}"
    );
    assert!(message.contains("line 2"), "{message}");

    let bad_yaml = dir.path().join("bad.yaml");
    std::fs::write(&bad_yaml, "server:\n  addr: [\n").unwrap();
    let message = base().file(&bad_yaml).unwrap_err().to_string();
    assert!(message.contains("as YAML"), "{message}");
    assert!(message.contains("line"), "{message}");

    let json = dir.path().join("keel.json");
    std::fs::write(&json, "{}").unwrap();
    let message = base().file(&json).unwrap_err().to_string();
    assert!(message.contains(&json.display().to_string()), "{message}");
    assert!(message.contains(".toml, .yaml or .yml"), "{message}");

    let missing = dir.path().join("missing.toml");
    let message = base().file(&missing).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!("cannot read config file {}: ", missing.display())),
        "{message}"
    );

    let message = base()
        .file_contents("list.yaml", Format::Yaml, "- a\n")
        .unwrap_err()
        .to_string();
    assert!(message.contains("list.yaml must hold a table"), "{message}");
}

#[test]
fn set_arg_needs_an_equals_sign() {
    let err = base().set_arg("server.addr").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid --set argument \"server.addr\": expected key=value"
    );
    let loaded = base()
        .set_arg("server.addr=a=b")
        .unwrap()
        .load::<Root>()
        .unwrap();
    assert_eq!(loaded.value.server.addr, "a=b");
}

#[test]
fn redaction_hides_secrets() {
    let loader = toml(
        base(),
        "[database]\nurl = \"postgres://app:hunter2@db:5432/app\"\npassword = \"hunter2\"\nauth_token = \"t0k3n\"\n",
    );
    let loaded = env(loader, &[("KEEL_TLS__KEY", "/k.pem")])
        .load::<Root>()
        .unwrap();
    let redacted = loaded.redacted();
    assert_eq!(redacted["database"]["password"], "<redacted>");
    assert_eq!(redacted["database"]["auth_token"], "<redacted>");
    assert_eq!(
        redacted["database"]["url"],
        "postgres://app:<redacted>@db:5432/app"
    );
    assert_eq!(redacted["tls"]["key"], "<redacted>");
    assert_eq!(redacted["server"]["addr"], "127.0.0.1:8080");
    // The typed value itself is untouched.
    assert_eq!(loaded.value.database.password, "hunter2");

    let text = loaded.to_toml_redacted();
    assert!(
        !text.contains("hunter2") && !text.contains("t0k3n"),
        "{text}"
    );
    assert!(text.contains("# name = (unset)"), "{text}");
    let reparsed: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(
        reparsed["server"]["header_read_timeout"].as_str(),
        Some("30s")
    );

    assert!(!format!("{loaded:?}").is_empty());
}

#[test]
fn hash_is_stable_and_tracks_values() {
    let a = toml(
        base(),
        "[server]\naddr = \"a\"\nlisteners = 2\n[labels]\nx = \"1\"\ny = \"2\"\n",
    )
    .load::<Root>()
    .unwrap();
    let b = toml(
        base(),
        "[labels]\ny = \"2\"\nx = \"1\"\n[server]\nlisteners = 2\naddr = \"a\"\n",
    )
    .load::<Root>()
    .unwrap();
    assert_eq!(a.hash(), b.hash());
    assert_eq!(a.hash().len(), 64);
    assert!(a.hash().chars().all(|c| c.is_ascii_hexdigit()));

    // The same effective config from a different layer and spelling hashes the same.
    let c = env(
        base(),
        &[("KEEL_SERVER__ADDR", "a"), ("KEEL_SERVER__LISTENERS", "2")],
    )
    .set("labels.x", "1")
    .set("labels.y", "2")
    .load::<Root>()
    .unwrap();
    assert_eq!(a.hash(), c.hash());

    let d = toml(
        base(),
        "[server]\naddr = \"a\"\nlisteners = 3\n[labels]\nx = \"1\"\ny = \"2\"\n",
    )
    .load::<Root>()
    .unwrap();
    assert_ne!(a.hash(), d.hash());

    let e = base()
        .set("server.header_read_timeout", "90s")
        .load::<Root>()
        .unwrap();
    let f = base()
        .set("server.header_read_timeout", "1m30s")
        .load::<Root>()
        .unwrap();
    assert_eq!(e.hash(), f.hash());
}

#[test]
fn process_env_layer_ignores_unrelated_variables() {
    let loaded = base()
        .env("KEEL_TEST_PREFIX_NOBODY_USES")
        .load::<Root>()
        .unwrap();
    assert_eq!(loaded.value, Root::default());
}

#[test]
fn defaults_must_be_a_table() {
    let err = Loader::defaults(&42).unwrap_err();
    assert!(
        err.to_string().contains("must serialize to a table"),
        "{err}"
    );
}
