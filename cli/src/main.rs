//! The `keel` command.
//!
//! - `keel demo` — run the shop (the reference system) on this machine with embedded
//!   defaults: four services on free ports, a short mixed workload, a summary, then the shop
//!   stays up until Ctrl-C. `keel demo --smoke` is the few-second version CI runs.
//! - `keel bench [--quick]` — the benchmark suite of `BENCH.md` from this checkout.
//! - `keel config check FILE` — validate a config file (plus `KEEL_*` env and `--set` flags),
//!   print every problem or the effective config with its hash.

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// Run the shop (gateway, user, order, inventory) on this machine: drive a short mixed
    /// workload, print the summary, then keep it running until Ctrl-C.
    Demo {
        /// A few seconds of traffic, the summary, and exit: non-zero on any failure.
        #[arg(long)]
        smoke: bool,
        /// How long the workload runs, in seconds (default 10; 3 with --smoke).
        #[arg(long)]
        seconds: Option<u64>,
        /// Requests in flight during the workload.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Real servers instead of embedded defaults: `nats` carries the order events over
        /// NATS JetStream (`nats://127.0.0.1:4222`, or `nats=URL`); `postgres` keeps each
        /// service's data in a fresh PostgreSQL database (created on
        /// `postgres://postgres@127.0.0.1:5432/postgres`, or `postgres=URL`, dropped at exit).
        #[arg(long = "with", value_name = "SERVER[=URL],…", value_delimiter = ',')]
        with: Vec<String>,
    },
    /// Run the benchmark suite of BENCH.md from this checkout (S1 one hop over HTTP/1.1, h2c
    /// and gRPC, S2 the three-hop chain, S3 gateway as a proxy, S4 message consumer, the
    /// callgrind instruction gate); reports go to bench/results/. Takes a release build.
    Bench {
        /// The one-minute-per-scenario smoke version: one round, short windows.
        #[arg(long)]
        quick: bool,
    },
    /// Run Keel's proxy (`keel_gateway::proxy`) as configured: `[gateway]` routes,
    /// credentials and rate; `[clients.<name>]` for each route's cluster; `[server]`,
    /// `[admin]` and the rest as for any Keel service. `KEEL_CONFIG` names the file when
    /// `--config` does not.
    Gateway {
        /// Config file (TOML or YAML).
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Override one key (repeatable).
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
        Cmd::Demo {
            smoke,
            seconds,
            concurrency,
            with,
        } => {
            let (mut nats, mut postgres) = (None, None);
            for w in &with {
                match w.split_once('=') {
                    Some(("nats", url)) => nats = Some(url.to_string()),
                    None if w == "nats" => nats = Some("nats://127.0.0.1:4222".to_string()),
                    Some(("postgres", url)) => postgres = Some(url.to_string()),
                    None if w == "postgres" => {
                        postgres = Some("postgres://postgres@127.0.0.1:5432/postgres".to_string())
                    }
                    _ => {
                        eprintln!(
                            "keel demo: --with {w:?}: expected nats[=URL] or postgres[=URL] \
                             (RabbitMQ and Kafka are not wired into the shop yet)"
                        );
                        return ExitCode::from(2);
                    }
                }
            }
            let plan = demo::Plan {
                duration: Duration::from_secs(seconds.unwrap_or(if smoke { 3 } else { 10 })),
                concurrency,
                smoke,
                nats,
                postgres,
            };
            match tokio::runtime::Runtime::new() {
                Ok(rt) => rt.block_on(demo::run(plan)),
                Err(e) => {
                    eprintln!("keel demo: cannot start the runtime: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Bench { quick } => bench(quick),
        Cmd::Gateway { config, sets } => gateway(Sources { file: config, sets }.with_env_file()),
        Cmd::Config {
            cmd: ConfigCmd::Check { file, sets },
        } => config_check(Sources {
            file: Some(file),
            sets,
        }),
    }
}

/// `keel gateway`: the configured proxy as a process of its own.
fn gateway(sources: Sources) -> ExitCode {
    keel::run_with("gateway", &sources, |app| async move {
        let cfg = app.config().gateway.clone();
        if cfg.routes.is_empty() {
            return Err(keel::Error::Other(
                "gateway.routes is empty: there is nothing to proxy (add [[gateway.routes]] \
                 tables to the config)"
                    .into(),
            ));
        }
        let max_body = app.config().server.max_body_bytes.get();
        let gw = keel_gateway::proxy::Gateway::new(
            &cfg,
            |name| app.client(name),
            max_body,
            app.shutdown(),
        )
        .await
        .map_err(|e| keel::Error::Other(e.into()))?;
        app.serve(gw.router()).await
    })
}

/// Run the suite's scripts in order; the first failure stops it.
fn bench(quick: bool) -> ExitCode {
    // The scripts live in the repository this binary was built from.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if !root.join("bench/suite/s1.sh").exists() {
        eprintln!(
            "keel bench runs the suite in a checkout of Keel's repository; {} has no bench/suite/s1.sh",
            root.display()
        );
        return ExitCode::from(2);
    }
    let q = |a: &'static str| if quick { vec![a] } else { vec![] };
    let steps: Vec<(&str, Vec<&str>)> = vec![
        ("bench/suite/s1.sh", q("--quick")),
        (
            "bench/suite/s1.sh",
            [q("--quick"), vec!["--proto", "h2c"]].concat(),
        ),
        (
            "bench/suite/s1.sh",
            [q("--quick"), vec!["--proto", "grpc"]].concat(),
        ),
        ("bench/suite/s2.py", q("--quick")),
        ("bench/suite/s3.py", q("--quick")),
        (
            "bench/consumer.sh",
            if quick {
                vec!["5000", "16", "3", "16"]
            } else {
                vec![]
            },
        ),
        // Instructions per request under callgrind: deterministic, unlike the clock; the
        // same check CI runs against bench/instructions-baseline.json.
        ("bench/gate.sh", vec![]),
    ];
    for (script, args) in steps {
        eprintln!("keel bench: {script} {}", args.join(" "));
        match std::process::Command::new(root.join(script))
            .args(&args)
            .current_dir(&root)
            .status()
        {
            Ok(st) if st.success() => {}
            Ok(st) => {
                eprintln!("keel bench: {script} failed ({st})");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("keel bench: cannot run {script}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    eprintln!(
        "keel bench: reports are in {}",
        root.join("bench/results").display()
    );
    ExitCode::SUCCESS
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
