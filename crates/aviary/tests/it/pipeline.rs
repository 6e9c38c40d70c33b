//! The seed pipeline end to end, through `aviary demo`: real git (a bare
//! repository with Aviary's post-receive hook), real CI scripts, a real .deb
//! in the signed APT repository, real hosts (network namespace and overlay
//! root each) whose agents install with apt-get, real haproxy in front.
//!
//! One test walks the whole story in order (hosts are expensive to set up):
//! good push -> canary; promote; production refuses other versions; a broken
//! commit stops at CI and is notified; an unhealthy canary blocks promotion
//! and is rolled back; two quick pushes deploy only the newer; a server
//! killed mid-pipeline is restarted and the pipeline finishes, nothing twice.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{bin, free_port_pair, git};

const APP: &str = "hello-aviary";

/// A running demo; torn down (`aviary demo --down`) on drop.
struct Demo {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
    port: u16,
    token: String,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = Command::new(bin())
            .args(["demo", "--down", "--dir"])
            .arg(&self.dir)
            .output();
    }
}

impl Demo {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn front(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port + 1)
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("AVIARY_URL", self.url())
            .env("AVIARY_TOKEN", &self.token)
            .output()
            .expect("run aviary")
    }

    fn http(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    fn get(&self, path: &str) -> Value {
        self.http()
            .get(format!("{}{path}", self.url()))
            .bearer_auth(&self.token)
            .send()
            .and_then(|r| r.json())
            .unwrap_or(Value::Null)
    }

    fn work(&self) -> PathBuf {
        self.dir.join(APP)
    }

    /// Commits the change `f` makes in the work tree and pushes it; returns the commit.
    fn push(&self, msg: &str, f: impl FnOnce(&Path)) -> String {
        let work = self.work();
        f(&work);
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", msg]);
        let commit = git(&work, &["rev-parse", "HEAD"]).trim().to_string();
        git(&work, &["push", "-q", "origin", "HEAD:main"]);
        commit
    }

    fn executions(&self, action: &str) -> Vec<Value> {
        self.get(&format!("/api/v1/executions?action={action}&limit=200"))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn for_commit(&self, action: &str, commit: &str) -> Vec<Value> {
        self.executions(action)
            .into_iter()
            .filter(|e| e["parameters"]["commit"].as_str() == Some(commit))
            .collect()
    }

    /// Waits for an execution matching `pred` to reach a terminal status.
    fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<Value>,
    ) -> Value {
        let t = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                t.elapsed() < timeout,
                "timed out waiting for {what}\nsupervisor log:\n{}\nserver log:\n{}",
                std::fs::read_to_string(self.dir.join("supervisor.log")).unwrap_or_default(),
                tail(
                    &std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default(),
                    40
                ),
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The canary deploy of the version built from `commit`, once finished.
    fn canary_deploy(&self, commit: &str) -> Value {
        let short = &commit[..7];
        self.wait_for(
            &format!("the canary deploy of {short}"),
            Duration::from_secs(180),
            || {
                self.executions("core.deploy_canary").into_iter().find(|e| {
                    e["parameters"]["version"]
                        .as_str()
                        .is_some_and(|v| v.ends_with(short))
                        && terminal(e)
                })
            },
        )
    }

    fn versions(&self) -> Value {
        self.get(&format!("/api/v1/versions/{APP}"))
    }

    /// What the app answers through haproxy (with or without the canary header).
    fn through_haproxy(&self, canary: bool) -> String {
        let mut req = self.http().get(self.front());
        if canary {
            req = req.header("X-Hello-Aviary-Canary", "true");
        }
        req.send().and_then(|r| r.text()).unwrap_or_default()
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn terminal(e: &Value) -> bool {
    matches!(
        e["status"].as_str(),
        Some("succeeded" | "failed" | "timeout" | "canceled" | "abandoned")
    )
}

/// A Slack-compatible incoming-webhook receiver: records every JSON body.
fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).is_ok()
                && let Ok(v) = serde_json::from_slice::<Value>(&body)
                && let Ok(mut g) = sink.lock()
            {
                g.push(v);
            }
            let mut stream = reader.into_inner();
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    (url, got)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[test]
fn the_seed_pipeline_end_to_end() {
    if !is_root() {
        eprintln!("SKIPPED the_seed_pipeline_end_to_end: test hosts need root");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("demo");
    // The demo's haproxy front end binds port + 1.
    let port = free_port_pair();
    let (hook_url, notes) = receiver();

    // 1. `aviary demo`: server, hosts, haproxy, the sample repository, a
    // first push that reaches the canary.
    let started = Instant::now();
    let out = Command::new(bin())
        .args(["demo", "--dir"])
        .arg(&dir)
        .args(["--port", &port.to_string(), "--notify-url", &hook_url])
        .args(["--deploy-timeout", "40", "--health-grace", "5"])
        .output()
        .expect("aviary demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let token = std::fs::read_to_string(dir.join("data/admin.token"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let demo = Demo {
        dir: dir.clone(),
        _tmp: tmp,
        port,
        token,
    };
    assert!(
        out.status.success(),
        "aviary demo failed:\n{stdout}\n{}\nsupervisor:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.join("supervisor.log")).unwrap_or_default()
    );
    assert!(stdout.contains("the canary runs hello-aviary"), "{stdout}");
    eprintln!("demo up and first canary in {:?}", started.elapsed());
    for line in stdout
        .lines()
        .filter(|l| l.contains("time split") || l.contains("canary deploy"))
    {
        eprintln!("first push:{line}");
    }

    // Production gets the first version (it had none).
    let out = demo.cli(&["promote", APP]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v1 = demo.versions()["production_version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!v1.is_empty(), "{}", demo.versions());

    // Test 1: a good commit reaches the canary; production keeps v1; the
    // header sends a request to the canary through haproxy.
    let pushed = Instant::now();
    let c2 = demo.push("second version", |w| {
        std::fs::write(w.join("CHANGES"), "v2\n").expect("write");
    });
    let deploy = demo.canary_deploy(&c2);
    assert_eq!(deploy["status"], "succeeded", "{deploy}");
    eprintln!("test 1: push to canary healthy in {:?}", pushed.elapsed());
    let v2 = deploy["parameters"]["version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let canary_answer = demo.wait_for("the canary behind haproxy", Duration::from_secs(30), || {
        let a = demo.through_haproxy(true);
        a.contains(&v2).then_some(Value::String(a))
    });
    assert!(
        canary_answer
            .as_str()
            .unwrap_or_default()
            .contains("canary1"),
        "{canary_answer}"
    );
    // haproxy marks servers up after two passing checks.
    demo.wait_for("production behind haproxy", Duration::from_secs(30), || {
        let a = demo.through_haproxy(false);
        a.contains(&v1).then_some(Value::String(a))
    });
    for _ in 0..4 {
        let a = demo.through_haproxy(false);
        assert!(
            a.contains(&v1) && !a.contains("canary1"),
            "production must answer {v1}: {a}"
        );
    }

    // Test 2: promote rolls the canary version to every production host;
    // a production version that is not the canary's is refused.
    let out = demo.cli(&["promote", APP]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hosts = demo.get("/api/v1/hosts");
    for h in hosts.as_array().expect("hosts") {
        assert_eq!(
            h["apps"][APP]["installed"].as_str(),
            Some(v2.as_str()),
            "{h}"
        );
    }
    let r = demo
        .http()
        .put(format!("{}/api/v1/versions/{APP}/production", demo.url()))
        .bearer_auth(&demo.token)
        .json(&serde_json::json!({"version": v1}))
        .send()
        .expect("put");
    assert!(
        r.status().is_client_error(),
        "a direct production set must be refused: {}",
        r.status()
    );

    // Test 3: a commit whose cibuild fails: no package, no deploy, a notification.
    let c3 = demo.push("broken", |w| {
        let t = std::fs::read_to_string(w.join("test_app.py")).expect("read");
        std::fs::write(
            w.join("test_app.py"),
            t.replace("assertTrue", "assertFalse"),
        )
        .expect("write");
    });
    let build = demo.wait_for("the broken build", Duration::from_secs(60), || {
        demo.for_commit("core.ci_build", &c3)
            .into_iter()
            .find(terminal)
    });
    assert_eq!(build["status"], "failed", "{build}");
    demo.wait_for(
        "the CI failure notification",
        Duration::from_secs(30),
        || {
            notes
                .lock()
                .ok()?
                .iter()
                .find(|n| n["stage"] == "ci" && n["status"] == "failed")
                .cloned()
        },
    );
    assert!(demo.for_commit("core.ci_package", &c3).is_empty());

    // Test 4: a commit whose app is unhealthy on the canary: promotion is
    // refused; rollback restores production's version on the canary.
    let c4 = demo.push("unhealthy", |w| {
        git(w, &["checkout", "-q", "HEAD~1", "--", "test_app.py"]);
        std::fs::write(w.join("unhealthy"), "yes\n").expect("write");
    });
    let deploy = demo.canary_deploy(&c4);
    assert_eq!(deploy["status"], "failed", "{deploy}");
    let out = demo.cli(&["promote", APP]);
    assert!(
        !out.status.success(),
        "promotion of an unhealthy canary must be refused"
    );
    let why = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(why.contains("canary1"), "the refusal names the host: {why}");
    let out = demo.cli(&["rollback", APP]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let canary = demo.get("/api/v1/hosts/canary1");
    assert_eq!(
        canary["apps"][APP]["installed"].as_str(),
        Some(v2.as_str()),
        "{canary}"
    );

    // Test 6: two pushes in quick succession: the older build is canceled,
    // the newer one deploys.
    let c5 = demo.push("fixed", |w| {
        let _ = std::fs::remove_file(w.join("unhealthy"));
        std::fs::write(w.join("CHANGES"), "v5\n").expect("write");
    });
    let c6 = demo.push("fixed again", |w| {
        std::fs::write(w.join("CHANGES"), "v6\n").expect("write");
    });
    let deploy = demo.canary_deploy(&c6);
    assert_eq!(deploy["status"], "succeeded", "{deploy}");
    let older = demo.wait_for("the older build", Duration::from_secs(60), || {
        demo.for_commit("core.ci_build", &c5)
            .into_iter()
            .find(terminal)
    });
    assert_eq!(older["status"], "canceled", "{older}");
    assert!(demo.for_commit("core.ci_package", &c5).is_empty());

    // Test 5: the server is killed in the middle of a pipeline; the demo's
    // supervisor restarts it; the pipeline finishes and no step ran twice.
    let c7 = demo.push("survives a crash", |w| {
        std::fs::write(w.join("CHANGES"), "v7\n").expect("write");
    });
    demo.wait_for("the CI build to start", Duration::from_secs(60), || {
        demo.for_commit("core.ci_build", &c7).into_iter().next()
    });
    let pid = std::fs::read_to_string(dir.join("server.pid")).unwrap_or_default();
    let killed = Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deploy = demo.canary_deploy(&c7);
    assert_eq!(deploy["status"], "succeeded", "{deploy}");
    let succeeded = |action: &str| {
        demo.for_commit(action, &c7)
            .into_iter()
            .filter(|e| e["status"] == "succeeded")
            .count()
    };
    assert_eq!(succeeded("core.ci_build"), 1);
    assert_eq!(succeeded("core.ci_package"), 1);
    let deploys = demo
        .executions("core.deploy_canary")
        .into_iter()
        .filter(|e| {
            e["status"] == "succeeded"
                && e["parameters"]["version"]
                    .as_str()
                    .is_some_and(|v| v.ends_with(&c7[..7]))
        })
        .count();
    assert_eq!(deploys, 1);
}
