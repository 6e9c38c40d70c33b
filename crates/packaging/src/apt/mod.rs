//! A signed APT repository on disk (what Freight did in the seed pipeline):
//! `pool/` for the packages, `dists/<suite>/` for the signed indexes, and a
//! private `.aviary-state/` (signing key, index log, lock) that is never served.
//!
//! * Layout: `dists/<suite>/{Release,InRelease,Release.gpg}`,
//!   `dists/<suite>/<component>/binary-<arch>/Packages{,.gz,.xz}` with
//!   `by-hash/SHA256/<hex>` copies (hard links) of the current and previous
//!   generations; `Architecture: all` packages are listed in every
//!   `binary-<arch>` index.
//! * Publication is atomic for clients: pool files first, then by-hash files,
//!   then the named indexes (rename), then `Release`/`InRelease` (rename).
//!   Pool files are deleted only by [`Repository::gc`].
//! * Writers serialize on an exclusive `flock` of `.aviary-state/lock`, so
//!   threads and processes can publish concurrently without losing packages.
//! * Incremental: the index state is an append-only log (see `state`), and the
//!   `Packages.gz` is a concatenation of per-chunk gzip members cached in
//!   memory, so one add to a large repository recompresses one chunk.
//!   `Packages.xz` must be one stream (apt 2.6 stops after the first xz
//!   stream): it is assembled from per-chunk xz blocks cached in memory with
//!   a new stream index (see `xzblocks`), so it too recompresses one chunk.

mod debfile;
mod error;
mod sign;
mod state;
mod version;
mod xzblocks;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use md5::Digest;

pub use debfile::{DebInfo, Paragraph, inspect, parse_paragraph};
pub use error::AptError;
pub use sign::SigningKey;
pub use version::compare_versions;

use state::{Entry, State};

/// Most index generations whose by-hash files are kept, whatever their age.
pub const MAX_BY_HASH_GENERATIONS: usize = 32;

/// Name of the private state directory under the repository root.
pub const STATE_DIR: &str = ".aviary-state";

/// Repository settings.
#[derive(Debug, Clone)]
pub struct RepoConfig {
    /// `Origin:` of the Release files.
    pub origin: String,
    /// `Label:` of the Release files.
    pub label: String,
    /// Suites (each also its codename). Default `["stable"]`.
    pub suites: Vec<String>,
    /// Components. Default `["main"]`.
    pub components: Vec<String>,
    /// Architectures with a `binary-<arch>` index. Default `["amd64", "all"]`.
    pub architectures: Vec<String>,
    /// Versions kept per package name, suite, component and architecture. Default 5.
    pub keep_versions: usize,
    /// `Valid-Until` = `Date` + this; `None` omits the field. Default 30 days.
    pub valid_for: Option<Duration>,
    /// Index generations whose by-hash files are kept (current included). Default 2.
    pub by_hash_generations: usize,
    /// Older generations are kept too until the generation that replaced
    /// them is this old, so a client that read an InRelease just before a
    /// burst of publishes still finds its indexes (at most
    /// [`MAX_BY_HASH_GENERATIONS`] are kept). Default 60 s.
    pub by_hash_min_age: Duration,
    /// xz preset of the blocks of `Packages.xz` (0..=9). Default 0: only the
    /// changed chunk is compressed on a publish, but a new handle compresses
    /// every chunk once.
    pub xz_preset: u32,
    /// Whether to write `Packages.xz` at all (apt falls back to `.gz`). Default true.
    pub write_xz: bool,
    /// User ID of a generated signing key.
    pub key_user_id: String,
    /// Sequence numbers per compressed chunk of a Packages file (each chunk is
    /// one gzip member and one xz block, recompressed only when it changes).
    /// Default 128.
    pub index_chunk: u64,
}

impl Default for RepoConfig {
    fn default() -> Self {
        Self {
            origin: "Aviary".into(),
            label: "Aviary".into(),
            suites: vec!["stable".into()],
            components: vec!["main".into()],
            architectures: vec!["amd64".into(), "all".into()],
            keep_versions: 5,
            valid_for: Some(Duration::from_secs(30 * 86_400)),
            by_hash_generations: 2,
            by_hash_min_age: Duration::from_secs(60),
            xz_preset: 0,
            write_xz: true,
            key_user_id: "Aviary repository signing key <apt@aviary.invalid>".into(),
            index_chunk: 128,
        }
    }
}

/// One package of an index, as [`Repository::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PackageEntry {
    /// Package name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Architecture.
    pub arch: String,
    /// Suite.
    pub suite: String,
    /// Component.
    pub component: String,
    /// Path relative to the repository root.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// What a publishing operation changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PublishReport {
    /// Packages newly added to the index.
    pub added: Vec<PackageEntry>,
    /// Packages already present with identical content (no-ops).
    pub unchanged: Vec<PackageEntry>,
    /// Packages dropped from the index (removed or past retention).
    pub removed: Vec<PackageEntry>,
    /// Suite whose Release was re-signed (empty if nothing changed).
    pub published: Vec<String>,
}

/// Compressed forms of one chunk of stanzas: one gzip member, one xz block.
struct Chunk {
    seqs: Vec<u64>,
    gz: Vec<u8>,
    xz: Option<xzblocks::Block>,
    /// Digests of the Packages, Packages.gz and Packages.xz prefixes ending
    /// with this chunk, valid while the chunk before it is `after_prev` and
    /// unchanged (so an append re-hashes only the last chunk).
    after: Option<Box<[Digests; 3]>>,
    after_prev: Option<u64>,
}

/// SHA-256 and MD5 of a byte stream, resumable (the states are cloned).
#[derive(Clone, Default)]
struct Digests {
    sha256: sha2::Sha256,
    md5: md5::Md5,
}

impl Digests {
    fn update(&mut self, data: &[u8]) {
        self.sha256.update(data);
        self.md5.update(data);
    }

    /// (sha256, md5) in lowercase hex.
    fn hex(&self) -> (String, String) {
        (
            hex::encode(self.sha256.clone().finalize()),
            hex::encode(self.md5.clone().finalize()),
        )
    }
}

/// In-process caches, valid while the log is unchanged or only appended to.
#[derive(Default)]
struct Cache {
    state: State,
    chunks: HashMap<(String, String, String, u64), Chunk>,
    key: Option<SigningKey>,
}

/// An APT repository on disk.
pub struct Repository {
    root: PathBuf,
    config: RepoConfig,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("root", &self.root)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The by-hash files of one publication, and when it happened.
#[derive(serde::Serialize, serde::Deserialize)]
struct Generation {
    /// Seconds since the epoch.
    at: u64,
    /// `<dir>/<name>/<sha256>` of every index.
    files: Vec<String>,
}

/// An index file written for a Release.
struct IndexFile {
    /// Path relative to `dists/<suite>/`.
    rel: String,
    size: u64,
    md5: String,
    sha256: String,
}

impl Repository {
    /// Opens the repository at `root`, creating its directories (and, on first
    /// publication, its signing key) as needed.
    pub fn open_or_create(root: &Path, config: RepoConfig) -> Result<Self, AptError> {
        let check = |what: &str, v: &[String]| {
            if v.is_empty() {
                return Err(AptError::Config(format!("no {what} configured")));
            }
            for s in v {
                if s.is_empty()
                    || !s
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"-_.+".contains(&c))
                    || s.starts_with('.')
                {
                    return Err(AptError::Config(format!(
                        "{what} `{s}` must be non-empty ASCII letters, digits and -_.+"
                    )));
                }
            }
            Ok(())
        };
        check("suites", &config.suites)?;
        check("components", &config.components)?;
        check("architectures", &config.architectures)?;
        if config.keep_versions == 0
            || config.by_hash_generations == 0
            || config.index_chunk == 0
            || config.xz_preset > 9
        {
            return Err(AptError::Config(
                "keep_versions, by_hash_generations and index_chunk must be >= 1, xz_preset 0..=9"
                    .into(),
            ));
        }
        let state = root.join(STATE_DIR);
        fs::create_dir_all(&state).map_err(AptError::io("creating", &state))?;
        set_mode(&state, 0o700)?;
        fs::create_dir_all(root.join("pool"))
            .map_err(AptError::io("creating", root.join("pool")))?;
        Ok(Self {
            root: root.to_path_buf(),
            config,
            cache: Mutex::new(Cache::default()),
        })
    }

    /// The repository root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The configuration in use.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.root.join(STATE_DIR).join(name)
    }

    /// Takes the in-process mutex and the inter-process flock.
    fn lock(&self) -> Result<(std::sync::MutexGuard<'_, Cache>, File), AptError> {
        let guard = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.state_path("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(AptError::io("opening", &path))?;
        file.lock().map_err(AptError::io("locking", &path))?;
        Ok((guard, file))
    }

    /// Loads the signing key, creating one on first use (call under the lock).
    fn key<'a>(&self, cache: &'a mut Cache) -> Result<&'a SigningKey, AptError> {
        if cache.key.is_none() {
            let path = self.state_path("signing-key.asc");
            let key = match fs::read_to_string(&path) {
                Ok(text) => SigningKey::from_armored(&text)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let key = SigningKey::generate(&self.config.key_user_id)?;
                    write_private(&path, key.to_armored()?.as_bytes())?;
                    key
                }
                Err(e) => return Err(AptError::io("reading", &path)(e)),
            };
            cache.key = Some(key);
        }
        cache.key.as_ref().ok_or_else(|| AptError::Pgp {
            action: "key loading",
            reason: "no key".into(),
        })
    }

    /// Replaces the signing key with an armored, unprotected secret key and
    /// re-signs every published suite. Returns the new key's fingerprint.
    pub fn import_key(&self, armored_secret_key: &str) -> Result<String, AptError> {
        let key = SigningKey::from_armored(armored_secret_key)?;
        let (mut cache, _lock) = self.lock()?;
        write_private(
            &self.state_path("signing-key.asc"),
            key.to_armored()?.as_bytes(),
        )?;
        let fpr = key.fingerprint();
        cache.key = Some(key);
        self.refresh(&mut cache)?;
        for suite in self.config.suites.clone() {
            if self.dists(&suite).join("Release").exists() {
                self.publish(&mut cache, &suite)?;
            }
        }
        Ok(fpr)
    }

    /// The binary OpenPGP public key (for `/etc/apt/keyrings/<name>.gpg` and
    /// `signed-by=`), creating the key if there is none yet.
    pub fn export_public_key(&self) -> Result<Vec<u8>, AptError> {
        let (mut cache, _lock) = self.lock()?;
        self.key(&mut cache)?.public_binary()
    }

    /// The ASCII-armored public key.
    pub fn export_public_key_armored(&self) -> Result<String, AptError> {
        let (mut cache, _lock) = self.lock()?;
        self.key(&mut cache)?.public_armored()
    }

    /// The signing key's fingerprint.
    pub fn key_fingerprint(&self) -> Result<String, AptError> {
        let (mut cache, _lock) = self.lock()?;
        Ok(self.key(&mut cache)?.fingerprint())
    }

    fn refresh(&self, cache: &mut Cache) -> Result<(), AptError> {
        cache.state.refresh(&self.state_path("index.log"))
    }

    fn check_suite_component(&self, suite: &str, component: &str) -> Result<(), AptError> {
        not_configured("suite", suite, &self.config.suites)?;
        not_configured("component", component, &self.config.components)
    }

    /// Adds packages to `suite`/`component`: copies them into the pool,
    /// updates the indexes, applies retention, re-signs and publishes.
    ///
    /// A package already present with the same content is a no-op; the same
    /// name, version and architecture with other content is refused.
    pub fn add(
        &self,
        debs: &[PathBuf],
        suite: &str,
        component: &str,
    ) -> Result<PublishReport, AptError> {
        self.check_suite_component(suite, component)?;
        // Read and hash outside the lock: the slow part runs in parallel.
        let mut infos = Vec::with_capacity(debs.len());
        for path in debs {
            let info = debfile::inspect(path)?;
            if info.arch != "all" && !self.config.architectures.contains(&info.arch) {
                return Err(AptError::NotConfigured {
                    what: "architecture",
                    value: format!("{} (of {})", info.arch, path.display()),
                    configured: self.config.architectures.join(", "),
                });
            }
            infos.push((path, info));
        }
        let (mut cache, _lock) = self.lock()?;
        self.refresh(&mut cache)?;
        let mut report = PublishReport::default();
        // Only the entries that can collide with the new packages: one pass,
        // no map of the whole repository.
        let names: std::collections::HashSet<&str> =
            infos.iter().map(|(_, i)| i.name.as_str()).collect();
        let pool_files: std::collections::HashSet<String> =
            infos.iter().map(|(_, i)| pool_path(component, i)).collect();
        let mut by_file: HashMap<&str, &Entry> = HashMap::new();
        let mut by_key: HashMap<(&str, &str, &str, &str, &str), &Entry> = HashMap::new();
        for e in cache.state.entries.values() {
            if pool_files.contains(e.filename.as_str()) {
                by_file.insert(&e.filename, e);
            }
            if names.contains(e.name.as_str()) {
                by_key.insert((&e.suite, &e.component, &e.name, &e.version, &e.arch), e);
            }
        }
        let mut added: Vec<Entry> = Vec::new();
        let mut new_files: HashMap<String, String> = HashMap::new();
        let mut next_seq = cache.state.next_seq;
        for (path, info) in &infos {
            let filename = pool_path(component, info);
            let conflict = |existing: &str| AptError::Conflict {
                package: format!("{} {} ({})", info.name, info.version, info.arch),
                existing: existing.to_string(),
                new: info.sha256.clone(),
                path: path.to_path_buf(),
            };
            if let Some(e) = by_key.get(&(suite, component, &info.name, &info.version, &info.arch))
            {
                if e.sha256 != info.sha256 {
                    return Err(conflict(&e.sha256));
                }
                report.unchanged.push(entry_of(e));
                continue;
            }
            if let Some(sha) = by_file
                .get(filename.as_str())
                .map(|e| e.sha256.as_str())
                .or(new_files.get(&filename).map(String::as_str))
            {
                if sha != info.sha256 {
                    return Err(conflict(sha));
                }
                if new_files.contains_key(&filename) {
                    continue; // the same file twice in one call
                }
            } else {
                self.copy_to_pool(path, &filename)?;
            }
            new_files.insert(filename.clone(), info.sha256.clone());
            let entry = Entry {
                seq: next_seq,
                suite: suite.to_string(),
                component: component.to_string(),
                name: info.name.clone(),
                version: info.version.clone(),
                arch: info.arch.clone(),
                stanza: stanza(info, &filename),
                filename,
                size: info.size,
                sha256: info.sha256.clone(),
            };
            next_seq += 1;
            report.added.push(entry_of(&entry));
            added.push(entry);
        }
        if added.is_empty() {
            return Ok(report);
        }
        // Retention: per suite/component/name/arch, keep the newest N versions.
        let mut groups: HashMap<(&str, &str), Vec<(&str, u64)>> = HashMap::new();
        let touched: BTreeSet<(&str, &str)> = added
            .iter()
            .map(|e| (e.name.as_str(), e.arch.as_str()))
            .collect();
        for e in cache.state.entries.values().chain(added.iter()) {
            if e.suite == suite
                && e.component == component
                && touched.contains(&(e.name.as_str(), e.arch.as_str()))
            {
                groups
                    .entry((&e.name, &e.arch))
                    .or_default()
                    .push((&e.version, e.seq));
            }
        }
        let mut drop: BTreeSet<u64> = BTreeSet::new();
        for versions in groups.values_mut() {
            if versions.len() > self.config.keep_versions {
                versions.sort_by(|a, b| compare_versions(b.0, a.0));
                drop.extend(versions[self.config.keep_versions..].iter().map(|v| v.1));
            }
        }
        let mut removed_seqs = Vec::new();
        let mut added_kept = Vec::new();
        for e in added {
            if drop.contains(&e.seq) {
                report.added.retain(|a| a.filename != e.filename);
                report.removed.push(entry_of(&e));
            } else {
                added_kept.push(e);
            }
        }
        for seq in &drop {
            if let Some(e) = cache.state.entries.get(seq) {
                report.removed.push(entry_of(e));
                removed_seqs.push(*seq);
            }
        }
        let log = self.state_path("index.log");
        cache.state.commit(&log, added_kept, removed_seqs)?;
        self.publish(&mut cache, suite)?;
        report.published.push(suite.to_string());
        Ok(report)
    }

    /// Removes `package` (all versions, or only `version`) from the index of
    /// `suite`/`component` and republishes. Pool files stay until [`gc`](Self::gc).
    pub fn remove(
        &self,
        suite: &str,
        component: &str,
        package: &str,
        version: Option<&str>,
    ) -> Result<PublishReport, AptError> {
        self.check_suite_component(suite, component)?;
        let (mut cache, _lock) = self.lock()?;
        self.refresh(&mut cache)?;
        let mut report = PublishReport::default();
        let seqs: Vec<u64> = cache
            .state
            .entries
            .values()
            .filter(|e| {
                e.suite == suite
                    && e.component == component
                    && e.name == package
                    && version.is_none_or(|v| v == e.version)
            })
            .map(|e| {
                report.removed.push(entry_of(e));
                e.seq
            })
            .collect();
        if seqs.is_empty() {
            return Err(AptError::NotFound {
                suite: suite.into(),
                component: component.into(),
                package: package.into(),
                version: version.map(str::to_string),
            });
        }
        cache
            .state
            .commit(&self.state_path("index.log"), Vec::new(), seqs)?;
        self.publish(&mut cache, suite)?;
        report.published.push(suite.to_string());
        Ok(report)
    }

    /// The packages of one suite (or all), sorted by suite, component, name and version.
    pub fn list(&self, suite: Option<&str>) -> Result<Vec<PackageEntry>, AptError> {
        let (mut cache, _lock) = self.lock()?;
        self.refresh(&mut cache)?;
        let mut out: Vec<PackageEntry> = cache
            .state
            .entries
            .values()
            .filter(|e| suite.is_none_or(|s| s == e.suite))
            .map(entry_of)
            .collect();
        out.sort_by(|a, b| {
            (&a.suite, &a.component, &a.name, &a.arch)
                .cmp(&(&b.suite, &b.component, &b.name, &b.arch))
                .then_with(|| compare_versions(&a.version, &b.version))
        });
        Ok(out)
    }

    /// (Re)publishes every configured suite, even empty ones (an empty
    /// repository is a valid source for apt).
    pub fn publish_all(&self) -> Result<Vec<String>, AptError> {
        let (mut cache, _lock) = self.lock()?;
        self.refresh(&mut cache)?;
        for suite in self.config.suites.clone() {
            self.publish(&mut cache, &suite)?;
        }
        Ok(self.config.suites.clone())
    }

    /// Deletes pool files that no index references; returns how many.
    pub fn gc(&self) -> Result<usize, AptError> {
        let (mut cache, _lock) = self.lock()?;
        self.refresh(&mut cache)?;
        let live: BTreeSet<PathBuf> = cache
            .state
            .entries
            .values()
            .map(|e| self.root.join(&e.filename))
            .collect();
        let mut removed = 0;
        let pool = self.root.join("pool");
        let mut stack = vec![pool.clone()];
        let mut dirs = Vec::new();
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(AptError::io("listing", &dir)(e)),
            };
            for ent in rd {
                let ent = ent.map_err(AptError::io("listing", &dir))?;
                let p = ent.path();
                let ft = ent.file_type().map_err(AptError::io("reading", &p))?;
                if ft.is_dir() {
                    stack.push(p.clone());
                    dirs.push(p);
                } else if !live.contains(&p) {
                    fs::remove_file(&p).map_err(AptError::io("removing", &p))?;
                    removed += 1;
                }
            }
        }
        // Deepest first; non-empty directories simply stay.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = fs::remove_dir(&d);
        }
        Ok(removed)
    }

    /// Copies the servable part (`pool/`, `dists/`) to `dir`, hard-linking
    /// files where possible; never the private state.
    pub fn export_to(&self, dir: &Path) -> Result<(), AptError> {
        let (_cache, _lock) = self.lock()?;
        for top in ["pool", "dists"] {
            let src = self.root.join(top);
            if src.exists() {
                copy_tree(&src, &dir.join(top))?;
            }
        }
        Ok(())
    }

    fn dists(&self, suite: &str) -> PathBuf {
        self.root.join("dists").join(suite)
    }

    /// Copies a package into the pool under a temporary name, then renames it.
    fn copy_to_pool(&self, src: &Path, filename: &str) -> Result<(), AptError> {
        let dest = self.root.join(filename);
        let dir = dest.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(AptError::io("creating", dir))?;
        let tmp = tmp_name(&dest);
        fs::copy(src, &tmp).map_err(AptError::io("copying into the pool as", &tmp))?;
        set_mode(&tmp, 0o644)?;
        fs::rename(&tmp, &dest).map_err(AptError::io("renaming to", &dest))
    }

    /// Writes the indexes of `suite`, then its signed Release files.
    fn publish(&self, cache: &mut Cache, suite: &str) -> Result<(), AptError> {
        let dists = self.dists(suite);
        let mut files = Vec::new();
        let mut live_chunks = BTreeSet::new();
        for component in &self.config.components {
            for arch in &self.config.architectures {
                let dir = format!("{component}/binary-{arch}");
                let abs = dists.join(&dir);
                let hash_dir = abs.join("by-hash").join("SHA256");
                fs::create_dir_all(&hash_dir).map_err(AptError::io("creating", &hash_dir))?;
                // Group this index's stanzas into chunks by sequence number.
                let mut chunks: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
                for e in cache.state.entries.values() {
                    if e.suite == suite
                        && &e.component == component
                        && (&e.arch == arch || e.arch == "all")
                    {
                        chunks
                            .entry(e.seq / self.config.index_chunk)
                            .or_default()
                            .push(e.seq);
                    }
                }
                let write_xz = self.config.write_xz;
                let mut plain = Vec::new();
                let mut gz = Vec::new();
                let mut xz_keys = Vec::new();
                let mut d = [Digests::default(), Digests::default(), Digests::default()];
                d[2].update(&xzblocks::header());
                let mut chain_ok = true;
                let mut prev: Option<u64> = None;
                for (id, seqs) in chunks {
                    let key = (suite.to_string(), component.clone(), arch.clone(), id);
                    let start = plain.len();
                    for s in &seqs {
                        if let Some(e) = cache.state.entries.get(s) {
                            plain.extend_from_slice(e.stanza.as_bytes());
                            plain.push(b'\n');
                        }
                    }
                    let fresh = cache
                        .chunks
                        .get(&key)
                        .is_some_and(|c| c.seqs == seqs && c.xz.is_some() == write_xz);
                    if !fresh {
                        let text = &plain[start..];
                        let chunk = Chunk {
                            gz: gzip(text).map_err(AptError::io("compressing", &abs))?,
                            xz: if write_xz {
                                Some(
                                    xzblocks::compress_block(text, self.config.xz_preset)
                                        .map_err(AptError::io("compressing", &abs))?,
                                )
                            } else {
                                None
                            },
                            seqs,
                            after: None,
                            after_prev: None,
                        };
                        cache.chunks.insert(key.clone(), chunk);
                    }
                    let Some(c) = cache.chunks.get_mut(&key) else {
                        continue;
                    };
                    gz.extend_from_slice(&c.gz);
                    if c.xz.is_some() {
                        xz_keys.push(key.clone());
                    }
                    match &c.after {
                        Some(after) if chain_ok && fresh && c.after_prev == prev => {
                            d = (**after).clone();
                        }
                        _ => {
                            chain_ok = false;
                            d[0].update(&plain[start..]);
                            d[1].update(&c.gz);
                            if let Some(b) = &c.xz {
                                d[2].update(b.bytes());
                            }
                            c.after = Some(Box::new(d.clone()));
                            c.after_prev = prev;
                        }
                    }
                    prev = Some(id);
                    live_chunks.insert(key);
                }
                if plain.is_empty() {
                    gz = gzip(b"").map_err(AptError::io("compressing", &abs))?;
                    d[1] = Digests::default();
                    d[1].update(&gz);
                }
                // apt 2.6 reads only the first stream of a multi-stream xz
                // file (checked: hash sum mismatch), so xz is one stream of
                // the chunks' cached blocks with a new index.
                let xz = if write_xz {
                    let blocks: Vec<&xzblocks::Block> = xz_keys
                        .iter()
                        .filter_map(|k| cache.chunks.get(k).and_then(|c| c.xz.as_ref()))
                        .collect();
                    d[2].update(&xzblocks::trailer(&blocks));
                    Some(xzblocks::assemble(&blocks))
                } else {
                    None
                };
                let [d_plain, d_gz, d_xz] = d;
                let mut outputs = vec![("Packages", &plain, d_plain), ("Packages.gz", &gz, d_gz)];
                if let Some(xz) = &xz {
                    outputs.push(("Packages.xz", xz, d_xz));
                }
                for (name, data, digests) in outputs {
                    let (sha256, md5) = digests.hex();
                    let by_hash = hash_dir.join(&sha256);
                    if !by_hash.exists() {
                        write_atomic(&by_hash, data)?;
                    }
                    let named = abs.join(name);
                    let tmp = tmp_name(&named);
                    fs::hard_link(&by_hash, &tmp).map_err(AptError::io("linking", &tmp))?;
                    fs::rename(&tmp, &named).map_err(AptError::io("renaming to", &named))?;
                    files.push(IndexFile {
                        rel: format!("{dir}/{name}"),
                        size: data.len() as u64,
                        md5,
                        sha256,
                    });
                }
            }
        }
        cache
            .chunks
            .retain(|k, _| k.0 != suite || live_chunks.contains(k));
        let release = self.release_text(suite, &files);
        let key = self.key(cache)?;
        let inrelease = key.clearsign(&release)?;
        let detached = key.detached(release.as_bytes())?;
        write_atomic(&dists.join("Release.gpg"), detached.as_bytes())?;
        write_atomic(&dists.join("Release"), release.as_bytes())?;
        write_atomic(&dists.join("InRelease"), inrelease.as_bytes())?;
        self.prune_by_hash(suite, &files)
    }

    /// Deletes by-hash files older than the kept generations.
    fn prune_by_hash(&self, suite: &str, files: &[IndexFile]) -> Result<(), AptError> {
        let path = self.state_path(&format!("by-hash-{suite}.json"));
        let mut generations: Vec<Generation> = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .or_else(|_| {
                    // The older format: file lists without times.
                    serde_json::from_slice::<Vec<Vec<String>>>(&b).map(|v| {
                        v.into_iter()
                            .map(|files| Generation { at: 0, files })
                            .collect()
                    })
                })
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        generations.push(Generation {
            at: now,
            files: files
                .iter()
                .map(|f| format!("{}/{}", f.rel, f.sha256))
                .collect(),
        });
        // A client may have read the InRelease of a generation until the
        // next one was published, and then fetches its indexes: a
        // generation goes only when enough newer ones exist and the one
        // that superseded it is older than `by_hash_min_age` (or a burst of
        // publishes exceeds `MAX_BY_HASH_GENERATIONS`: disk is bounded).
        let min_age = self.config.by_hash_min_age.as_secs();
        while generations.len() > self.config.by_hash_generations
            && (now.saturating_sub(generations[1].at) >= min_age
                || generations.len() > MAX_BY_HASH_GENERATIONS)
        {
            generations.remove(0);
        }
        let keep: BTreeSet<&str> = generations
            .iter()
            .flat_map(|g| g.files.iter())
            .map(String::as_str)
            .collect();
        let dists = self.dists(suite);
        let mut dirs: BTreeSet<&str> = BTreeSet::new();
        for f in files {
            if let Some((dir, _)) = f.rel.rsplit_once('/') {
                dirs.insert(dir);
            }
        }
        let mut doomed = Vec::new();
        for dir in dirs {
            let hash_dir = dists.join(dir).join("by-hash").join("SHA256");
            let rd = fs::read_dir(&hash_dir).map_err(AptError::io("listing", &hash_dir))?;
            for ent in rd {
                let ent = ent.map_err(AptError::io("listing", &hash_dir))?;
                let name = ent.file_name().to_string_lossy().to_string();
                let kept = ["Packages", "Packages.gz", "Packages.xz"]
                    .iter()
                    .any(|n| keep.contains(format!("{dir}/{n}/{name}").as_str()));
                if !kept {
                    doomed.push(ent.path());
                }
            }
        }
        // Unlinking megabytes of old indexes is the slowest part of a small
        // publish and nothing waits for it: the files are renamed into the
        // private trash at once (so a later publish of the same content
        // writes its file anew), and a thread unlinks them; what it leaves
        // (e.g. at exit) the next prune empties.
        if !doomed.is_empty() {
            let trash = self.state_path("trash");
            fs::create_dir_all(&trash).map_err(AptError::io("creating", &trash))?;
            for p in doomed {
                let to = trash.join(format!("{:016x}", rand::random::<u64>()));
                fs::rename(&p, &to).map_err(AptError::io("moving to the trash", &p))?;
            }
            std::thread::spawn(move || {
                if let Ok(rd) = fs::read_dir(&trash) {
                    for ent in rd.flatten() {
                        let _ = fs::remove_file(ent.path());
                    }
                }
            });
        }
        let json = serde_json::to_vec(&generations).map_err(|e| AptError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &json)
    }

    fn release_text(&self, suite: &str, files: &[IndexFile]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut r = String::with_capacity(256 + files.len() * 200);
        let field = |r: &mut String, k: &str, v: &str| {
            r.push_str(k);
            r.push_str(": ");
            r.push_str(v);
            r.push('\n');
        };
        field(&mut r, "Origin", &self.config.origin);
        field(&mut r, "Label", &self.config.label);
        field(&mut r, "Suite", suite);
        field(&mut r, "Codename", suite);
        field(&mut r, "Date", &crate::deb::control::rfc2822(now));
        if let Some(valid) = self.config.valid_for {
            field(
                &mut r,
                "Valid-Until",
                &crate::deb::control::rfc2822(now + valid.as_secs()),
            );
        }
        field(
            &mut r,
            "Architectures",
            &self.config.architectures.join(" "),
        );
        field(&mut r, "Components", &self.config.components.join(" "));
        field(&mut r, "Acquire-By-Hash", "yes");
        r.push_str("MD5Sum:\n");
        for f in files {
            r.push_str(&format!(" {} {:>16} {}\n", f.md5, f.size, f.rel));
        }
        r.push_str("SHA256:\n");
        for f in files {
            r.push_str(&format!(" {} {:>16} {}\n", f.sha256, f.size, f.rel));
        }
        r
    }
}

fn not_configured(what: &'static str, value: &str, configured: &[String]) -> Result<(), AptError> {
    if configured.iter().any(|c| c == value) {
        Ok(())
    } else {
        Err(AptError::NotConfigured {
            what,
            value: value.to_string(),
            configured: configured.join(", "),
        })
    }
}

fn entry_of(e: &Entry) -> PackageEntry {
    PackageEntry {
        name: e.name.clone(),
        version: e.version.clone(),
        arch: e.arch.clone(),
        suite: e.suite.clone(),
        component: e.component.clone(),
        filename: e.filename.clone(),
        size: e.size,
        sha256: e.sha256.clone(),
    }
}

/// `pool/<component>/<prefix>/<source>/<name>_<version without epoch>_<arch>.deb`.
fn pool_path(component: &str, info: &DebInfo) -> String {
    let src = &info.source;
    let prefix = if src.starts_with("lib") && src.len() > 3 {
        &src[..4]
    } else {
        &src[..1]
    };
    let version = info
        .version
        .split_once(':')
        .map_or(info.version.as_str(), |(_, v)| v);
    format!(
        "pool/{component}/{prefix}/{src}/{}_{version}_{}.deb",
        info.name, info.arch
    )
}

/// The Packages stanza: control fields, then Filename, Size and digests, Description last.
fn stanza(info: &DebInfo, filename: &str) -> String {
    let mut s = String::with_capacity(512);
    let mut description = None;
    for (k, v) in &info.control {
        if k.eq_ignore_ascii_case("Description") {
            description = Some(v);
            continue;
        }
        if ["Filename", "Size", "MD5sum", "SHA1", "SHA256"]
            .iter()
            .any(|f| f.eq_ignore_ascii_case(k))
        {
            continue;
        }
        s.push_str(&format!("{k}: {v}\n"));
    }
    s.push_str(&format!(
        "Filename: {filename}\nSize: {}\nMD5sum: {}\nSHA1: {}\nSHA256: {}\n",
        info.size, info.md5, info.sha1, info.sha256
    ));
    if let Some(d) = description {
        s.push_str(&format!("Description: {d}\n"));
    }
    s
}

fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4 + 64),
        flate2::Compression::new(6),
    );
    enc.write_all(data)?;
    enc.finish()
}

/// A unique temporary name next to `path` (same directory, so rename is atomic).
fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.tmp-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ))
}

/// Writes `data` to a temporary file, then renames it to `path`.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AptError> {
    let tmp = tmp_name(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(AptError::io("creating", &tmp))?;
    f.write_all(data).map_err(AptError::io("writing", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(AptError::io("renaming to", path))
}

/// Writes a private file (mode 0600) atomically.
fn write_private(path: &Path, data: &[u8]) -> Result<(), AptError> {
    let tmp = tmp_name(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(AptError::io("creating", &tmp))?;
    f.write_all(data).map_err(AptError::io("writing", &tmp))?;
    f.sync_all().map_err(AptError::io("syncing", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(AptError::io("renaming to", path))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), AptError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(AptError::io("setting permissions of", path))
}

/// Recursively copies `src` to `dst`, hard-linking files when possible.
fn copy_tree(src: &Path, dst: &Path) -> Result<(), AptError> {
    fs::create_dir_all(dst).map_err(AptError::io("creating", dst))?;
    for ent in fs::read_dir(src).map_err(AptError::io("listing", src))? {
        let ent = ent.map_err(AptError::io("listing", src))?;
        let from = ent.path();
        let to = dst.join(ent.file_name());
        if ent.file_name().to_string_lossy().starts_with('.') {
            continue; // temporary files of a publication in progress
        }
        let ft = ent.file_type().map_err(AptError::io("reading", &from))?;
        if ft.is_dir() {
            copy_tree(&from, &to)?;
        } else {
            let _ = fs::remove_file(&to);
            if fs::hard_link(&from, &to).is_err() {
                fs::copy(&from, &to).map_err(AptError::io("copying to", &to))?;
            }
        }
    }
    Ok(())
}
