//! The filesystem root under which `/proc` and `/sys` are read.
//!
//! Everything that inspects the host goes through a [`SysRoot`] so tests can point it at a
//! fixture tree in a tempdir instead of the machine they happen to run on.

use std::path::{Path, PathBuf};

/// Filesystem root for `/proc` and `/sys`. [`SysRoot::host`] is `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysRoot(PathBuf);

impl SysRoot {
    /// The real machine.
    pub fn host() -> Self {
        Self(PathBuf::from("/"))
    }

    /// A fixture tree: `root/proc/self/cgroup`, `root/sys/fs/cgroup/...` and so on.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self(root.into())
    }

    /// The root directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `rel` (written without a leading `/`, e.g. `"sys/fs/cgroup"`) under the root.
    pub(crate) fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.0.join(rel)
    }

    /// Reads a small text file, treating any error as absent: a missing or unreadable kernel
    /// file means "this machine does not tell us", never a reason to fail startup.
    pub(crate) fn read(&self, rel: impl AsRef<Path>) -> Option<String> {
        std::fs::read_to_string(self.join(rel)).ok()
    }
}

impl Default for SysRoot {
    fn default() -> Self {
        Self::host()
    }
}
