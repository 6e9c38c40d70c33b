//! Package metadata read from an application repository, and dpkg's rules
//! for names, versions and control fields.
//!
//! Two optional files are read, both at the repository root:
//!
//! * `fpm.json` (the seed's format, FPM option names): `name`, `version`,
//!   `epoch`, `iteration`, `description`, `maintainer`, `depends` (a list or a
//!   comma-separated string), `architecture`, `url` (→ Homepage), `license`.
//!   Unknown keys are ignored (FPM has many options Aviary does not use).
//! * `.aviary/package.yaml` (Aviary's own, unknown keys are refused so typos
//!   are caught): the same keys as fpm.json (they override it; `homepage` is
//!   accepted as well as `url`) plus `prefix`, `section`, `priority`,
//!   `conffiles`, `exclude`, `prerm`, `postrm`, `files` (extra files mapping
//!   `repo/relative/source: /absolute/or/prefix-relative/destination`) and
//!   `root_dir` (the overlay folder copied to `/`, default `debian-root`).
//!
//! Defaults: name = the repository folder name, lowercased, with characters
//! dpkg refuses replaced by `-`; version `0.0.0` (metadata only: no
//! `git describe`); architecture `all`; maintainer
//! `Aviary <aviary@aviary.invalid>` (a reserved domain that lintian accepts as a
//! mail host); prefix `/opt/<name>`; section `misc`; priority `optional`;
//! description = the first line of the README (`README.md`, `README`, ...),
//! else `<name> application`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::error::DebError;

/// File name of the seed's metadata file, at the repository root.
pub const FPM_JSON: &str = "fpm.json";
/// Path of Aviary's metadata file, relative to the repository root.
pub const PACKAGE_YAML: &str = ".aviary/package.yaml";
/// Default overlay folder: its content is installed relative to `/`.
pub const DEFAULT_ROOT_DIR: &str = "debian-root";
/// Default maintainer when none is declared.
pub const DEFAULT_MAINTAINER: &str = "Aviary <aviary@aviary.invalid>";
/// Default upstream version when none is declared.
pub const DEFAULT_VERSION: &str = "0.0.0";

/// Everything needed to build a package, read from a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageMetadata {
    /// Package name (validated against dpkg's rules).
    pub name: String,
    /// Upstream version, without epoch or Debian revision.
    pub version: String,
    /// Optional epoch (`E:` in front of the version).
    pub epoch: Option<u32>,
    /// Declared iteration (build-number part of the Debian revision), if any.
    pub iteration: Option<String>,
    /// Synopsis (one line, the first line of Description).
    pub synopsis: String,
    /// Extended description lines (may be empty; `.` lines are blank lines).
    pub extended_description: Vec<String>,
    /// Maintainer, `Name <mail>`.
    pub maintainer: String,
    /// Depends entries, each one relation (`foo (>= 1)` or `a | b`).
    pub depends: Vec<String>,
    /// Debian architecture (`all`, `amd64`, ...).
    pub architecture: String,
    /// Install prefix: absolute, normalized, without trailing slash.
    pub prefix: String,
    /// Section field.
    pub section: String,
    /// Priority field.
    pub priority: String,
    /// Homepage field.
    pub homepage: Option<String>,
    /// License name, written into the copyright file.
    pub license: Option<String>,
    /// Extra conffiles (absolute paths) beyond every file under `/etc`.
    pub conffiles: Vec<String>,
    /// Exclude globs, matched against repository-relative paths.
    pub exclude: Vec<String>,
    /// Repository-relative path of the script run by prerm, if any.
    pub prerm: Option<String>,
    /// Repository-relative path of the script embedded into postrm, if any.
    pub postrm: Option<String>,
    /// Extra files: repository-relative source → destination (absolute, or
    /// relative to the prefix).
    pub files: BTreeMap<String, String>,
    /// Overlay folder (repository-relative) whose content is installed under `/`.
    pub root_dir: String,
}

impl PackageMetadata {
    /// The Description field value (synopsis + extended lines, in control syntax).
    pub fn description_field(&self) -> String {
        let mut out = self.synopsis.clone();
        for line in &self.extended_description {
            out.push_str("\n ");
            out.push_str(line);
        }
        out
    }
}

/// `depends` as a list or a comma-separated string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Depends {
    List(Vec<String>),
    Text(String),
}

impl Depends {
    fn into_list(self) -> Vec<String> {
        let items = match self {
            Depends::List(items) => items,
            Depends::Text(text) => split_relations(&text),
        };
        items
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// Splits a comma-separated relation list (commas never occur inside a relation).
fn split_relations(text: &str) -> Vec<String> {
    text.split(',').map(|s| s.trim().to_owned()).collect()
}

/// A scalar that may be written as a string or a number (`"version": 1`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Int(u64),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Scalar::Text(s) => s,
            Scalar::Int(n) => n.to_string(),
        }
    }
}

/// The subset of fpm.json Aviary reads.
#[derive(Debug, Default, Deserialize)]
struct FpmJson {
    name: Option<String>,
    version: Option<Scalar>,
    epoch: Option<Scalar>,
    iteration: Option<Scalar>,
    description: Option<String>,
    maintainer: Option<String>,
    depends: Option<Depends>,
    architecture: Option<String>,
    url: Option<String>,
    license: Option<String>,
}

/// `.aviary/package.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PackageYaml {
    name: Option<String>,
    version: Option<Scalar>,
    epoch: Option<Scalar>,
    iteration: Option<Scalar>,
    description: Option<String>,
    maintainer: Option<String>,
    depends: Option<Depends>,
    architecture: Option<String>,
    #[serde(alias = "url")]
    homepage: Option<String>,
    license: Option<String>,
    prefix: Option<String>,
    section: Option<String>,
    priority: Option<String>,
    #[serde(default)]
    conffiles: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    prerm: Option<String>,
    postrm: Option<String>,
    #[serde(default)]
    files: BTreeMap<String, String>,
    root_dir: Option<String>,
}

/// Reads and validates the package metadata of the repository at `repo_dir`.
///
/// Reads `fpm.json` and `.aviary/package.yaml` when present (see the module
/// documentation for keys and defaults) and checks every value against dpkg's
/// rules, so a bad name or version is reported before anything is built.
pub fn read_metadata(repo_dir: &Path) -> Result<PackageMetadata, DebError> {
    if !repo_dir.is_dir() {
        return Err(DebError::NotARepository {
            path: repo_dir.to_path_buf(),
        });
    }
    let fpm_path = repo_dir.join(FPM_JSON);
    let fpm: FpmJson = match read_optional(&fpm_path)? {
        Some(text) => serde_json::from_str(&text).map_err(|e| DebError::MetadataParse {
            path: fpm_path.clone(),
            message: e.to_string(),
        })?,
        None => FpmJson::default(),
    };
    let yaml_path = repo_dir.join(PACKAGE_YAML);
    let yaml: PackageYaml = match read_optional(&yaml_path)? {
        Some(text) if text.trim().is_empty() => PackageYaml::default(),
        Some(text) => serde_saphyr::from_str(&text).map_err(|e| DebError::MetadataParse {
            path: yaml_path.clone(),
            message: e.to_string(),
        })?,
        None => PackageYaml::default(),
    };
    let fpm_origin = fpm_path.display().to_string();
    let yaml_origin = yaml_path.display().to_string();
    // Picks the package.yaml value over the fpm.json one, remembering the origin.
    fn pick<T>(yaml: Option<T>, fpm: Option<T>, yo: &str, fo: &str) -> Option<(T, String)> {
        yaml.map(|v| (v, yo.to_owned()))
            .or_else(|| fpm.map(|v| (v, fo.to_owned())))
    }

    let (name, name_origin) = match pick(yaml.name, fpm.name, &yaml_origin, &fpm_origin) {
        Some(found) => found,
        None => (
            default_name(repo_dir),
            "the repository folder name".to_owned(),
        ),
    };
    validate_name(&name, &name_origin)?;

    let (version, version_origin) = match pick(yaml.version, fpm.version, &yaml_origin, &fpm_origin)
    {
        Some((v, o)) => (v.into_string(), o),
        None => (DEFAULT_VERSION.to_owned(), "the default".to_owned()),
    };
    validate_upstream_version(&version, &version_origin)?;

    let epoch = match pick(yaml.epoch, fpm.epoch, &yaml_origin, &fpm_origin) {
        Some((v, origin)) => {
            let text = v.into_string();
            Some(text.parse::<u32>().map_err(|_| DebError::InvalidVersion {
                part: "epoch",
                value: text.clone(),
                origin,
                rule: "an epoch is a small unsigned integer (like 1); remove it or fix it",
            })?)
        }
        None => None,
    };

    let iteration = match pick(yaml.iteration, fpm.iteration, &yaml_origin, &fpm_origin) {
        Some((v, origin)) => {
            let text = v.into_string();
            validate_revision_part(&text, "iteration", &origin)?;
            Some(text)
        }
        None => None,
    };

    let (architecture, arch_origin) = pick(
        yaml.architecture,
        fpm.architecture,
        &yaml_origin,
        &fpm_origin,
    )
    .unwrap_or_else(|| ("all".to_owned(), "the default".to_owned()));
    validate_architecture(&architecture, &arch_origin)?;

    let (maintainer, maint_origin) =
        pick(yaml.maintainer, fpm.maintainer, &yaml_origin, &fpm_origin)
            .unwrap_or_else(|| (DEFAULT_MAINTAINER.to_owned(), "the default".to_owned()));
    let maintainer = maintainer.trim().to_owned();
    validate_single_line("Maintainer", &maintainer, &maint_origin)?;

    let description = match pick(yaml.description, fpm.description, &yaml_origin, &fpm_origin) {
        Some((d, _)) if !d.trim().is_empty() => d,
        _ => default_synopsis(readme_first_line(repo_dir), &name),
    };
    let (synopsis, extended_description) = split_description(&description, &name);

    let (depends, dep_origin) = match pick(yaml.depends, fpm.depends, &yaml_origin, &fpm_origin) {
        Some((d, o)) => (d.into_list(), o),
        None => (Vec::new(), String::new()),
    };
    for dep in &depends {
        validate_relation(dep, &dep_origin)?;
    }

    let homepage = pick(yaml.homepage, fpm.url, &yaml_origin, &fpm_origin);
    if let Some((h, o)) = &homepage {
        validate_single_line("Homepage", h, o)?;
    }
    let license = pick(yaml.license, fpm.license, &yaml_origin, &fpm_origin);
    if let Some((l, o)) = &license {
        validate_single_line("license", l, o)?;
    }

    let prefix = match yaml.prefix {
        Some(p) => normalize_prefix(&p, &yaml_origin)?,
        None => format!("/opt/{name}"),
    };
    let section = yaml.section.unwrap_or_else(|| "misc".to_owned());
    validate_token("Section", &section, &yaml_origin)?;
    let priority = yaml.priority.unwrap_or_else(|| "optional".to_owned());
    validate_token("Priority", &priority, &yaml_origin)?;

    let root_dir = match yaml.root_dir {
        Some(r) => {
            let cleaned = clean_relative(&r, &yaml_origin, "the repository")?;
            if cleaned.is_empty() {
                return Err(DebError::PathEscapes {
                    path: r,
                    origin: yaml_origin.clone(),
                    boundary: "the repository",
                    problem: "root_dir must name a sub-folder of the repository, not the repository itself",
                });
            }
            cleaned
        }
        None => DEFAULT_ROOT_DIR.to_owned(),
    };

    let mut files = BTreeMap::new();
    for (src, dest) in yaml.files {
        let clean_src = clean_relative(&src, &yaml_origin, "the repository")?;
        let clean_dest = resolve_destination(&dest, &prefix, &yaml_origin)?;
        files.insert(clean_src, clean_dest);
    }
    let prerm = yaml
        .prerm
        .map(|p| clean_relative(&p, &yaml_origin, "the repository"))
        .transpose()?;
    let postrm = yaml
        .postrm
        .map(|p| clean_relative(&p, &yaml_origin, "the repository"))
        .transpose()?;
    let mut conffiles = Vec::new();
    for c in yaml.conffiles {
        conffiles.push(resolve_destination(&c, &prefix, &yaml_origin)?);
    }
    for pattern in &yaml.exclude {
        glob::Pattern::new(pattern).map_err(|e| DebError::InvalidPattern {
            pattern: pattern.clone(),
            origin: yaml_origin.clone(),
            message: e.to_string(),
        })?;
    }

    Ok(PackageMetadata {
        name,
        version,
        epoch,
        iteration,
        synopsis,
        extended_description,
        maintainer,
        depends,
        architecture,
        prefix,
        section,
        priority,
        homepage: homepage.map(|(h, _)| h),
        license: license.map(|(l, _)| l),
        conffiles,
        exclude: yaml.exclude,
        prerm,
        postrm,
        files,
        root_dir,
    })
}

/// Reads a file if it exists.
fn read_optional(path: &Path) -> Result<Option<String>, DebError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DebError::io("reading", path)(e)),
    }
}

/// The repository folder name, lowercased, with characters dpkg refuses
/// replaced by `-` and leading non-alphanumerics dropped.
pub fn default_name(repo_dir: &Path) -> String {
    let folder = std::fs::canonicalize(repo_dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .or_else(|| {
            repo_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let mapped: String = folder
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    mapped
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// Checks a package name against dpkg's and Debian policy's rules.
pub fn validate_name(name: &str, origin: &str) -> Result<(), DebError> {
    let err = |rule| {
        Err(DebError::InvalidName {
            name: name.to_owned(),
            origin: origin.to_owned(),
            rule,
        })
    };
    if name.len() < 2 {
        return err("a package name must be at least two characters long (Debian policy 5.6.1)");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return err("a package name must start with a lowercase letter or a digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'))
    {
        return err("a package name may only contain lowercase letters, digits and + - .");
    }
    Ok(())
}

/// Checks an upstream version (the part before the Debian revision).
///
/// dpkg's rules: it must start with a digit and contain only alphanumerics and
/// `. + ~ -` (a hyphen is allowed because Aviary always appends a revision);
/// a colon is only allowed as the epoch separator, which Aviary writes itself.
pub fn validate_upstream_version(version: &str, origin: &str) -> Result<(), DebError> {
    let err = |rule| {
        Err(DebError::InvalidVersion {
            part: "version",
            value: version.to_owned(),
            origin: origin.to_owned(),
            rule,
        })
    };
    if !version.starts_with(|c: char| c.is_ascii_digit()) {
        return err(
            "a version must start with a digit (dpkg refuses others); write e.g. \"1.2.3\"",
        );
    }
    if version.contains(':') {
        return err("a colon is only allowed after an epoch; declare the epoch as \"epoch\"");
    }
    if !version
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '~' | '-'))
    {
        return err("a version may only contain letters, digits and . + ~ - (no spaces)");
    }
    Ok(())
}

/// Checks a part of the Debian revision (iteration, build number): dpkg allows
/// only alphanumerics and `+ . ~` there (a hyphen would start a new revision).
pub fn validate_revision_part(
    value: &str,
    part: &'static str,
    origin: &str,
) -> Result<(), DebError> {
    if value.is_empty()
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '~'))
    {
        return Err(DebError::InvalidVersion {
            part,
            value: value.to_owned(),
            origin: origin.to_owned(),
            rule: "the Debian revision may only contain letters, digits and + . ~ (no hyphen: it separates the revision), and must not be empty",
        });
    }
    Ok(())
}

/// Checks a commit id (hexadecimal, 4 to 64 characters) and returns its short
/// (7 characters, lowercase) form.
pub fn short_commit(commit: &str) -> Result<String, DebError> {
    let c = commit.trim().to_ascii_lowercase();
    if c.len() < 4 || c.len() > 64 || !c.chars().all(|ch| ch.is_ascii_hexdigit()) {
        return Err(DebError::InvalidVersion {
            part: "commit",
            value: commit.to_owned(),
            origin: "the build request".to_owned(),
            rule: "a commit id is 4 to 64 hexadecimal digits; pass the git commit id",
        });
    }
    Ok(c.chars().take(7).collect())
}

/// Checks an architecture name.
fn validate_architecture(arch: &str, origin: &str) -> Result<(), DebError> {
    if arch.is_empty()
        || !arch
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(DebError::InvalidField {
            field: "Architecture",
            value: arch.to_owned(),
            origin: origin.to_owned(),
            problem: "an architecture is a Debian architecture name such as all, amd64 or arm64",
        });
    }
    Ok(())
}

/// Checks that a field value is one non-empty line.
fn validate_single_line(field: &'static str, value: &str, origin: &str) -> Result<(), DebError> {
    if value.trim().is_empty() || value.contains(['\n', '\r']) {
        return Err(DebError::InvalidField {
            field,
            value: value.to_owned(),
            origin: origin.to_owned(),
            problem: "the value must be a single non-empty line",
        });
    }
    Ok(())
}

/// Checks a one-word field (Section, Priority).
fn validate_token(field: &'static str, value: &str, origin: &str) -> Result<(), DebError> {
    if value.is_empty()
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '+' | '.' | '_'))
    {
        return Err(DebError::InvalidField {
            field,
            value: value.to_owned(),
            origin: origin.to_owned(),
            problem: "the value must be one word such as misc, web or optional",
        });
    }
    Ok(())
}

/// Checks one Depends relation (`pkg`, `pkg (>= 1.0)`, `a | b`).
fn validate_relation(rel: &str, origin: &str) -> Result<(), DebError> {
    let ok_chars = rel.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                ' ' | '('
                    | ')'
                    | '<'
                    | '>'
                    | '='
                    | '|'
                    | '.'
                    | '+'
                    | '-'
                    | '~'
                    | ':'
                    | '['
                    | ']'
                    | '!'
            )
    });
    let starts_ok = rel.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !ok_chars || !starts_ok {
        return Err(DebError::InvalidField {
            field: "Depends",
            value: rel.to_owned(),
            origin: origin.to_owned(),
            problem: "each dependency must look like `pkg`, `pkg (>= 1.0)` or `a | b`",
        });
    }
    Ok(())
}

/// Splits a description into a synopsis and extended lines in control syntax.
fn split_description(description: &str, name: &str) -> (String, Vec<String>) {
    let mut lines = description.lines();
    let synopsis = lines.next().unwrap_or_default().trim().to_owned();
    let mut extended: Vec<String> = lines
        .map(|l| {
            let l = l.trim_end();
            if l.trim().is_empty() {
                ".".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect();
    while extended.first().is_some_and(|l| l == ".") {
        extended.remove(0);
    }
    while extended.last().is_some_and(|l| l == ".") {
        extended.pop();
    }
    if extended.is_empty() {
        extended.push(format!(
            "The {name} application, packaged by Aviary from its source repository."
        ));
    }
    (synopsis, extended)
}

/// The synopsis used when none is declared: the README's first line, made
/// lintian-clean (a synopsis must not start with the package name).
fn default_synopsis(readme: Option<String>, name: &str) -> String {
    match readme {
        Some(line) => {
            let lower = line.to_ascii_lowercase();
            let starts_with_name = lower.starts_with(name)
                && !lower[name.len()..]
                    .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
            let normalized_name = name.replace(['-', '_'], " ");
            let normalized_line = lower.replace(['-', '_', '/', '\\'], " ");
            if starts_with_name || normalized_line == normalized_name {
                format!("Application: {line}")
            } else {
                line
            }
        }
        None => format!("Application {name}, packaged by Aviary"),
    }
}

/// First meaningful line of the repository's README, if any.
fn readme_first_line(repo_dir: &Path) -> Option<String> {
    for candidate in [
        "README.md",
        "README",
        "README.rst",
        "README.txt",
        "readme.md",
        "Readme.md",
    ] {
        let Ok(text) = std::fs::read_to_string(repo_dir.join(candidate)) else {
            continue;
        };
        for line in text.lines() {
            let line = line.trim().trim_start_matches('#').trim();
            if line.is_empty() || line.chars().all(|c| matches!(c, '=' | '-' | '*' | '~')) {
                continue;
            }
            return Some(line.to_owned());
        }
    }
    None
}

/// Splits a `/`-separated path into normal components, refusing `..`.
fn clean_components<'a>(
    path: &'a str,
    origin: &str,
    boundary: &'static str,
) -> Result<Vec<&'a str>, DebError> {
    let mut out = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                return Err(DebError::PathEscapes {
                    path: path.to_owned(),
                    origin: origin.to_owned(),
                    boundary,
                    problem: "\"..\" is not allowed in packaged paths; write the path without it",
                });
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Normalizes a repository-relative path (no leading `/`, no `..`).
fn clean_relative(path: &str, origin: &str, boundary: &'static str) -> Result<String, DebError> {
    if path.starts_with('/') {
        return Err(DebError::PathEscapes {
            path: path.to_owned(),
            origin: origin.to_owned(),
            boundary,
            problem: "source paths are relative to the repository root; remove the leading /",
        });
    }
    Ok(clean_components(path, origin, boundary)?.join("/"))
}

/// Resolves a destination: absolute paths stay, relative ones go under the
/// prefix; `..` is refused. Returns an absolute normalized path.
pub fn resolve_destination(dest: &str, prefix: &str, origin: &str) -> Result<String, DebError> {
    let boundary = if dest.starts_with('/') {
        "the file system root"
    } else {
        "the install prefix"
    };
    let comps = clean_components(dest, origin, boundary)?;
    if comps.is_empty() {
        return Err(DebError::PathEscapes {
            path: dest.to_owned(),
            origin: origin.to_owned(),
            boundary,
            problem: "a destination must name a file, not the root or the prefix itself",
        });
    }
    let joined = comps.join("/");
    if dest.starts_with('/') {
        Ok(format!("/{joined}"))
    } else {
        Ok(format!("{prefix}/{joined}"))
    }
}

/// Validates and normalizes an install prefix.
fn normalize_prefix(prefix: &str, origin: &str) -> Result<String, DebError> {
    let bad = |problem| {
        Err(DebError::PathEscapes {
            path: prefix.to_owned(),
            origin: origin.to_owned(),
            boundary: "the file system root",
            problem,
        })
    };
    if !prefix.starts_with('/') {
        return bad("the prefix must be an absolute path such as /opt/myapp");
    }
    let comps = clean_components(prefix, origin, "the file system root")?;
    if comps.is_empty() {
        return bad("the prefix must be a dedicated directory such as /opt/myapp, not /");
    }
    if !comps.iter().all(|c| {
        c.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '+' | '-'))
    }) {
        return bad("the prefix may only contain letters, digits and . _ + - between slashes");
    }
    Ok(format!("/{}", comps.join("/")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dpkg_rules() {
        assert!(validate_name("seatshare", "t").is_ok());
        assert!(validate_name("lib+x.y-z", "t").is_ok());
        for bad in ["A", "Seat", "-x", "a_b", "a b", "x"] {
            assert!(validate_name(bad, "t").is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_follow_dpkg_rules() {
        assert!(validate_upstream_version("1.2.3", "t").is_ok());
        assert!(validate_upstream_version("1.0~rc1+git-2", "t").is_ok());
        for bad in ["v1.0", "", "1:2", "1 2", "1_2"] {
            assert!(validate_upstream_version(bad, "t").is_err(), "{bad}");
        }
        assert!(validate_revision_part("1700000000.abc1234", "iteration", "t").is_ok());
        assert!(validate_revision_part("1-2", "iteration", "t").is_err());
        assert_eq!(short_commit("ABCDEF0123456789").unwrap(), "abcdef0");
        assert!(short_commit("xyz").is_err());
    }

    #[test]
    fn destinations_and_prefixes() {
        assert_eq!(
            resolve_destination("conf/a", "/opt/x", "t").unwrap(),
            "/opt/x/conf/a"
        );
        assert_eq!(
            resolve_destination("/etc/x/a", "/opt/x", "t").unwrap(),
            "/etc/x/a"
        );
        assert!(resolve_destination("../a", "/opt/x", "t").is_err());
        assert!(resolve_destination("/etc/../a", "/opt/x", "t").is_err());
        assert!(normalize_prefix("/", "t").is_err());
        assert_eq!(normalize_prefix("/srv//app/", "t").unwrap(), "/srv/app");
    }

    #[test]
    fn descriptions_are_split() {
        let (s, e) = split_description("Short\n\nLong text\n\nmore\n", "x");
        assert_eq!(s, "Short");
        assert_eq!(e, vec!["Long text", ".", "more"]);
        let (_, e) = split_description("Only", "x");
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn default_synopsis_avoids_the_package_name() {
        assert_eq!(
            default_synopsis(None, "app"),
            "Application app, packaged by Aviary"
        );
        assert_eq!(
            default_synopsis(Some("Seatshare books seats".into()), "seatshare"),
            "Application: Seatshare books seats"
        );
        assert_eq!(
            default_synopsis(Some("Seatshares".into()), "seatshare"),
            "Seatshares"
        );
    }

    #[test]
    fn default_name_is_sanitized() {
        assert_eq!(default_name(Path::new("/nonexistent/My_App")), "my-app");
        assert_eq!(default_name(Path::new("/nonexistent/_Foo")), "foo");
    }
}
