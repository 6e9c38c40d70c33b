//! The `remote-shell-cmd` and `remote-shell-script` runners against real
//! sshd daemons, each in its own test host (network namespace, overlay root,
//! a `deploy` user with passwordless sudo): parallel hosts, hostile values,
//! sudo, known_hosts refusal, timeout and cancel, scripts.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aviary_core::model::ExecutionStatus;
use aviary_runners::{RunRequest, Stream, run};
use aviary_testhosts::{HostProcess, TestHost, TestNet, wait_for_tcp};
use common::*;
use serde_json::{Value, json};
use tokio::sync::mpsc::unbounded_channel;
use tokio_util::sync::CancellationToken;

const REMOTE_PARAMS: &[&str] = &[
    "cmd",
    "hosts",
    "username",
    "private_key",
    "known_hosts",
    "port",
    "sudo",
    "parallel",
    "concurrency",
    "connect_timeout",
    "env",
    "cwd",
    "timeout",
    "kwarg_op",
];

const SSHD_CONFIG: &str = "Port 22
ListenAddress 0.0.0.0
HostKey /etc/aviary-ssh/host_ed25519
AuthorizedKeysFile /etc/aviary-ssh/authorized_keys/%u
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin no
PidFile /run/sshd.pid
";

/// A net with hosts running sshd, a client key and a known_hosts file.
struct Fleet {
    _sshds: Vec<HostProcess>,
    hosts: Vec<TestHost>,
    dir: tempfile::TempDir,
    _net: TestNet,
}

impl Fleet {
    fn key(&self) -> PathBuf {
        self.dir.path().join("id_ed25519")
    }
    fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }
    fn host_list(&self) -> String {
        self.hosts
            .iter()
            .map(|h| h.ip().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
    /// A remote-shell-cmd request as user deploy with the fleet's key and known_hosts.
    fn request(&self, cmd: &str, extra: Value) -> RunRequest {
        let mut params = json!({
            "cmd": cmd,
            "hosts": self.host_list(),
            "username": "deploy",
            "private_key": self.key().display().to_string(),
            "known_hosts": self.known_hosts().display().to_string(),
        });
        for (k, v) in extra.as_object().unwrap() {
            params[k] = v.clone();
        }
        request("remote-shell-cmd", params, REMOTE_PARAMS, self.dir.path())
    }
}

fn keygen(path: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "aviary-test", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(path.with_extension("pub")).unwrap()
}

fn fleet(label: &str, count: usize) -> Option<Fleet> {
    let net = TestNet::for_test(label)?;
    let dir = tempfile::tempdir().unwrap();
    let client_pub = keygen(&dir.path().join("id_ed25519"));
    let mut known = String::new();
    let mut hosts = Vec::new();
    let mut sshds = Vec::new();
    for i in 0..count {
        let host = net.host(&format!("ssh{i}")).unwrap();
        let host_pub = keygen(&dir.path().join(format!("host{i}")));
        let etc = host.root().join("etc/aviary-ssh");
        std::fs::create_dir_all(etc.join("authorized_keys")).unwrap();
        std::fs::copy(
            dir.path().join(format!("host{i}")),
            etc.join("host_ed25519"),
        )
        .unwrap();
        std::fs::write(etc.join("authorized_keys/deploy"), &client_pub).unwrap();
        std::fs::write(etc.join("sshd_config"), SSHD_CONFIG).unwrap();
        std::fs::write(
            host.root().join("etc/sudoers.d/deploy"),
            "deploy ALL=(ALL) NOPASSWD: ALL\n",
        )
        .unwrap();
        host.run(
            host.command("chmod")
                .args(["0440", "/etc/sudoers.d/deploy"]),
        )
        .unwrap();
        host.run(
            host.command("chmod")
                .args(["0600", "/etc/aviary-ssh/host_ed25519"]),
        )
        .unwrap();
        host.run(
            host.command("useradd")
                .args(["-m", "-p", "*", "-s", "/bin/bash", "deploy"]),
        )
        .unwrap();
        let sshd = host
            .spawn(
                host.command("/usr/sbin/sshd")
                    .args(["-D", "-e", "-f", "/etc/aviary-ssh/sshd_config"])
                    .stderr(std::process::Stdio::null()),
            )
            .unwrap();
        wait_for_tcp(SocketAddr::from((host.ip(), 22)), Duration::from_secs(10)).unwrap();
        let mut fields = host_pub.split_whitespace();
        let (kind, key) = (fields.next().unwrap(), fields.next().unwrap());
        known.push_str(&format!("{} {kind} {key}\n", host.ip()));
        sshds.push(sshd);
        hosts.push(host);
    }
    std::fs::write(dir.path().join("known_hosts"), known).unwrap();
    Some(Fleet {
        _sshds: sshds,
        hosts,
        dir,
        _net: net,
    })
}

fn host_result<'a>(result: &'a Value, host: &TestHost) -> &'a Value {
    result
        .get(host.ip().to_string())
        .unwrap_or_else(|| panic!("no result for {}: {result:#}", host.ip()))
}

const HOSTILE: &str = "$(touch /tmp/pwned1)`touch /tmp/pwned2`; touch /tmp/pwned3 ' \" \\\n'; touch /tmp/pwned4; echo '";

#[tokio::test(flavor = "multi_thread")]
async fn runs_on_parallel_hosts_and_hostile_values_stay_data() {
    let Some(fleet) = fleet("ssh hostile", 2) else {
        return;
    };
    let mut req = fleet.request(
        "hostname;",
        json!({"env": {"HOSTILE": HOSTILE}, "message": HOSTILE, "cwd": "/tmp"}),
    );
    // A positional argument too: it is appended to the command, quoted.
    req.positions = vec![("message".into(), 0)];
    let err = run_collect(req.clone()).await.0;
    assert_eq!(err.status, ExecutionStatus::Failed, "{:#}", err.result);
    assert!(err.result["error"].as_str().unwrap().contains("ends with"));

    req.parameters["cmd"] =
        json!("printf '%s|' \"$ST2_ACTION_MESSAGE\" \"$HOSTILE\"; hostname; pwd; printf '%s|'");
    let (outcome, events) = run_collect(req).await;
    assert_eq!(
        outcome.status,
        ExecutionStatus::Succeeded,
        "{:#}",
        outcome.result
    );
    for (i, host) in fleet.hosts.iter().enumerate() {
        let r = host_result(&outcome.result, host);
        assert_eq!(r["return_code"], 0);
        assert_eq!(r["succeeded"], true);
        assert_eq!(
            r["stdout"].as_str().unwrap(),
            format!("{HOSTILE}|{HOSTILE}|ssh{i}\n/tmp\n{HOSTILE}|")
        );
        for n in 1..=4 {
            assert!(
                !host.root().join(format!("tmp/pwned{n}")).exists(),
                "a value was run as shell text on {}",
                host.name()
            );
        }
    }
    // Output is streamed with the host in front.
    let streamed = joined(&events, Stream::Stdout);
    for host in &fleet.hosts {
        assert!(streamed.contains(&format!("{}: ", host.ip())), "{streamed}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sudo_runs_as_root_and_env_names_are_checked() {
    let Some(fleet) = fleet("ssh sudo", 1) else {
        return;
    };
    let host = &fleet.hosts[0];
    let (plain, _) = run_collect(fleet.request("id -un", json!({}))).await;
    assert_eq!(host_result(&plain.result, host)["stdout"], "deploy");
    let (sudo, _) = run_collect(fleet.request("id -un", json!({"sudo": true}))).await;
    assert_eq!(sudo.status, ExecutionStatus::Succeeded, "{:#}", sudo.result);
    assert_eq!(host_result(&sudo.result, host)["stdout"], "root");
    // Values also survive the second level of quoting under sudo.
    let (sudo_env, _) = run_collect(fleet.request(
        "printf %s \"$HOSTILE\"",
        json!({"sudo": true, "env": {"HOSTILE": HOSTILE}}),
    ))
    .await;
    assert_eq!(host_result(&sudo_env.result, host)["stdout"], HOSTILE);

    let (bad, _) =
        run_collect(fleet.request("true", json!({"env": {"A;touch /tmp/x": "1"}}))).await;
    assert_eq!(bad.status, ExecutionStatus::Failed);
    assert!(
        bad.result["error"]
            .as_str()
            .unwrap()
            .contains("variable name")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_host_key_is_refused_and_never_added() {
    let Some(fleet) = fleet("ssh known_hosts", 2) else {
        return;
    };
    // known_hosts lists only the first host.
    let full = std::fs::read_to_string(fleet.known_hosts()).unwrap();
    let first = full.lines().next().unwrap().to_owned() + "\n";
    std::fs::write(fleet.known_hosts(), &first).unwrap();
    let (outcome, _) = run_collect(fleet.request("echo hi", json!({}))).await;
    assert_eq!(
        outcome.status,
        ExecutionStatus::Failed,
        "{:#}",
        outcome.result
    );
    let ok = host_result(&outcome.result, &fleet.hosts[0]);
    assert_eq!(ok["stdout"], "hi");
    assert_eq!(ok["succeeded"], true);
    let refused = host_result(&outcome.result, &fleet.hosts[1]);
    assert_eq!(refused["return_code"], 255);
    assert_eq!(refused["failed"], true);
    assert!(
        refused["stderr"]
            .as_str()
            .unwrap()
            .contains("Host key verification failed"),
        "{refused:#}"
    );
    assert_eq!(std::fs::read_to_string(fleet.known_hosts()).unwrap(), first);

    // A wrong key for a listed host is refused too.
    let swapped: String = full
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            let (_, kind, key) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
            (kind.to_owned(), key.to_owned())
        })
        .zip(fleet.hosts.iter().rev())
        .map(|((kind, key), h)| format!("{} {kind} {key}\n", h.ip()))
        .collect();
    std::fs::write(fleet.known_hosts(), swapped).unwrap();
    let (outcome, _) = run_collect(fleet.request("echo hi", json!({}))).await;
    for host in &fleet.hosts {
        assert_eq!(host_result(&outcome.result, host)["return_code"], 255);
    }
}

fn ssh_processes_for(ip: &str) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a == "ssh") && args.iter().any(|a| a == ip) {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_and_cancel_kill_ssh() {
    let Some(fleet) = fleet("ssh timeout", 1) else {
        return;
    };
    let host = &fleet.hosts[0];
    let ip = host.ip().to_string();
    let (outcome, _) =
        run_collect(fleet.request("echo started; sleep 60", json!({"timeout": 2}))).await;
    assert_eq!(
        outcome.status,
        ExecutionStatus::Timeout,
        "{:#}",
        outcome.result
    );
    let r = host_result(&outcome.result, host);
    assert!(
        r["error"].as_str().unwrap().contains("did not finish"),
        "{r:#}"
    );
    assert_eq!(r["stdout"], "started");
    assert_eq!(ssh_processes_for(&ip), 0, "ssh still running after timeout");

    let (tx, mut rx) = unbounded_channel();
    let cancel = CancellationToken::new();
    let running = tokio::spawn(run(
        fleet.request("echo started; sleep 60", json!({})),
        tx,
        cancel.clone(),
    ));
    wait_for_stdout(&mut rx, "started").await;
    assert_eq!(ssh_processes_for(&ip), 1);
    cancel.cancel();
    let outcome = tokio::time::timeout(SAFETY, running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome.status, ExecutionStatus::Canceled);
    assert_eq!(ssh_processes_for(&ip), 0, "ssh still running after cancel");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_script_runs_with_quoted_arguments_and_is_removed() {
    let Some(fleet) = fleet("ssh script", 1) else {
        return;
    };
    let host = &fleet.hosts[0];
    let script = fleet.dir.path().join("deploy.sh");
    std::fs::write(
        &script,
        "#!/bin/bash\nprintf 'arg1=%s\\n' \"$1\"\nprintf 'env=%s\\n' \"$ST2_ACTION_VERSION\"\nid -un\nexit 3\n",
    )
    .unwrap();
    let mut params = json!({
        "hosts": fleet.host_list(),
        "username": "deploy",
        "private_key": std::fs::read_to_string(fleet.key()).unwrap(),
        "known_hosts": fleet.known_hosts().display().to_string(),
        "version": "1.2.3'; touch /tmp/pwned; '",
        "sudo": true,
    });
    params.as_object_mut().unwrap().remove("cmd");
    let mut req = request(
        "remote-shell-script",
        params,
        REMOTE_PARAMS,
        fleet.dir.path(),
    );
    req.entry_point = Some(script);
    req.positions = vec![("version".into(), 0)];
    let (outcome, _) = run_collect(req).await;
    assert_eq!(
        outcome.status,
        ExecutionStatus::Failed,
        "{:#}",
        outcome.result
    );
    let r = host_result(&outcome.result, host);
    assert_eq!(r["return_code"], 3);
    assert_eq!(
        r["stdout"],
        "arg1=1.2.3'; touch /tmp/pwned; '\nenv=1.2.3'; touch /tmp/pwned; '\nroot"
    );
    let leftovers: Vec<_> = std::fs::read_dir(host.root().join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        leftovers.is_empty(),
        "left in the host's /tmp: {leftovers:?}"
    );
}
