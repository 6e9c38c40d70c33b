//! Reading what an index needs from a `.deb`: its control paragraph and the
//! file's size and digests (MD5, SHA-1, SHA-256), in one pass over the file.

use std::io::{self, Read};
use std::path::Path;

use md5::Digest;

use super::AptError;

/// A control paragraph: fields in their original order.
pub type Paragraph = Vec<(String, String)>;

/// What `add` learns from a package file.
#[derive(Debug, Clone)]
pub struct DebInfo {
    /// The control paragraph, fields in file order.
    pub control: Paragraph,
    /// `Package`.
    pub name: String,
    /// `Version`.
    pub version: String,
    /// `Architecture`.
    pub arch: String,
    /// `Source` without a version, or the package name.
    pub source: String,
    /// File size in bytes.
    pub size: u64,
    /// Lowercase hex MD5.
    pub md5: String,
    /// Lowercase hex SHA-1.
    pub sha1: String,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

/// Reads and digests `path`.
pub fn inspect(path: &Path) -> Result<DebInfo, AptError> {
    let bytes = std::fs::read(path).map_err(AptError::io("reading", path))?;
    let not_deb = |reason: &str| AptError::NotADeb {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let control_text = control_from_ar(&bytes).map_err(|e| not_deb(&e))?;
    let control = parse_paragraph(&control_text).map_err(|reason| AptError::BadControl {
        path: path.to_path_buf(),
        reason,
    })?;
    let field = |name: &str| {
        control
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| AptError::BadControl {
                path: path.to_path_buf(),
                reason: format!("required field {name} is missing"),
            })
    };
    let name = field("Package")?;
    let version = field("Version")?;
    let arch = field("Architecture")?;
    if !valid_name(&name) {
        return Err(AptError::BadControl {
            path: path.to_path_buf(),
            reason: format!(
                "package name `{name}` is invalid (lowercase alphanumerics and +-. only, starting alphanumeric)"
            ),
        });
    }
    if !version
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b".+-~:".contains(&c))
        || arch.contains(['/', ' '])
    {
        return Err(AptError::BadControl {
            path: path.to_path_buf(),
            reason: format!("version `{version}` or architecture `{arch}` has invalid characters"),
        });
    }
    let source = field("Source")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| name.clone());
    Ok(DebInfo {
        name,
        version,
        arch,
        source,
        size: bytes.len() as u64,
        md5: hex::encode(md5::Md5::digest(&bytes)),
        sha1: hex::encode(sha1::Sha1::digest(&bytes)),
        sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        control,
    })
}

/// Debian package name rule.
fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(c))
}

/// Finds `control.tar*` in the ar archive and returns the `control` file text.
fn control_from_ar(bytes: &[u8]) -> Result<String, String> {
    if !bytes.starts_with(b"!<arch>\n") {
        return Err("no ar archive signature".into());
    }
    let mut pos = 8;
    let mut first = true;
    while pos + 60 <= bytes.len() {
        let header = &bytes[pos..pos + 60];
        let name = String::from_utf8_lossy(&header[..16])
            .trim_end()
            .trim_end_matches('/')
            .to_string();
        let size: usize = String::from_utf8_lossy(&header[48..58])
            .trim()
            .parse()
            .map_err(|_| format!("bad size in ar member header of `{name}`"))?;
        let start = pos + 60;
        let end = start
            .checked_add(size)
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| format!("ar member `{name}` is truncated"))?;
        let data = &bytes[start..end];
        if first && name != "debian-binary" {
            return Err("first member is not debian-binary".into());
        }
        first = false;
        if let Some(ext) = name.strip_prefix("control.tar") {
            let tar = decompress(ext, data)?;
            return control_from_tar(&tar);
        }
        pos = end + (size & 1);
    }
    Err("no control.tar member".into())
}

/// Decompresses a member by its name extension.
fn decompress(ext: &str, data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let r: io::Result<usize> = match ext {
        "" => return Ok(data.to_vec()),
        ".gz" => flate2::read::GzDecoder::new(data).read_to_end(&mut out),
        ".xz" => liblzma::read::XzDecoder::new(data).read_to_end(&mut out),
        other => {
            return Err(format!(
                "control.tar{other} compression is not supported (use gzip or xz)"
            ));
        }
    };
    r.map_err(|e| format!("control.tar{ext} does not decompress: {e}"))?;
    Ok(out)
}

/// Finds `./control` in a tar archive.
fn control_from_tar(tar: &[u8]) -> Result<String, String> {
    let mut pos = 0;
    let mut long_name: Option<String> = None;
    while pos + 512 <= tar.len() {
        let h = &tar[pos..pos + 512];
        if h.iter().all(|b| *b == 0) {
            break;
        }
        let cstr = |s: &[u8]| {
            let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).to_string()
        };
        let size_field = cstr(&h[124..136]);
        let size = usize::from_str_radix(size_field.trim(), 8)
            .map_err(|_| "bad size in control.tar header".to_string())?;
        let typ = h[156];
        let start = pos + 512;
        let end = start
            .checked_add(size)
            .filter(|e| *e <= tar.len())
            .ok_or("control.tar is truncated")?;
        let mut name = long_name.take().unwrap_or_else(|| {
            let prefix = cstr(&h[345..500]);
            let n = cstr(&h[..100]);
            if &h[257..262] == b"ustar" && !prefix.is_empty() {
                format!("{prefix}/{n}")
            } else {
                n
            }
        });
        if typ == b'L' {
            long_name = Some(cstr(&tar[start..end]));
        } else {
            if let Some(n) = name.strip_prefix("./") {
                name = n.to_string();
            }
            if name == "control" && (typ == b'0' || typ == 0) {
                return String::from_utf8(tar[start..end].to_vec())
                    .map_err(|_| "control file is not UTF-8".to_string());
            }
        }
        pos = start + size.div_ceil(512) * 512;
    }
    Err("control.tar has no control file".into())
}

/// Parses one deb822 paragraph (continuation lines keep their leading space).
pub fn parse_paragraph(text: &str) -> Result<Paragraph, String> {
    let mut fields: Paragraph = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            if fields.is_empty() {
                continue;
            }
            break;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            let Some(last) = fields.last_mut() else {
                return Err(format!(
                    "line {} continues a field but no field started",
                    n + 1
                ));
            };
            last.1.push('\n');
            last.1.push_str(line);
        } else if let Some((k, v)) = line.split_once(':') {
            if k.is_empty() || k.contains(char::is_whitespace) {
                return Err(format!("line {}: bad field name `{k}`", n + 1));
            }
            fields.push((k.to_string(), v.trim().to_string()));
        } else if !line.starts_with('#') {
            return Err(format!(
                "line {}: expected `Field: value`, got `{line}`",
                n + 1
            ));
        }
    }
    if fields.is_empty() {
        return Err("empty control file".into());
    }
    Ok(fields)
}
