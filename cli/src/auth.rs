//! `quiver auth`: API keys for `serve` and `demo` (see `quiver_server::auth`).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use quiver_server::auth::key_digest;

#[derive(Debug, clap::Subcommand)]
pub enum AuthCommand {
    /// Make a new random API key: the key is printed on stdout (once; it is
    /// stored nowhere), its `[[keys]]` entry (with the SHA-256 digest) is
    /// appended to --keys-file, or printed on stderr without one.
    CreateKey {
        /// The key's name (unique; it appears in logs and messages).
        #[arg(long)]
        name: String,
        /// Comma-separated scopes: read, write, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// RFC 3339 time from which the key is refused.
        #[arg(long)]
        expires: Option<String>,
        /// Limit the key to these feature views (comma-separated).
        #[arg(long, value_delimiter = ',')]
        feature_views: Option<Vec<String>>,
        /// Feature services the key reads beyond its feature views.
        #[arg(long, value_delimiter = ',')]
        feature_services: Option<Vec<String>>,
        /// Limit the key to pushing these event types (comma-separated).
        #[arg(long, value_delimiter = ',')]
        event_types: Option<Vec<String>>,
        /// Keys file to append the entry to (replaced atomically, so a
        /// running server reloads a complete file).
        #[arg(long)]
        keys_file: Option<PathBuf>,
    },
    /// Print the SHA-256 digest of a key read from stdin (one line), for
    /// the `sha256` field of a key made elsewhere.
    HashKey,
}

pub fn auth_cmd(cmd: AuthCommand) -> Result<()> {
    match cmd {
        AuthCommand::HashKey => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the key from stdin")?;
            let key = line.trim_end_matches(['\r', '\n']);
            if key.is_empty() {
                bail!("no key on stdin; e.g. `printf '%s' \"$KEY\" | quiver auth hash-key`");
            }
            println!("{}", key_digest(key));
            Ok(())
        }
        AuthCommand::CreateKey {
            name,
            scopes,
            expires,
            feature_views,
            feature_services,
            event_types,
            keys_file,
        } => {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes)
                .map_err(|e| anyhow::anyhow!("no randomness for a key: {e}"))?;
            let key = format!("qv_{}", hex::encode(bytes));
            let mut entry = toml::Table::new();
            entry.insert("name".into(), name.clone().into());
            entry.insert("sha256".into(), key_digest(&key).into());
            entry.insert("scopes".into(), list(&scopes));
            if let Some(t) = expires {
                entry.insert("expires".into(), t.into());
            }
            for (field, v) in [
                ("feature_views", feature_views),
                ("feature_services", feature_services),
                ("event_types", event_types),
            ] {
                if let Some(v) = v {
                    entry.insert(field.into(), list(&v));
                }
            }
            let mut doc = toml::Table::new();
            doc.insert("keys".into(), toml::Value::Array(vec![entry.into()]));
            let text = toml::to_string(&doc).context("writing the key entry")?;
            // Checked as the server checks it, before anything is written.
            check_keys(&text, "the new key")?;
            match keys_file {
                Some(path) => append(&path, &text)?,
                None => eprint!("# add to the keys file ([auth] keys_file):\n{text}"),
            }
            println!("{key}");
            Ok(())
        }
    }
}

fn list(v: &[String]) -> toml::Value {
    toml::Value::Array(v.iter().map(|s| s.trim().to_owned().into()).collect())
}

/// Loads `text` as a keys file, as the server would.
fn check_keys(text: &str, origin: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keys.toml");
    std::fs::write(&path, text)?;
    let settings = quiver_server::auth::AuthSettings {
        keys_file: Some(path),
        ..Default::default()
    };
    quiver_server::auth::Authenticator::new(settings, std::sync::Arc::new(quiver_core::SystemClock))
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{origin}: {e}"))
}

/// Appends `entry` to the keys file at `path` (created if missing),
/// replacing the file in one rename once the result loads.
fn append(path: &Path, entry: &str) -> Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut text = old;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(entry);
    check_keys(&text, &path.display().to_string())?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file next to {}", path.display()))?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}
