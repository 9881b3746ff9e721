//! Layered, validated, typed configuration for Keel services.
//!
//! Each crate owns a plain config struct; the service composes them into a root struct and
//! loads it once, at the edge, through a [`Loader`]. Layers apply in the order they are added,
//! later ones winning: defaults → file (TOML or YAML) → environment (`KEEL_<SECTION>__<KEY>`)
//! → command-line flags (`--set key=value`).
//!
//! The defaults double as the schema: their serialized shape is what unknown keys are checked
//! against and what decides how an environment or flag string is typed. Every error names the
//! key, the offending value, the layer it came from and the reason, and [`Loader::load`]
//! reports all unknown keys and validation failures at once rather than one per restart.
//!
//! ```
//! use keel_config::{Duration, Format, Loader, Validate, Validator};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! #[serde(default)]
//! struct Server {
//!     addr: String,
//!     listeners: u32,
//!     header_read_timeout: Duration,
//! }
//!
//! impl Default for Server {
//!     fn default() -> Self {
//!         Self {
//!             addr: "127.0.0.1:8080".into(),
//!             listeners: 1,
//!             header_read_timeout: Duration::from_secs(30),
//!         }
//!     }
//! }
//!
//! impl Validate for Server {
//!     fn validate(&self, v: &mut Validator) {
//!         v.check(self.listeners >= 1, "listeners", self.listeners, "must be at least 1");
//!     }
//! }
//!
//! #[derive(Debug, Default, Serialize, Deserialize)]
//! #[serde(default)]
//! struct Root {
//!     server: Server,
//! }
//!
//! impl Validate for Root {
//!     fn validate(&self, v: &mut Validator) {
//!         v.nested("server", &self.server);
//!     }
//! }
//!
//! # fn main() -> Result<(), keel_config::ConfigError> {
//! let loaded = Loader::defaults(&Root::default())?
//!     .file_contents("keel.toml", Format::Toml, "[server]\naddr = \"0.0.0.0:80\"\n")?
//!     .env_vars("KEEL", [("KEEL_SERVER__LISTENERS".to_string(), "4".to_string())])
//!     .set_arg("server.header_read_timeout=5s")?
//!     .load::<Root>()?;
//!
//! assert_eq!(loaded.value.server.addr, "0.0.0.0:80");
//! assert_eq!(loaded.value.server.listeners, 4);
//! assert_eq!(loaded.value.server.header_read_timeout, Duration::from_secs(5));
//! assert_eq!(loaded.source_of("server.listeners"), Some("env KEEL_SERVER__LISTENERS"));
//! assert_eq!(loaded.source_of("server.addr"), Some("file keel.toml"));
//!
//! // A bad value is reported with its key, value, layer and reason.
//! let err = Loader::defaults(&Root::default())?
//!     .set("server.listeners", "0")
//!     .load::<Root>()
//!     .unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "invalid value 0 for `server.listeners` (from flag --set server.listeners): must be at least 1"
//! );
//! # Ok(())
//! # }
//! ```

mod bytesize;
mod coerce;
mod duration;
mod error;
mod format;
mod loaded;
mod loader;
mod merge;
mod redact;
mod render;
mod schema;
mod validate;

pub use bytesize::{ByteSize, ParseByteSizeError};
pub use duration::{Duration, ParseDurationError};
pub use error::ConfigError;
pub use format::Format;
pub use loaded::{LayerInfo, Loaded};
pub use loader::Loader;
pub use validate::{Problem, Validate, Validator};
