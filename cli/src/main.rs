//! The `keel` command.
//!
//! - `keel demo` — run the reference system on one machine with embedded defaults (until the
//!   shop lands: the example service on `127.0.0.1:8080`, admin on `127.0.0.1:9990`).
//! - `keel config check FILE` — validate a config file (plus `KEEL_*` env and `--set` flags),
//!   print every problem or the effective config with its hash.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel::Sources;

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "Keel: a Rust chassis for cloud-native microservices"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the demo system on this machine.
    Demo {
        /// Config file (TOML or YAML).
        #[arg(short, long, env = "KEEL_CONFIG")]
        config: Option<PathBuf>,
        /// Override one key, e.g. --set server.addr=127.0.0.1:8080 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate FILE (with KEEL_* env and --set applied) and print the effective config.
    Check {
        /// Config file (TOML or YAML).
        file: PathBuf,
        /// Override one key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Demo { config, sets } => demo(Sources { file: config, sets }),
        Cmd::Config {
            cmd: ConfigCmd::Check { file, sets },
        } => config_check(Sources {
            file: Some(file),
            sets,
        }),
    }
}

fn demo(mut sources: Sources) -> ExitCode {
    // The demo binds loopback by default: it is a local playground, not a deployment.
    if std::env::var_os("KEEL_SERVER__ADDR").is_none()
        && !sources.sets.iter().any(|s| s.starts_with("server.addr="))
    {
        sources.sets.insert(0, "server.addr=127.0.0.1:8080".into());
    }
    keel::run_with("demo", &sources, |app| async move {
        app.readiness()
            .check("self", || async { Ok::<(), String>(()) });
        let addr = app.config().server.addr;
        let admin = app.config().admin.addr;
        eprintln!(
            "keel demo: example service on http://{addr}/ (try /slow?ms=200, /cpu?us=500), \
             admin on http://{admin}/ — Ctrl-C drains and exits"
        );
        app.serve(keel_example_hello::routes()).await
    })
}

fn config_check(sources: Sources) -> ExitCode {
    let path = sources.file.clone().unwrap_or_default();
    match sources.load() {
        Ok(l) => {
            println!("# {}: valid", path.display());
            println!("# hash: {}", l.hash());
            for layer in l.layers() {
                println!("# layer: {} ({} keys)", layer.name, layer.keys);
            }
            println!();
            print!("{}", l.to_toml_redacted());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: invalid configuration:\n{e}", path.display());
            ExitCode::from(2)
        }
    }
}
