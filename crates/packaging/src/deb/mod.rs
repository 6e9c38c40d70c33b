//! Builds a Debian binary package (.deb) from a checked-out application
//! repository: what FPM did in the seed pipeline, reproducibly and fast.
//!
//! [`build`] validates everything first (metadata, convention scripts,
//! symlinks, paths), then streams the repository into a compressed
//! `data.tar` (MD5 sums computed on the way), writes `control.tar` and the
//! `ar` container to a temporary name in the output directory, and renames
//! it into place. A failure leaves no partial `.deb` behind.
//!
//! Same inputs and same `source_date_epoch` give a byte-identical package:
//! entries are sorted, every mtime is `source_date_epoch`, owners are
//! root:root, modes are normalized and the compressors are deterministic.

pub mod ar;
pub mod compress;
pub mod control;
pub mod error;
pub mod metadata;
pub mod tar;
pub mod tree;

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};
use sha2::Sha256;

pub use compress::Compression;
pub use error::DebError;
pub use metadata::{PackageMetadata, read_metadata};

use tree::{Planned, Source};

/// Convention scripts every application repository must have (executable).
pub const CONVENTION_SCRIPTS: [&str; 3] = ["script/cisetup", "script/cibuild", "script/post-inst"];

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// A checked-out application repository.
    pub repo_dir: PathBuf,
    /// Where the .deb is written (created if missing).
    pub out_dir: PathBuf,
    /// Build-number part of the iteration; default: the `iteration` declared
    /// in the metadata, else `source_date_epoch`, else the current time.
    pub build_number: Option<String>,
    /// Full or short commit id; its first 7 digits end the iteration.
    pub commit: Option<String>,
    /// Timestamp of every archive entry (seconds since the epoch); the
    /// caller reads `SOURCE_DATE_EPOCH` (see [`source_date_epoch_from_env`]).
    /// `None` means the current time (the build is then not reproducible).
    pub source_date_epoch: Option<i64>,
    /// Compression of control.tar and data.tar.
    pub compression: Compression,
}

impl BuildRequest {
    /// A request with defaults: no build number, no commit, current time,
    /// default compression.
    pub fn new(repo_dir: impl Into<PathBuf>, out_dir: impl Into<PathBuf>) -> Self {
        BuildRequest {
            repo_dir: repo_dir.into(),
            out_dir: out_dir.into(),
            build_number: None,
            commit: None,
            source_date_epoch: None,
            compression: Compression::default(),
        }
    }
}

/// The package that was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltPackage {
    /// Path of the .deb.
    pub path: PathBuf,
    /// Package name.
    pub name: String,
    /// Full version (`[epoch:]version-iteration`).
    pub version: String,
    /// Architecture.
    pub architecture: String,
    /// Size of the .deb in bytes.
    pub size: u64,
    /// SHA-256 of the .deb, lowercase hex.
    pub sha256: String,
    /// Installed-Size field (KiB).
    pub installed_size_kb: u64,
    /// Number of regular files and symlinks in data.tar.
    pub files: usize,
}

/// Reads `SOURCE_DATE_EPOCH` from the environment, if set and valid.
pub fn source_date_epoch_from_env() -> Option<i64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok()
}

/// Builds the package described by `req`.
///
/// Errors are raised before anything is written when the input is bad: a name
/// or version dpkg would refuse, a path escaping its place, a symlink out of
/// the tree, a missing or non-executable convention script.
pub fn build(req: &BuildRequest) -> Result<BuiltPackage, DebError> {
    req.compression.validate()?;
    let meta = read_metadata(&req.repo_dir)?;
    let repo = &req.repo_dir;

    // Timestamps and version.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mtime = match req.source_date_epoch {
        Some(s) => u64::try_from(s).map_err(|_| DebError::InvalidField {
            field: "source_date_epoch",
            value: s.to_string(),
            origin: "the build request (SOURCE_DATE_EPOCH)".to_owned(),
            problem: "it must be a non-negative number of seconds since 1970",
        })?,
        None => now,
    };
    let (build_number, bn_origin) = match (&req.build_number, &meta.iteration) {
        (Some(b), _) => (b.clone(), "the build request"),
        (None, Some(i)) => (i.clone(), "the declared iteration"),
        (None, None) => (mtime.to_string(), "the build timestamp"),
    };
    metadata::validate_revision_part(&build_number, "build number", bn_origin)?;
    let short = req
        .commit
        .as_deref()
        .map(metadata::short_commit)
        .transpose()?;
    let iteration = match &short {
        Some(s) => format!("{build_number}.{s}"),
        None => build_number,
    };
    let file_version = format!("{}-{iteration}", meta.version);
    let version = match meta.epoch {
        Some(e) => format!("{e}:{file_version}"),
        None => file_version.clone(),
    };

    // Convention scripts.
    for script in CONVENTION_SCRIPTS {
        check_executable(&repo.join(script))?;
    }

    // Content.
    let mut plan = tree::plan_repository(repo, &meta)?;
    let post_inst_dest = format!("{}/script/post-inst", meta.prefix);
    if !matches!(
        plan.get(&post_inst_dest).map(|p| &p.source),
        Some(Source::File { .. })
    ) {
        return Err(DebError::ConventionScript {
            path: repo.join("script/post-inst"),
            problem: "is excluded from the package (an exclude pattern matches it); it must be installed to run after installation",
        });
    }
    let prerm_dest = match &meta.prerm {
        Some(rel) => {
            let path = repo.join(rel);
            check_maintainer_script("prerm", &path, true)?;
            let dest = format!("{}/{rel}", meta.prefix);
            if !matches!(
                plan.get(&dest).map(|p| &p.source),
                Some(Source::File { .. })
            ) {
                return Err(DebError::MaintainerScript {
                    field: "prerm",
                    path,
                    problem: "is not installed under the prefix (is it excluded?)",
                });
            }
            Some(dest)
        }
        None => None,
    };
    let postrm_text = match &meta.postrm {
        Some(rel) => {
            let path = repo.join(rel);
            check_maintainer_script("postrm", &path, false)?;
            let content = std::fs::read(&path).map_err(DebError::io("reading", &path))?;
            let delimiter = format!(
                "AVIARY_POSTRM_{}",
                &hex::encode(Sha256::digest(&content))[..16]
            );
            Some(control::postrm(&content, &delimiter).ok_or_else(|| {
                DebError::MaintainerScript {
                    field: "postrm",
                    path: path.clone(),
                    problem: "contains a line equal to Aviary's heredoc delimiter; change that line",
                }
            })?)
        }
        None => None,
    };

    // Generated documentation.
    let doc = format!("/usr/share/doc/{}", meta.name);
    let license_text = ["LICENSE", "LICENSE.txt", "LICENSE.md", "COPYING"]
        .iter()
        .find_map(|f| std::fs::read_to_string(repo.join(f)).ok());
    let generated = |data: Vec<u8>| Planned {
        source: Source::Generated { data, mode: 0o644 },
        origin: "generated by Aviary".to_owned(),
    };
    plan.insert(
        &format!("{doc}/copyright"),
        generated(
            control::copyright(&meta, license_text.as_deref(), control::year(mtime)).into_bytes(),
        ),
    )?;
    let changelog = control::changelog(&meta, &version, req.commit.as_deref(), mtime);
    plan.insert(
        &format!("{doc}/changelog.Debian.gz"),
        generated(gzip_best(changelog.as_bytes())?),
    )?;
    if meta.prefix == "/opt" || meta.prefix.starts_with("/opt/") {
        plan.insert(
            &format!("/usr/share/lintian/overrides/{}", meta.name),
            generated(control::lintian_overrides(&meta.name).into_bytes()),
        )?;
    }
    plan.add_parents()?;

    // Conffiles: every regular file under /etc, plus declared ones.
    let mut conffiles: Vec<String> = plan
        .entries
        .iter()
        .filter(|(k, p)| k.starts_with("etc/") && matches!(p.source, Source::File { .. }))
        .map(|(k, _)| format!("/{k}"))
        .collect();
    for c in &meta.conffiles {
        if !matches!(plan.get(c).map(|p| &p.source), Some(Source::File { .. })) {
            return Err(DebError::UnknownConffile {
                path: c.clone(),
                origin: metadata::PACKAGE_YAML.to_owned(),
            });
        }
        if !conffiles.contains(c) {
            conffiles.push(c.clone());
        }
    }
    conffiles.sort();

    // Installed-Size the way dpkg-gencontrol counts: KiB per file, 1 per other entry.
    let installed_size_kb: u64 = plan
        .entries
        .values()
        .map(|p| match &p.source {
            Source::File { size, .. } => size.div_ceil(1024),
            Source::Generated { data, .. } => (data.len() as u64).div_ceil(1024),
            _ => 1,
        })
        .sum();
    let files = plan
        .entries
        .values()
        .filter(|p| !matches!(p.source, Source::Dir))
        .count();

    // ---- Writing starts here. ----
    std::fs::create_dir_all(&req.out_dir).map_err(DebError::io("creating", &req.out_dir))?;
    let deb_name = format!("{}_{}_{}.deb", meta.name, file_version, meta.architecture);
    let final_path = req.out_dir.join(&deb_name);
    let pid = std::process::id();
    let data_tmp = TempFile(req.out_dir.join(format!(".{deb_name}.data.{pid}.tmp")));
    let deb_tmp = TempFile(req.out_dir.join(format!(".{deb_name}.{pid}.tmp")));

    // data.tar, streamed to a temporary file.
    let ext = req.compression.extension();
    let data_member = format!("data.tar.{ext}");
    let data_file = File::create(&data_tmp.0).map_err(DebError::io("creating", &data_tmp.0))?;
    let md5sums = write_data_tar(
        BufWriter::with_capacity(1 << 20, data_file),
        &plan,
        &conffiles,
        mtime,
        req.compression,
        &data_tmp.0,
    )?;

    // control.tar, in memory.
    let control_text = control::control_file(&meta, &version, installed_size_kb);
    let postinst_text = control::postinst(&post_inst_dest);
    let prerm_text = prerm_dest.as_deref().map(control::prerm);
    let control_tar = {
        let enc = compress::Encoder::new(Vec::new(), req.compression)
            .map_err(compression_error("control.tar"))?;
        let mut t = tar::TarWriter::new(enc, mtime);
        let mut members: Vec<(&str, u32, &[u8])> = vec![
            ("./control", 0o644, control_text.as_bytes()),
            ("./md5sums", 0o644, md5sums.as_bytes()),
        ];
        let conffiles_text: String = conffiles.iter().map(|c| format!("{c}\n")).collect();
        if !conffiles.is_empty() {
            members.push(("./conffiles", 0o644, conffiles_text.as_bytes()));
        }
        members.push(("./postinst", 0o755, postinst_text.as_bytes()));
        if let Some(p) = &prerm_text {
            members.push(("./prerm", 0o755, p.as_bytes()));
        }
        if let Some(p) = &postrm_text {
            members.push(("./postrm", 0o755, p.as_bytes()));
        }
        members.sort_by(|a, b| a.0.cmp(b.0));
        let write = |t: &mut tar::TarWriter<_>| -> io::Result<()> {
            t.dir("./", 0o755)?;
            for (name, mode, data) in &members {
                t.file_bytes(name, *mode, data)?;
            }
            Ok(())
        };
        write(&mut t).map_err(compression_error("control.tar"))?;
        t.finish()
            .and_then(|e| e.finish())
            .map_err(compression_error("control.tar"))?
    };

    // The ar container.
    let data_len = std::fs::metadata(&data_tmp.0)
        .map_err(DebError::io("reading", &data_tmp.0))?
        .len();
    let out = File::create(&deb_tmp.0).map_err(DebError::io("creating", &deb_tmp.0))?;
    let mut out = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, out),
        hasher: Sha256::new(),
        written: 0,
    };
    let write_ar = |out: &mut HashingWriter<_>| -> io::Result<()> {
        out.write_all(ar::MAGIC)?;
        ar::write_member(out, "debian-binary", mtime, b"2.0\n")?;
        ar::write_member(out, &format!("control.tar.{ext}"), mtime, &control_tar)?;
        out.write_all(&ar::member_header(&data_member, mtime, data_len)?)?;
        let mut data = File::open(&data_tmp.0)?;
        let copied = io::copy(&mut data, out)?;
        if copied != data_len {
            return Err(io::Error::other("temporary data.tar changed size"));
        }
        if data_len % 2 == 1 {
            out.write_all(b"\n")?;
        }
        out.flush()
    };
    write_ar(&mut out).map_err(DebError::io("writing", &deb_tmp.0))?;
    let size = out.written;
    let sha256 = hex::encode(out.hasher.finalize());
    std::fs::set_permissions(&deb_tmp.0, std::fs::Permissions::from_mode(0o644))
        .map_err(DebError::io("setting permissions of", &deb_tmp.0))?;
    std::fs::rename(&deb_tmp.0, &final_path).map_err(DebError::io("renaming to", &final_path))?;

    Ok(BuiltPackage {
        path: final_path,
        name: meta.name,
        version,
        architecture: meta.architecture,
        size,
        sha256,
        installed_size_kb,
        files,
    })
}

/// Streams the planned entries into a compressed tar at `out`; returns the
/// md5sums file content (conffiles excluded, like debhelper does).
fn write_data_tar<W: Write + Send>(
    out: W,
    plan: &tree::Plan,
    conffiles: &[String],
    mtime: u64,
    compression: Compression,
    tmp_path: &Path,
) -> Result<String, DebError> {
    let enc = compress::Encoder::new(out, compression).map_err(compression_error("data.tar"))?;
    let mut t = tar::TarWriter::new(enc, mtime);
    let mut md5sums = String::new();
    let mut buf = vec![0u8; 256 * 1024];
    let werr = |e| DebError::Compression {
        member: "data.tar",
        message: format!("writing {}: {e}", tmp_path.display()),
    };
    t.dir("./", 0o755).map_err(werr)?;
    for (key, planned) in &plan.entries {
        let name = format!("./{key}");
        match &planned.source {
            Source::Dir => t.dir(&format!("{name}/"), 0o755).map_err(werr)?,
            Source::Symlink { target } => t.symlink(&name, target).map_err(werr)?,
            Source::Generated { data, mode } => {
                t.file_bytes(&name, *mode, data).map_err(werr)?;
                md5sums.push_str(&format!("{}  {key}\n", hex::encode(Md5::digest(data))));
            }
            Source::File { path, size, mode } => {
                let mut f = File::open(path).map_err(DebError::io("reading", path))?;
                let mut md5 = Md5::new();
                t.file_from(&name, *mode, *size, &mut f, &mut buf, |chunk| {
                    md5.update(chunk)
                })
                .map_err(DebError::io("packaging", path))?;
                let is_conffile = conffiles.iter().any(|c| c.trim_start_matches('/') == key);
                if !is_conffile {
                    md5sums.push_str(&format!("{}  {key}\n", hex::encode(md5.finalize())));
                }
            }
        }
    }
    let mut inner = t.finish().and_then(|enc| enc.finish()).map_err(werr)?;
    inner.flush().map_err(werr)?;
    Ok(md5sums)
}

/// Maps an I/O error of a compressor into [`DebError::Compression`].
fn compression_error(member: &'static str) -> impl Fn(io::Error) -> DebError {
    move |e| DebError::Compression {
        member,
        message: e.to_string(),
    }
}

/// gzip -9n of a small buffer (for changelog.Debian.gz).
fn gzip_best(data: &[u8]) -> Result<Vec<u8>, DebError> {
    let mut e = compress::Encoder::new(Vec::new(), Compression::Gzip { level: 9 })
        .map_err(compression_error("changelog.Debian.gz"))?;
    e.write_all(data)
        .and_then(|_| e.finish())
        .map_err(compression_error("changelog.Debian.gz"))
}

/// Checks a convention script: exists, is a file, is executable.
fn check_executable(path: &Path) -> Result<(), DebError> {
    let md = match std::fs::metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DebError::ConventionScript {
                path: path.to_path_buf(),
                problem: "is missing",
            });
        }
        Err(e) => return Err(DebError::io("reading", path)(e)),
    };
    if !md.is_file() {
        return Err(DebError::ConventionScript {
            path: path.to_path_buf(),
            problem: "is not a regular file",
        });
    }
    if md.permissions().mode() & 0o111 == 0 {
        return Err(DebError::ConventionScript {
            path: path.to_path_buf(),
            problem: "is not executable",
        });
    }
    Ok(())
}

/// Checks a prerm/postrm source script.
fn check_maintainer_script(
    field: &'static str,
    path: &Path,
    must_be_executable: bool,
) -> Result<(), DebError> {
    let md = std::fs::metadata(path).map_err(|_| DebError::MaintainerScript {
        field,
        path: path.to_path_buf(),
        problem: "is missing",
    })?;
    if !md.is_file() {
        return Err(DebError::MaintainerScript {
            field,
            path: path.to_path_buf(),
            problem: "is not a regular file",
        });
    }
    if must_be_executable && md.permissions().mode() & 0o111 == 0 {
        return Err(DebError::MaintainerScript {
            field,
            path: path.to_path_buf(),
            problem: "is not executable (chmod +x it)",
        });
    }
    Ok(())
}

/// A file removed on drop unless it was renamed away.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A writer that hashes (SHA-256) and counts what goes through.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
