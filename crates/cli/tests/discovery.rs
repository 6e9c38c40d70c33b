//! Server and token discovery order, with temporary directories standing in
//! for the config and data directories (no process environment involved).

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;

use aviary_cli::{CliError, DiscoveryEnv, TokenSource, discover};

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

struct Dirs {
    _tmp: tempfile::TempDir,
    env: DiscoveryEnv,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let env = DiscoveryEnv {
        home: Some(tmp.path().join("home")),
        platform_data_dir: Some(tmp.path().join("home/.local/share/aviary")),
        ..DiscoveryEnv::default()
    };
    Dirs { _tmp: tmp, env }
}

#[test]
fn defaults_to_local_server_and_admin_token_file() {
    let d = dirs();
    let e = discover(&d.env).unwrap();
    assert_eq!(e.url, "http://127.0.0.1:9700");
    assert_eq!(e.token, None);
    assert_eq!(e.token_source, TokenSource::None);

    let token_file = d.env.platform_data_dir.clone().unwrap().join("admin.token");
    write(&token_file, "admin-secret\n");
    let e = discover(&d.env).unwrap();
    assert_eq!(e.token.as_deref(), Some("admin-secret"));
    assert_eq!(e.token_source, TokenSource::AdminTokenFile(token_file));
}

#[test]
fn aviary_data_dir_overrides_the_platform_data_dir() {
    let mut d = dirs();
    let custom = d._tmp.path().join("data");
    write(&custom.join("admin.token"), "custom");
    write(
        &d.env.platform_data_dir.clone().unwrap().join("admin.token"),
        "platform",
    );
    d.env.aviary_data_dir = Some(custom);
    assert_eq!(discover(&d.env).unwrap().token.as_deref(), Some("custom"));
}

#[test]
fn config_file_beats_defaults_and_xdg_beats_home() {
    let mut d = dirs();
    write(
        &d.env.platform_data_dir.clone().unwrap().join("admin.token"),
        "admin",
    );
    let home_cfg = d.env.home.clone().unwrap().join(".config/aviary/cli.json");
    write(
        &home_cfg,
        r#"{"url": "http://aviary.internal:9700/", "token": "from-home"}"#,
    );
    let e = discover(&d.env).unwrap();
    assert_eq!(e.url, "http://aviary.internal:9700");
    assert_eq!(e.token.as_deref(), Some("from-home"));
    assert_eq!(e.token_source, TokenSource::ConfigFile(home_cfg));

    let xdg = d._tmp.path().join("xdg");
    write(&xdg.join("aviary/cli.json"), r#"{"token": "from-xdg"}"#);
    d.env.xdg_config_home = Some(xdg);
    let e = discover(&d.env).unwrap();
    assert_eq!(e.url, "http://127.0.0.1:9700");
    assert_eq!(e.token.as_deref(), Some("from-xdg"));
}

#[test]
fn flags_and_environment_beat_the_config_file() {
    let mut d = dirs();
    write(
        &d.env.home.clone().unwrap().join(".config/aviary/cli.json"),
        r#"{"url": "http://cfg:1", "token": "cfg"}"#,
    );
    d.env.url = Some("http://flag:2".into());
    d.env.token = Some("flag".into());
    let e = discover(&d.env).unwrap();
    assert_eq!(e.url, "http://flag:2");
    assert_eq!(e.token.as_deref(), Some("flag"));
    assert_eq!(e.token_source, TokenSource::FlagOrEnv);

    // A URL flag alone still takes the token from the config file.
    d.env.token = None;
    assert_eq!(discover(&d.env).unwrap().token.as_deref(), Some("cfg"));
}

#[test]
fn the_local_admin_token_is_never_sent_to_a_remote_server() {
    let mut d = dirs();
    write(
        &d.env.platform_data_dir.clone().unwrap().join("admin.token"),
        "admin",
    );
    d.env.url = Some("https://aviary.example.com".into());
    assert_eq!(discover(&d.env).unwrap().token, None);
    d.env.url = Some("http://localhost:9700".into());
    assert_eq!(discover(&d.env).unwrap().token.as_deref(), Some("admin"));
    d.env.url = Some("http://[::1]:9700".into());
    assert_eq!(discover(&d.env).unwrap().token.as_deref(), Some("admin"));
}

#[test]
fn a_broken_config_file_is_reported_with_its_path() {
    let d = dirs();
    let cfg = d.env.home.clone().unwrap().join(".config/aviary/cli.json");
    write(&cfg, "{not json");
    let err = discover(&d.env).unwrap_err();
    assert!(matches!(err, CliError::Config { .. }));
    let msg = err.to_string();
    assert!(msg.contains(&cfg.display().to_string()), "{msg}");
    assert!(msg.contains("fix it or remove it"), "{msg}");
    assert_eq!(err.exit_code(), 2);
}
