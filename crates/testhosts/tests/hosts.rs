//! The test-host harness against the real kernel: addresses and reachability,
//! filesystem and dpkg isolation, cleanup on drop and on panic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use aviary_testhosts::{TestNet, wait_for_tcp};

/// The tests of this file run one at a time: a net's bridge and namespace
/// names (`avtbN`, `avtbNhM`) are reused as soon as they are free, so the
/// cleanup test could otherwise see another test's new bridge under the name
/// its own just gave up.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serves one-line HTTP answers `body` on `listener` until the process ends.
fn serve_http(listener: TcpListener, body: &'static str) {
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

#[test]
fn hosts_have_their_own_address_and_reach_each_other_and_the_gateway() {
    let _serial = one_at_a_time();
    let Some(net) = TestNet::for_test("reachability") else {
        return;
    };
    let h1 = net.host("h1").expect("host h1");
    let h2 = net.host("h2").expect("host h2");
    assert_ne!(h1.ip(), h2.ip());

    // Each host has its own hostname and address.
    let name = h1.run(&mut h1.command("hostname")).expect("hostname");
    assert_eq!(name.trim(), "h1");
    let addrs = h2
        .run(
            h2.command("ip")
                .args(["-4", "-o", "addr", "show", "dev", "eth0"]),
        )
        .expect("ip addr");
    assert!(addrs.contains(&format!("{}/24", h2.ip())), "{addrs}");

    // A server bound on the gateway address in the test process.
    let listener = TcpListener::bind((net.gateway(), 0)).expect("bind on the bridge");
    let port = listener.local_addr().expect("addr").port();
    serve_http(listener, "gateway");
    let url = format!("http://{}:{port}/", net.gateway());
    let got = h1
        .run(h1.command("curl").args(["-sS", "--max-time", "5", &url]))
        .expect("curl from h1 to the gateway");
    assert_eq!(got, "gateway");

    // A daemon in h2, reached from h1 by h2's address.
    let _server = h2
        .spawn(
            h2.command("socat")
                .args(["TCP-LISTEN:8080,reuseaddr,fork", "EXEC:hostname"]),
        )
        .expect("socat in h2");
    wait_for_tcp(SocketAddr::from((h2.ip(), 8080)), Duration::from_secs(5)).expect("h2 listens");
    let target = format!("TCP:{}:8080", h2.ip());
    let got = h1
        .run(h1.command("socat").args(["-u", &target, "STDOUT"]))
        .expect("h1 -> h2");
    assert_eq!(got.trim(), "h2");

    // h2's loopback is its own: h1's 127.0.0.1:8080 has no listener.
    let refused = h1
        .command("socat")
        .args(["-u", "TCP:127.0.0.1:8080,connect-timeout=2", "STDOUT"])
        .output()
        .expect("run socat");
    assert!(
        !refused.status.success(),
        "h1's loopback must not reach h2's daemon"
    );
}

fn build_probe_deb(dir: &Path, package: &str) -> std::path::PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("DEBIAN")).expect("mkdir");
    std::fs::create_dir_all(tree.join(format!("usr/share/{package}"))).expect("mkdir");
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: {package}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: Aviary <aviary@example.invalid>\nDescription: test-host isolation probe\n"
        ),
    )
    .expect("control");
    std::fs::write(tree.join(format!("usr/share/{package}/hello")), "hello\n").expect("file");
    let deb = dir.join(format!("{package}.deb"));
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(&tree)
        .arg(&deb)
        .output()
        .expect("dpkg-deb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    deb
}

#[test]
fn dpkg_install_in_one_host_is_invisible_in_the_other_and_outside() {
    let _serial = one_at_a_time();
    let Some(net) = TestNet::for_test("dpkg isolation") else {
        return;
    };
    let package = format!("aviary-probe-{}", std::process::id());
    let work = tempfile::tempdir().expect("tempdir");
    let deb = build_probe_deb(work.path(), &package);
    let h1 = net.host("pkg1").expect("host");
    let h2 = net.host("pkg2").expect("host");

    // The host's /tmp is its own: copy the package in through its root.
    std::fs::copy(&deb, h1.root().join("tmp/probe.deb")).expect("copy into h1");
    assert!(
        !h2.root().join("tmp/probe.deb").exists(),
        "/tmp is per host"
    );
    h1.run(h1.command("dpkg").args(["-i", "/tmp/probe.deb"]))
        .expect("dpkg -i in h1");

    let status = h1
        .run(
            h1.command("dpkg-query")
                .args(["-W", "-f=${Status} ${Version}", &package]),
        )
        .expect("dpkg-query in h1");
    assert_eq!(status, "install ok installed 1.0-1");
    let file = format!("usr/share/{package}/hello");
    assert!(h1.root().join(&file).exists());

    let in_h2 = h2
        .command("dpkg-query")
        .args(["-W", &package])
        .output()
        .expect("dpkg-query in h2");
    assert!(!in_h2.status.success(), "h2 must not see h1's package");
    assert!(!h2.root().join(&file).exists());

    let outside = Command::new("dpkg-query")
        .args(["-W", &package])
        .output()
        .expect("dpkg-query outside");
    assert!(
        !outside.status.success(),
        "the real machine must not see it"
    );
    assert!(!Path::new("/").join(&file).exists());

    // The change lives in h1's overlay upper directory.
    let upper = h1.upper_dir().expect("upper");
    assert!(upper.join(&file).exists());
    assert!(upper.join("var/lib/dpkg/status").exists());
}

fn netns_exists(name: &str) -> bool {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

fn pid_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; look at its state too.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn everything_is_removed_on_drop_and_on_panic() {
    let _serial = one_at_a_time();
    if TestNet::for_test("cleanup probe").is_none() {
        return;
    }
    let mut seen = Vec::new();
    for panics in [false, true] {
        let (tx, rx) = std::sync::mpsc::channel();
        let result = std::panic::catch_unwind(move || {
            let net = TestNet::new("cleanup").expect("net");
            let host = net.host("gone").expect("host");
            let mut daemon = host
                .spawn(host.command("sleep").arg("1000"))
                .expect("spawn");
            // A second process, not owned by any handle, started inside.
            let orphan = host
                .run(
                    host.command("sh")
                        .args(["-c", "sleep 1000 >/dev/null 2>&1 & echo $!"]),
                )
                .expect("background process");
            let daemon_pid = daemon.child().expect("child").id();
            let upper = host.upper_dir().expect("upper");
            tx.send((
                net.bridge().to_owned(),
                host.netns().to_owned(),
                upper,
                daemon_pid,
                orphan.trim().parse::<u32>().expect("pid"),
            ))
            .expect("send");
            if panics {
                panic!("deliberate panic inside a test with hosts");
            }
        });
        assert_eq!(result.is_err(), panics);
        let (bridge, netns, upper, daemon, orphan) = rx.recv().expect("names");
        assert!(
            !Path::new("/sys/class/net").join(&bridge).exists(),
            "bridge {bridge} left"
        );
        assert!(!netns_exists(&netns), "namespace {netns} left");
        assert!(!upper.exists(), "{} left", upper.display());
        assert!(!pid_alive(daemon), "daemon {daemon} still running");
        assert!(
            !pid_alive(orphan),
            "background process {orphan} still running"
        );
        seen.push(bridge);
    }
    assert_eq!(seen.len(), 2);
}
