//! Files read again while serving (API keys, TLS certificates): when they
//! change on disk (checked periodically) and on SIGHUP.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// What identifies a version of a file: a rewrite changes the time or the
/// length, a replacement by rename (how keys and certificates should be
/// replaced, so that no half-written file is read) the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode,
    })
}

/// A set of files and the versions last read.
#[derive(Debug)]
pub(crate) struct Files {
    paths: Vec<PathBuf>,
    seen: Mutex<Vec<Option<Stamp>>>,
}

/// The versions of [`Files`] on disk at one moment.
pub(crate) struct Versions(Vec<Option<Stamp>>);

impl Files {
    pub(crate) fn new(paths: Vec<PathBuf>) -> Files {
        let seen = Mutex::new(vec![None; paths.len()]);
        Files { paths, seen }
    }

    /// The versions on disk now: take them before reading the files, and
    /// [`Files::mark`] them after, so that a change while reading is seen
    /// at the next check.
    pub(crate) fn versions(&self) -> Versions {
        Versions(self.paths.iter().map(|p| stamp(p)).collect())
    }

    /// Records `v` as read.
    pub(crate) fn mark(&self, v: Versions) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = v.0;
    }

    /// Whether a file changed since it was last marked read.
    pub(crate) fn changed(&self) -> bool {
        self.versions().0 != *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

/// Something that reads [`Files`] again.
pub(crate) trait Reload: Send + Sync + 'static {
    /// What is reloaded, for logs ("API keys", "TLS certificate").
    const WHAT: &'static str;
    /// The files read.
    fn files(&self) -> &Files;
    /// Reads them again: a summary for the log, or why the previous
    /// version stays in force.
    fn reload(&self) -> Result<String, String>;
}

/// Reloads `r` every `every` when its files changed, and on SIGHUP, until
/// `stop` resolves.
pub(crate) fn watch<R: Reload>(
    r: Arc<R>,
    every: Duration,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    if r.files().is_empty() {
        return;
    }
    let every = every.max(Duration::from_millis(10));
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        tokio::pin!(stop);
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            let due = tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(every) => r.files().changed(),
                _ = hangup => true,
            };
            if !due {
                continue;
            }
            match r.reload() {
                Ok(summary) => tracing::info!(what = R::WHAT, %summary, "reloaded"),
                Err(e) => tracing::error!(
                    what = R::WHAT,
                    error = %e,
                    "not reloaded; the version loaded before stays in force"
                ),
            }
        }
    });
}
