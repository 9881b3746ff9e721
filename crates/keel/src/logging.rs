//! Logging set-up from `[log]`, with a filter that can be changed at run time
//! (`PUT /debug/log?filter=…` on the admin port).

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The installed subscriber's filter: its text and how to replace it.
static FILTER: OnceLock<(Mutex<String>, Reload)> = OnceLock::new();

/// The log filter in force, if Keel installed the subscriber.
pub(crate) fn current_filter() -> Option<String> {
    FILTER
        .get()
        .map(|(text, _)| text.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

/// Replace the log filter (an `EnvFilter` directive such as `info,keel_server=debug`).
pub(crate) fn set_filter(directives: &str) -> Result<(), String> {
    let (text, reload) = FILTER
        .get()
        .ok_or("logging was not set up by Keel; no filter to change")?;
    let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
    reload(filter)?;
    *text.lock().unwrap_or_else(|p| p.into_inner()) = directives.to_string();
    tracing::info!(filter = directives, "log filter changed");
    Ok(())
}

/// Install the global subscriber. `RUST_LOG` wins over `log.level` so an operator can turn
/// on debug logs without editing config. A second call (tests) is a no-op.
pub(crate) fn init(cfg: &LogConfig) {
    let (text, filter) = match std::env::var("RUST_LOG") {
        Ok(v) if EnvFilter::try_new(&v).is_ok() => (v.clone(), EnvFilter::new(v)),
        _ => match EnvFilter::try_new(&cfg.level) {
            Ok(f) => (cfg.level.clone(), f),
            Err(_) => ("info".to_string(), EnvFilter::new("info")),
        },
    };
    // Colour only for a terminal: escape codes in files and log pipelines break grep and parsers.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // The reload handle's type differs per format, so each arm boxes its own.
    let (installed, reload): (bool, Reload) = match cfg.format {
        LogFormat::Json => {
            let b = builder.json().flatten_event(true).with_filter_reloading();
            let handle = b.reload_handle();
            (
                b.try_init().is_ok(),
                Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
            )
        }
        LogFormat::Pretty => {
            let b = builder.compact().with_filter_reloading();
            let handle = b.reload_handle();
            (
                b.try_init().is_ok(),
                Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())),
            )
        }
    };
    if installed {
        let _ = FILTER.set((Mutex::new(text), reload));
    }
}
