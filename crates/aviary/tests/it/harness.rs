//! Test harness: starts the real `aviary` binary on a free port with its own
//! data directory (and, for PostgreSQL, its own schema), and talks to it
//! over HTTP and through the CLI.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The PostgreSQL the tests use (CI has one on 127.0.0.1:5432, database `test`).
pub fn postgres_url() -> String {
    std::env::var("AVIARY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Which storage backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite in the data dir.
    Sqlite,
    /// PostgreSQL, in a schema of its own.
    Postgres,
}

/// A running server.
pub struct Server {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub token: String,
    pub database: String,
    pub packs: Vec<PathBuf>,
    pub extra_args: Vec<String>,
    /// The address the server binds (127.0.0.1, or 0.0.0.0 for test hosts).
    pub listen_ip: String,
    schema: Option<String>,
    stderr_path: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_aviary")
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A port `p` with `p + 1` free too, below the kernel's ephemeral range
/// (32768-60999), so no outgoing connection takes either meanwhile.
pub fn free_port_pair() -> u16 {
    use std::net::TcpListener;
    let start = 20_000 + (std::process::id() % 5_000) as u16 * 2;
    (0..6_000u16)
        .map(|i| 20_000 + (start - 20_000 + i * 2) % 12_000)
        .find(|p| {
            TcpListener::bind(("127.0.0.1", *p)).is_ok()
                && TcpListener::bind(("127.0.0.1", *p + 1)).is_ok()
        })
        .expect("a free pair of ports below 32000")
}

impl Server {
    pub fn start(backend: Backend, packs: &[&Path]) -> Server {
        Self::start_with(backend, packs, &[])
    }

    pub fn start_with(backend: Backend, packs: &[&Path], extra: &[&str]) -> Server {
        Self::start_on(backend, packs, extra, "127.0.0.1")
    }

    /// Like [`Server::start_with`], bound on `ip` (`0.0.0.0` to be reachable
    /// from test hosts through their bridge).
    pub fn start_on(backend: Backend, packs: &[&Path], extra: &[&str], ip: &str) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let (database, schema) = match backend {
            Backend::Sqlite => (
                format!("sqlite:{}", dir.path().join("aviary.db").display()),
                None,
            ),
            Backend::Postgres => {
                let schema = format!("aviary_it_{}", uuid_like());
                let url = postgres_url();
                let sep = if url.contains('?') { '&' } else { '?' };
                (format!("{url}{sep}schema={schema}"), Some(schema))
            }
        };
        let mut s = Server {
            child: None,
            port: free_port(),
            token: String::new(),
            database,
            packs: packs.iter().map(|p| p.to_path_buf()).collect(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            listen_ip: ip.to_string(),
            schema,
            stderr_path: dir.path().join("server.log"),
            dir,
        };
        s.spawn();
        s.token = std::fs::read_to_string(s.dir.path().join("data/admin.token"))
            .expect("admin token file")
            .trim()
            .to_string();
        s
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts (or restarts) the process and waits for /healthz.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("log");
        let mut cmd = Command::new(bin());
        cmd.arg("server")
            .arg("--listen")
            .arg(format!("{}:{}", self.listen_ip, self.port))
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--database")
            .arg(&self.database)
            .env("AVIARY_LOG", "info")
            .env_remove("AVIARY_URL")
            .env_remove("AVIARY_TOKEN")
            .stdout(Stdio::null())
            .stderr(log);
        for p in &self.packs {
            cmd.arg("--packs").arg(p);
        }
        cmd.args(&self.extra_args);
        self.child = Some(cmd.spawn().expect("spawn aviary server"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("server exited early ({status}):\n{}", self.log());
            }
            if reqwest::blocking::get(self.url("/healthz"))
                .map(|r| r.status().is_success())
                .unwrap_or(false)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL: the hardest crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn http(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client")
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http()
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http()
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .expect("POST");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("AVIARY_URL", self.url(""))
            .env("AVIARY_TOKEN", &self.token)
            .env("AVIARY_DATA_DIR", self.data_dir())
            .stdin(Stdio::null())
            .output()
            .expect("run cli")
    }

    /// Waits until an execution is terminal; returns it.
    pub fn wait_execution(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, exec) = self.get(&format!("/api/v1/executions/{id}"));
            assert_eq!(status, 200, "{exec}");
            if matches!(
                exec["status"].as_str(),
                Some("succeeded" | "failed" | "timeout" | "canceled" | "abandoned")
            ) {
                return exec;
            }
            assert!(
                Instant::now() < deadline,
                "execution {id} did not finish: {exec}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `f` returns Some.
    pub fn wait_for<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn executions(&self, query: &str) -> Vec<Value> {
        let (s, v) = self.get(&format!("/api/v1/executions?limit=1000&{query}"));
        assert_eq!(s, 200, "{v}");
        v.as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        if let Some(schema) = &self.schema {
            // Best effort: drop the test schema with psql if available.
            let _ = Command::new("psql")
                .arg(postgres_url())
                .arg("-qc")
                .arg(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

pub fn uuid_like() -> String {
    let mut buf = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// GitHub's signature header value.
pub fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("hmac");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A GitHub push payload of the real shape.
pub fn push_payload(repo: &str, git_ref: &str, after: &str) -> Value {
    json!({
        "ref": git_ref,
        "before": "0000000000000000000000000000000000000000",
        "after": after,
        "created": false, "deleted": false, "forced": false,
        "compare": format!("https://github.com/acme/{repo}/compare/abc...def"),
        "repository": {"name": repo, "full_name": format!("acme/{repo}"), "clone_url": format!("https://github.com/acme/{repo}.git")},
        "pusher": {"name": "octocat", "email": "octocat@example.com"},
        "head_commit": {"id": after, "message": "Fix things", "author": {"name": "Octo Cat"}},
        "commits": [{"id": after, "message": "Fix things", "modified": ["README.md"]}],
    })
}

/// Writes a file, creating parents.
pub fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

/// Makes a file executable.
pub fn chmod_x(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Runs git in `dir` with a fixed identity; panics with its stderr on failure.
/// Returns stdout then stderr (hooks print to stderr).
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Tester")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "Tester")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
