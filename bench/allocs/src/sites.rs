//! `--sites`: turn the backtraces recorded per counted allocation into the most frequent call
//! sites. A backtrace is resolved to symbols here, after the run, and reduced to its first
//! frames outside the allocator itself.

use std::backtrace::Backtrace;
use std::collections::HashMap;

/// Symbol prefixes of frames that belong to capturing the backtrace, the allocator's entry
/// points, or the standard library (`Vec::push`, `Arc::new`, `drop_in_place`, …): a site
/// starts at the first frame after them. Used when the binary has no line tables (release),
/// where only non-inlined functions appear, with their full paths.
const LIBRARY_SYMBOLS: &[&str] = &[
    "std::",
    "<std::",
    "core::",
    "<core::",
    "alloc::",
    "<alloc::",
    "keel_allocs::counter",
    "<keel_allocs::counter",
    "__rust_alloc",
    "__rust_realloc",
    "__rustc::",
    "__rdl_",
    "hashbrown::raw::",
];

/// The same by source location, for binaries with line tables, whose inlined frames carry
/// short names (`with_capacity_in`) but a file: `crate/src/…` as [`frames`] shortens it.
const LIBRARY_FILES: &[&str] = &[
    "std/src/",
    "core/src/",
    "alloc/src/",
    "backtrace/src/",
    "allocs/src/counter.rs",
    "allocs/src/main.rs",
    "hashbrown-",
];

/// Crates that allocate on behalf of their caller (`HeaderValue::from_str`,
/// `Extensions::insert`): an allocation in them belongs to the next frame out.
const UTILITY_FILES: &[&str] = &["http-", "bytes-"];
const UTILITY_SYMBOLS: &[&str] = &["http::", "<http::", "bytes::", "<bytes::"];

/// One frame of a backtrace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Frame {
    pub(crate) name: String,
    /// `crate-dir/src/file.rs:line:col`, when the binary has line tables.
    pub(crate) at: Option<String>,
}

impl std::fmt::Display for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.at {
            Some(at) => write!(f, "{} ({at})", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl Frame {
    fn is_library(&self, has_lines: bool) -> bool {
        match &self.at {
            Some(at) => LIBRARY_FILES.iter().any(|l| at.starts_with(l)),
            // With line tables, a frame without a location is a standard-library inline
            // (`try_allocate_in`) or a shim; without them, the symbol path tells.
            None => has_lines || LIBRARY_SYMBOLS.iter().any(|l| self.name.starts_with(l)),
        }
    }

    fn is_utility(&self) -> bool {
        match &self.at {
            Some(at) => UTILITY_FILES.iter().any(|u| at.starts_with(u)),
            None => UTILITY_SYMBOLS.iter().any(|u| self.name.starts_with(u)),
        }
    }

    fn is_keel(&self) -> bool {
        if let Some(at) = &self.at {
            let krate = at.split('/').next().unwrap_or_default();
            return krate == "keel" || krate.starts_with("keel-");
        }
        let name = self.name.trim_start_matches('<');
        (name.starts_with("keel_") || name.starts_with("keel::"))
            && !name.starts_with("keel_allocs")
    }
}

/// `/any/path/<crate-dir>/src/file.rs:10:5` → `<crate-dir>/src/file.rs:10:5`: the crate is
/// what identifies a frame (registry paths, `/rustc/<hash>/library/…`, this checkout).
fn short_path(at: &str) -> String {
    match at.rfind("/src/") {
        Some(i) => {
            let dir = at[..i].rsplit('/').next().unwrap_or_default();
            format!("{dir}{}", &at[i..])
        }
        None => at.to_string(),
    }
}

/// The frames of a backtrace outside the allocator and the standard library, innermost
/// first.
fn frames(bt: &Backtrace) -> Vec<Frame> {
    let text = bt.to_string();
    let mut out: Vec<Frame> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(at) = t.strip_prefix("at ") {
            if let Some(last) = out.last_mut() {
                last.at = Some(short_path(at));
            }
            continue;
        }
        // `12: name`, or an inlined frame's `name` under the same number.
        let name = match t.split_once(": ") {
            Some((n, rest)) if n.chars().all(|c| c.is_ascii_digit()) => rest,
            _ => t,
        };
        if !name.is_empty() {
            out.push(Frame {
                name: name.to_string(),
                at: None,
            });
        }
    }
    // Line tables of Rust code outside the standard library (system libraries such as libc
    // may carry their own whatever the build): only then do inlined frames show up.
    let has_lines = out.iter().any(|f| {
        f.at.as_ref()
            .is_some_and(|a| a.contains(".rs:") && !f.is_library(false))
    });
    out.retain(|f| !f.is_library(has_lines));
    out
}

/// A site, innermost frame first, with how many allocations it made.
#[derive(Debug)]
pub(crate) struct Site {
    pub(crate) frames: Vec<Frame>,
    pub(crate) count: usize,
}

/// The most frequent sites by their first `depth` frames; and the allocations Keel's own code
/// makes, by its frame: those whose innermost frame (past the standard library, `http` and
/// `bytes`) is in a Keel crate, so the router, the handler and hyper, which run inside Keel's
/// futures, are not counted as Keel's.
pub(crate) fn top(bts: &[Backtrace], depth: usize, n: usize) -> Tops {
    let mut has_lines = false;
    let mut by_stack: HashMap<Vec<Frame>, usize> = HashMap::new();
    let mut by_keel: HashMap<Vec<Frame>, usize> = HashMap::new();
    for bt in bts {
        let f = frames(bt);
        has_lines |= f
            .iter()
            .any(|f| f.at.as_ref().is_some_and(|a| a.contains(".rs:")));
        let owner = f.iter().find(|s| !s.is_utility());
        let keel = match owner {
            Some(o) if o.is_keel() => o.clone(),
            _ => Frame {
                name: "(not Keel's own: hyper, the router, the handler)".into(),
                at: None,
            },
        };
        *by_keel.entry(vec![keel]).or_default() += 1;
        *by_stack
            .entry(f.into_iter().take(depth).collect())
            .or_default() += 1;
    }
    Tops {
        stacks: sorted(by_stack, n),
        keel: sorted(by_keel, n),
        has_lines,
    }
}

/// What [`top`] found.
#[derive(Debug)]
pub(crate) struct Tops {
    /// The most frequent sites.
    pub(crate) stacks: Vec<Site>,
    /// Keel's own allocations by the Keel frame that makes them.
    pub(crate) keel: Vec<Site>,
    /// Whether the binary has line tables; without them Keel's request path is inlined into
    /// hyper's frames and `keel` cannot tell Keel's allocations apart.
    pub(crate) has_lines: bool,
}

fn sorted(m: HashMap<Vec<Frame>, usize>, n: usize) -> Vec<Site> {
    let mut v: Vec<Site> = m
        .into_iter()
        .map(|(frames, count)| Site { frames, count })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.frames.cmp(&b.frames)));
    v.truncate(n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(name: &str, at: Option<&str>) -> Frame {
        Frame {
            name: name.into(),
            at: at.map(short_path),
        }
    }

    #[test]
    fn keel_frames_are_recognised_by_symbol_or_file() {
        assert!(frame("keel_server::service::X::call", None).is_keel());
        assert!(frame("<keel_core::context::Context as Clone>::clone", None).is_keel());
        assert!(!frame("keel_allocs::counter::on_alloc", None).is_keel());
        assert!(!frame("hyper::proto::h1::role::encode_headers", None).is_keel());
        assert!(
            frame(
                "call",
                Some("/work/x/crates/keel-server/src/service.rs:1:2")
            )
            .is_keel()
        );
        assert!(frame("run", Some("/work/x/crates/keel/src/app.rs:1:2")).is_keel());
        assert!(!frame("routes", Some("/work/x/examples/hello/src/lib.rs:1:2")).is_keel());
    }

    #[test]
    fn http_and_bytes_allocate_for_their_caller() {
        assert!(frame("insert<X>", Some("/r/http-1.5.0/src/extensions.rs:65:40")).is_utility());
        assert!(frame("bytes::bytes_mut::BytesMut::reserve_inner", None).is_utility());
        assert!(!frame("parse", Some("/r/hyper-1.12.0/src/proto/h1/role.rs:1:1")).is_utility());
    }

    #[test]
    fn library_frames_are_skipped() {
        let vec = frame(
            "with_capacity_in<u8>",
            Some("/rustc/abc/library/alloc/src/raw_vec/mod.rs:177:20"),
        );
        assert!(vec.is_library(true));
        let unwind = frame(
            "trace",
            Some("/rustc/abc/library/std/src/../../backtrace/src/backtrace/libunwind.rs:117:9"),
        );
        assert!(unwind.is_library(true));
        assert!(frame("try_allocate_in<Global>", None).is_library(true));
        assert!(frame("alloc::raw_vec::finish_grow", None).is_library(false));
        let hyper = frame(
            "parse",
            Some(
                "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/hyper-1.7.0/src/proto/h1/io.rs:1:1",
            ),
        );
        assert_eq!(
            hyper.at.as_deref(),
            Some("hyper-1.7.0/src/proto/h1/io.rs:1:1")
        );
        assert!(!hyper.is_library(true));
        assert!(!frame("<hyper::X as core::future::Future>::poll", None).is_library(false));
    }
}
