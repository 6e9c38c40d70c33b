//! The runner types Aviary knows and their runner parameters (StackStorm names).
//!
//! Runner parameters configure the runner itself (`cmd`, `url`, `timeout`...).
//! An action inherits them and may override their attributes (default,
//! immutable, ...) in its own `parameters`.

use crate::action::{ParamSchema, ParamSpec, ParamType};
use serde_json::{Value, json};

/// Every runner type Aviary accepts in action metadata.
pub const RUNNER_TYPES: &[&str] = &[
    "noop",
    "local-shell-cmd",
    "local-shell-script",
    "http-request",
    "orquesta",
    "inject-trigger",
    "ci-build",
    "deb-build",
    "apt-publish",
    "ci-package",
    "jenkins-build",
    "inquirer",
    "deploy",
    "remote-shell-cmd",
    "remote-shell-script",
];

/// Runner types whose actions must name an `entry_point` file.
pub const ENTRY_POINT_REQUIRED: &[&str] =
    &["local-shell-script", "remote-shell-script", "orquesta"];

fn spec(kind: ParamType, description: &str) -> ParamSpec {
    ParamSpec {
        kind,
        description: description.to_string(),
        default: None,
        required: false,
        secret: false,
        immutable: false,
        enum_values: None,
        position: None,
        runner_param: true,
    }
}

fn with_default(mut s: ParamSpec, default: Value) -> ParamSpec {
    s.default = Some(default);
    s
}

fn required(mut s: ParamSpec) -> ParamSpec {
    s.required = true;
    s
}

fn secret(mut s: ParamSpec) -> ParamSpec {
    s.secret = true;
    s
}

/// Parameters of a .deb build (`deb-build`, `ci-package`).
fn deb_params() -> Vec<(String, ParamSpec)> {
    let mut compression = with_default(
        spec(
            ParamType::String,
            "Compression of the .deb members: gzip or xz.",
        ),
        json!("gzip"),
    );
    compression.enum_values = Some(vec![json!("gzip"), json!("xz")]);
    vec![
        (
            "build_number".into(),
            spec(
                ParamType::String,
                "Build number of the iteration (`<version>-<build number>.<short commit>`); default: the metadata's iteration, else the time.",
            ),
        ),
        ("compression".into(), compression),
        (
            "level".into(),
            spec(
                ParamType::Integer,
                "Compression level 0..9; default 6 for gzip, 1 for xz.",
            ),
        ),
        (
            "source_date_epoch".into(),
            spec(
                ParamType::Integer,
                "Timestamp of every file in the package (reproducible builds); default: the commit's time.",
            ),
        ),
    ]
}

/// Parameters of a publication into the server's APT repository.
fn publish_params() -> Vec<(String, ParamSpec)> {
    vec![
        (
            "suite".into(),
            with_default(
                spec(ParamType::String, "Suite to publish into."),
                json!("stable"),
            ),
        ),
        (
            "component".into(),
            with_default(
                spec(ParamType::String, "Component to publish into."),
                json!("main"),
            ),
        ),
        (
            "keep_versions".into(),
            spec(
                ParamType::Integer,
                "Keep this many versions of each package (older ones leave the index); default: the repository's setting (5).",
            ),
        ),
    ]
}

fn checkout_params() -> Vec<(String, ParamSpec)> {
    vec![
        (
            "repo".into(),
            required(spec(
                ParamType::String,
                "Repository: a URL git can fetch, or a path.",
            )),
        ),
        (
            "branch".into(),
            spec(ParamType::String, "Branch (refs/heads/ is optional)."),
        ),
        (
            "commit".into(),
            spec(ParamType::String, "Commit; default: the branch's head."),
        ),
        (
            "project".into(),
            spec(
                ParamType::String,
                "Project name; default: the repository's name.",
            ),
        ),
        (
            "depth".into(),
            with_default(
                spec(ParamType::Integer, "History depth to fetch."),
                json!(1),
            ),
        ),
    ]
}

fn shell_common() -> Vec<(String, ParamSpec)> {
    vec![
        (
            "env".into(),
            spec(
                ParamType::Object,
                "Environment variables for the command (name: value).",
            ),
        ),
        (
            "cwd".into(),
            spec(ParamType::String, "Working directory of the command."),
        ),
        (
            "timeout".into(),
            with_default(
                spec(
                    ParamType::Integer,
                    "Seconds before the command is killed (status timeout).",
                ),
                json!(60),
            ),
        ),
        (
            "kwarg_op".into(),
            with_default(
                spec(
                    ParamType::String,
                    "Prefix of named arguments passed to the command.",
                ),
                json!("--"),
            ),
        ),
    ]
}

/// Parameters shared by `remote-shell-cmd` and `remote-shell-script` (SSH).
fn remote_common() -> Vec<(String, ParamSpec)> {
    let mut hosts = spec(
        ParamType::String,
        "Comma-separated hosts to run on (name or address, optionally host:port).",
    );
    hosts.required = true;
    let mut key = spec(
        ParamType::String,
        "Private key: a file path, or the key itself (PEM/OpenSSH text).",
    );
    key.secret = true;
    let mut v = vec![
        ("hosts".to_string(), hosts),
        (
            "username".into(),
            spec(
                ParamType::String,
                "User to log in as; default: the user Aviary runs as.",
            ),
        ),
        ("private_key".into(), key),
        (
            "known_hosts".into(),
            spec(
                ParamType::String,
                "known_hosts file to check host keys against; default: ssh's own (~/.ssh/known_hosts). A host whose key is not in it is refused, never added.",
            ),
        ),
        (
            "port".into(),
            with_default(spec(ParamType::Integer, "SSH port."), json!(22)),
        ),
        (
            "sudo".into(),
            with_default(
                spec(
                    ParamType::Boolean,
                    "Run the command as root with sudo -n (passwordless sudo on the host).",
                ),
                json!(false),
            ),
        ),
        (
            "parallel".into(),
            with_default(
                spec(ParamType::Boolean, "Run on the hosts in parallel."),
                json!(true),
            ),
        ),
        (
            "concurrency".into(),
            with_default(
                spec(
                    ParamType::Integer,
                    "Maximum number of hosts at once when parallel.",
                ),
                json!(10),
            ),
        ),
        (
            "connect_timeout".into(),
            with_default(
                spec(
                    ParamType::Integer,
                    "Seconds to wait for each SSH connection.",
                ),
                json!(10),
            ),
        ),
    ];
    v.extend(shell_common());
    v
}

/// The runner parameters of `runner_type`, or None for an unknown runner type.
pub fn runner_parameters(runner_type: &str) -> Option<ParamSchema> {
    let params = match runner_type {
        "noop" | "inject-trigger" | "inquirer" | "deploy" => Vec::new(),
        "orquesta" => vec![(
            "timeout".to_string(),
            spec(
                ParamType::Integer,
                "Seconds the whole workflow may run; past it, its running tasks are canceled and it ends as timeout.",
            ),
        )],
        "local-shell-cmd" => {
            let mut cmd = spec(
                ParamType::String,
                "Command to run; positional parameters are passed as its arguments, never as shell text.",
            );
            cmd.required = true;
            let mut v = vec![("cmd".to_string(), cmd)];
            v.extend(shell_common());
            v
        }
        "local-shell-script" => shell_common(),
        "remote-shell-cmd" => {
            let mut cmd = spec(
                ParamType::String,
                "Command to run on each host (shell text of the action's author); parameters are passed quoted, never spliced.",
            );
            cmd.required = true;
            let mut v = vec![("cmd".to_string(), cmd)];
            v.extend(remote_common());
            v
        }
        "remote-shell-script" => remote_common(),
        "ci-build" => {
            let mut repo = spec(
                ParamType::String,
                "Repository to build: a URL git can fetch, or a path.",
            );
            repo.required = true;
            vec![
                ("repo".into(), repo),
                (
                    "branch".into(),
                    spec(
                        ParamType::String,
                        "Branch to build (refs/heads/ is optional).",
                    ),
                ),
                (
                    "commit".into(),
                    spec(
                        ParamType::String,
                        "Commit to build; default: the branch's head.",
                    ),
                ),
                (
                    "project".into(),
                    spec(
                        ParamType::String,
                        "Project name; default: the repository's name.",
                    ),
                ),
                (
                    "depth".into(),
                    with_default(
                        spec(ParamType::Integer, "History depth to fetch."),
                        json!(1),
                    ),
                ),
                (
                    "env".into(),
                    spec(
                        ParamType::Object,
                        "Environment variables for the build scripts.",
                    ),
                ),
                (
                    "secret_env".into(),
                    secret(spec(
                        ParamType::Object,
                        "Secret environment variables for the build scripts: encrypted at rest, every value masked in the log and result, however short.",
                    )),
                ),
                (
                    "cancel_previous".into(),
                    with_default(
                        spec(
                            ParamType::Boolean,
                            "Cancel older builds of the same repository and branch.",
                        ),
                        json!(true),
                    ),
                ),
                (
                    "timeout".into(),
                    with_default(
                        spec(
                            ParamType::Integer,
                            "Seconds before the whole build is stopped.",
                        ),
                        json!(3600),
                    ),
                ),
            ]
        }
        "deb-build" => {
            let mut v = vec![
                (
                    "path".into(),
                    required(spec(
                        ParamType::String,
                        "The checked-out application repository to package (an absolute path on the server).",
                    )),
                ),
                (
                    "out_dir".into(),
                    required(spec(
                        ParamType::String,
                        "Folder the .deb is written to (an absolute path on the server, created if missing).",
                    )),
                ),
                (
                    "commit".into(),
                    spec(
                        ParamType::String,
                        "Commit the package is built from; its short form ends the iteration.",
                    ),
                ),
            ];
            v.extend(deb_params());
            v.push((
                "timeout".into(),
                with_default(
                    spec(ParamType::Integer, "Seconds before the build is stopped."),
                    json!(600),
                ),
            ));
            v
        }
        "apt-publish" => {
            let mut debs = spec(
                ParamType::Array,
                "Paths of the .deb files to publish (absolute paths on the server).",
            );
            debs.required = true;
            let mut v = vec![("debs".into(), debs)];
            v.extend(publish_params());
            v.push((
                "timeout".into(),
                with_default(
                    spec(
                        ParamType::Integer,
                        "Seconds before the publication is abandoned.",
                    ),
                    json!(600),
                ),
            ));
            v
        }
        "ci-package" => {
            let mut v = checkout_params();
            v.extend(deb_params());
            v.extend(publish_params());
            v.push((
                "publish".into(),
                with_default(
                    spec(
                        ParamType::Boolean,
                        "Publish the package into the server's APT repository (false: build only, the .deb is discarded).",
                    ),
                    json!(true),
                ),
            ));
            v.push((
                "timeout".into(),
                with_default(
                    spec(
                        ParamType::Integer,
                        "Seconds before the whole step is stopped.",
                    ),
                    json!(1800),
                ),
            ));
            v
        }
        "jenkins-build" => {
            vec![
                (
                    "url".into(),
                    required(spec(
                        ParamType::String,
                        "Jenkins' base URL, e.g. https://jenkins.example.com/.",
                    )),
                ),
                (
                    "job".into(),
                    required(spec(
                        ParamType::String,
                        "Job name; a job in folders is `folder/job`.",
                    )),
                ),
                (
                    "parameters".into(),
                    spec(
                        ParamType::Object,
                        "Build parameters (name: value), sent as a form to buildWithParameters.",
                    ),
                ),
                (
                    "username".into(),
                    spec(ParamType::String, "Jenkins user for basic authentication."),
                ),
                (
                    "api_token".into(),
                    secret(spec(ParamType::String, "The user's Jenkins API token.")),
                ),
                (
                    "crumb".into(),
                    with_default(
                        spec(
                            ParamType::Boolean,
                            "Fetch a CSRF crumb from /crumbIssuer/api/json first (skipped when Jenkins has none).",
                        ),
                        json!(true),
                    ),
                ),
                (
                    "wait_for_build".into(),
                    with_default(
                        spec(
                            ParamType::Boolean,
                            "Follow the queue item (Location) until Jenkins has started the build; the result then has its number and URL.",
                        ),
                        json!(false),
                    ),
                ),
                (
                    "verify_ssl_cert".into(),
                    with_default(
                        spec(ParamType::Boolean, "Verify Jenkins' TLS certificate."),
                        json!(true),
                    ),
                ),
                (
                    "timeout".into(),
                    with_default(
                        spec(ParamType::Integer, "Seconds before the action gives up."),
                        json!(120),
                    ),
                ),
            ]
        }
        "http-request" => {
            let mut url = spec(ParamType::String, "URL to request.");
            url.required = true;
            let mut method = with_default(spec(ParamType::String, "HTTP method."), json!("GET"));
            method.enum_values = Some(
                ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
                    .iter()
                    .map(|m| json!(m))
                    .collect(),
            );
            let mut password = spec(ParamType::String, "Password for basic authentication.");
            password.secret = true;
            vec![
                ("url".into(), url),
                ("method".into(), method),
                (
                    "headers".into(),
                    spec(ParamType::Object, "Request headers (name: value)."),
                ),
                ("body".into(), spec(ParamType::String, "Request body.")),
                (
                    "params".into(),
                    spec(ParamType::Object, "Query parameters (name: value)."),
                ),
                (
                    "timeout".into(),
                    with_default(
                        spec(ParamType::Integer, "Seconds before the request times out."),
                        json!(60),
                    ),
                ),
                (
                    "verify_ssl_cert".into(),
                    with_default(
                        spec(ParamType::Boolean, "Verify the server's TLS certificate."),
                        json!(true),
                    ),
                ),
                (
                    "allow_redirects".into(),
                    with_default(spec(ParamType::Boolean, "Follow redirects."), json!(false)),
                ),
                (
                    "username".into(),
                    spec(ParamType::String, "User name for basic authentication."),
                ),
                ("password".into(), password),
            ]
        }
        _ => return None,
    };
    Some(ParamSchema(params))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_known_runner_has_parameters() {
        for r in RUNNER_TYPES {
            assert!(runner_parameters(r).is_some(), "{r}");
        }
        assert!(runner_parameters("python-script").is_none());
    }

    #[test]
    fn remote_runners_check_hosts_and_hide_the_key() {
        for r in ["remote-shell-cmd", "remote-shell-script"] {
            let s = runner_parameters(r).unwrap();
            assert!(s.get("hosts").unwrap().required);
            assert!(s.get("private_key").unwrap().secret);
            assert_eq!(s.get("port").unwrap().default, Some(json!(22)));
        }
        assert!(ENTRY_POINT_REQUIRED.contains(&"remote-shell-script"));
    }

    #[test]
    fn http_password_is_secret() {
        let s = runner_parameters("http-request").unwrap();
        assert!(s.get("password").unwrap().secret);
        assert_eq!(s.get("method").unwrap().default, Some(json!("GET")));
        assert!(s.get("url").unwrap().required);
    }
}
