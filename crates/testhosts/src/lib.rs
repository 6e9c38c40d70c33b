//! Test hosts: several "machines" on one real machine, for tests that need
//! real networking, a real package manager and real daemons per host.
//!
//! A [`TestNet`] is a Linux bridge with its own `/24` (`10.77.N.0/24`, `N`
//! allocated atomically across processes by creating the bridge `avtbN`); the
//! bridge holds `10.77.N.1`, so a server in the test process bound on
//! [`TestNet::gateway`] (or `0.0.0.0`) is reachable from every host.
//!
//! A [`TestHost`] has:
//! - its own network namespace (`ip netns`), joined to the bridge by a veth
//!   pair, with address `10.77.N.M/24` on `eth0`, `lo` up and a default route
//!   via the bridge;
//! - its own filesystem: a private mount namespace with an overlayfs whose
//!   lower layer is the real `/` and whose upper layer is a temporary
//!   directory, with `/proc`, `/sys`, `/dev` (bind), and fresh tmpfs on
//!   `/tmp` and `/run`, and everything running `chroot`ed into it. `dpkg -i`
//!   or `apt-get install` inside a host change that host only. The real `/`
//!   is visible read-through (so binaries under the cargo target directory
//!   run inside), except `/tmp` and `/run`, which are the host's own;
//! - its own hostname (UTS namespace).
//!
//! A small holder process (`sleep infinity` inside the chroot) keeps the
//! namespaces alive; [`TestHost::command`] builds a [`Command`] that enters
//! them with `nsenter` (argv only, no shell text from callers), and
//! [`TestHost::root`] is the host's root as seen from outside
//! (`/proc/<holder>/root`), for copying files in and reading them out.
//!
//! Everything is removed on drop, also when a test panics: processes in the
//! host are killed, the namespace, veth and bridge deleted, the overlay
//! unmounted (with its mount namespace) and the directories removed. A bridge
//! left behind by a killed test process (its owner pid is in the bridge's
//! alias) is reclaimed by the next [`TestNet::new`]. Creating hosts needs
//! root: [`TestNet::for_test`] prints a clear `SKIPPED` line and returns
//! `None` when not root.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Prefix of bridge names (`avtb<N>`); `N` is the third octet of the subnet.
const BRIDGE_PREFIX: &str = "avtb";
/// First two octets of every test subnet.
const SUBNET_PREFIX: [u8; 2] = [10, 77];
/// Marker in a bridge's alias, followed by the owner's pid.
const ALIAS_MARK: &str = "aviary-testhosts pid=";

/// The shell program run by the holder process (`$1` merged dir, `$2` upper,
/// `$3` work dir, `$4` hostname, `$5` address). Values arrive as positional
/// parameters, never spliced into the text.
const HOLDER_SCRIPT: &str = r#"set -e
m="$1"
mount -t overlay overlay -o "lowerdir=/,upperdir=$2,workdir=$3" "$m"
mount -t proc proc "$m/proc"
mount --rbind /dev "$m/dev"
mount -t sysfs sysfs "$m/sys"
mount -t tmpfs -o mode=1777 tmpfs "$m/tmp"
mount -t tmpfs -o mode=0755 tmpfs "$m/run"
mkdir -p "$m/run/lock" "$m/run/sshd"
hostname "$4"
printf '%s %s\n' "$5" "$4" >> "$m/etc/hosts"
echo ready
exec chroot "$m" sleep infinity
"#;

/// Errors setting up test hosts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Namespaces, bridges and mounts need root.
    #[error(
        "test hosts need root (uid 0) for network namespaces, bridges and mounts; run the tests as root"
    )]
    NotRoot,
    /// A setup command failed.
    #[error("test hosts: {what}: `{command}` failed ({status}): {stderr}")]
    Command {
        /// What was being done.
        what: String,
        /// The command line (for the message only).
        command: String,
        /// Exit status.
        status: String,
        /// Its standard error.
        stderr: String,
    },
    /// An I/O error.
    #[error("test hosts: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// All 250 subnets are taken.
    #[error("test hosts: no free subnet 10.77.1-250.0/24 (bridges avtb1..avtb250 all in use)")]
    NoFreeSubnet,
    /// A net has at most 250 hosts.
    #[error("test hosts: net {0} already has 250 hosts")]
    TooManyHosts(String),
    /// A host name must be short and plain.
    #[error("test hosts: host name {0:?} must be 1-32 characters of [a-z0-9-]")]
    BadName(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Runs a setup command to completion; an error carries its stderr.
fn run(what: &str, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("{what}: start {program}")))?;
    check(what, program, args, out)
}

fn check(what: &str, program: &str, args: &[&str], out: Output) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            what: what.to_owned(),
            command: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// True if this process runs as root (`/proc/self` belongs to the effective uid).
fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        })
        .unwrap_or(false)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A bridge with its own subnet, to which [`TestHost`]s are attached.
#[derive(Debug)]
pub struct TestNet {
    label: String,
    index: u8,
    bridge: String,
    next_host: AtomicU8,
}

impl TestNet {
    /// Creates a net (a bridge with a free `10.77.N.0/24`). `label` is for
    /// messages only.
    pub fn new(label: &str) -> Result<Self> {
        if !is_root() {
            return Err(Error::NotRoot);
        }
        for index in 1..=250u8 {
            let bridge = format!("{BRIDGE_PREFIX}{index}");
            if !try_add_bridge(&bridge)? {
                // Taken: by a live test, or left behind by a killed one (reclaim
                // it and take it).
                if !(reclaim_if_stale(index) && try_add_bridge(&bridge)?) {
                    continue;
                }
            }
            let net = TestNet {
                label: label.to_owned(),
                index,
                bridge: bridge.clone(),
                next_host: AtomicU8::new(2),
            };
            // From here on, Drop deletes the bridge if setup fails.
            let alias = format!("{ALIAS_MARK}{}", std::process::id());
            run(
                "label the bridge",
                "ip",
                &["link", "set", "dev", &bridge, "alias", &alias],
            )?;
            let cidr = format!("{}/24", net.gateway());
            run(
                "address the bridge",
                "ip",
                &["addr", "add", &cidr, "dev", &bridge],
            )?;
            run(
                "bring the bridge up",
                "ip",
                &["link", "set", "dev", &bridge, "up"],
            )?;
            return Ok(net);
        }
        Err(Error::NoFreeSubnet)
    }

    /// Like [`TestNet::new`], for tests: returns `None` after printing a
    /// `SKIPPED` line when not root, and panics on any other setup error.
    pub fn for_test(label: &str) -> Option<Self> {
        match Self::new(label) {
            Ok(net) => Some(net),
            Err(Error::NotRoot) => {
                eprintln!(
                    "SKIPPED {label}: test hosts need root (network namespaces, bridges, mounts)"
                );
                None
            }
            Err(e) => panic!("{label}: {e}"),
        }
    }

    /// The label given to [`TestNet::new`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The bridge's address (`10.77.N.1`): bind servers here for the hosts.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], self.index, 1)
    }

    /// The subnet, `10.77.N.0/24`.
    pub fn subnet(&self) -> String {
        format!(
            "{}.{}.{}.0/24",
            SUBNET_PREFIX[0], SUBNET_PREFIX[1], self.index
        )
    }

    /// Creates a host named `name` (`[a-z0-9-]`, also its hostname) with the
    /// next free address.
    pub fn host(&self, name: &str) -> Result<TestHost> {
        if name.is_empty()
            || name.len() > 32
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(Error::BadName(name.to_owned()));
        }
        let number = self
            .next_host
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n <= 251).then_some(n + 1)
            })
            .map_err(|_| Error::TooManyHosts(self.label.clone()))?;
        TestHost::create(self, name, number)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = run(
            "delete the bridge",
            "ip",
            &["link", "del", "dev", &self.bridge],
        );
    }
}

/// Creates bridge `name`; false if it exists.
fn try_add_bridge(name: &str) -> Result<bool> {
    let out = Command::new("ip")
        .args(["link", "add", "name", name, "type", "bridge"])
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("create a bridge: start ip"))?;
    Ok(out.status.success())
}

/// If bridge `avtb<index>` belongs to a dead process, removes it and its
/// namespaces. Returns true if it did.
fn reclaim_if_stale(index: u8) -> bool {
    let bridge = format!("{BRIDGE_PREFIX}{index}");
    let Ok(alias) = std::fs::read_to_string(format!("/sys/class/net/{bridge}/ifalias")) else {
        return false;
    };
    let Some(pid) = alias
        .trim()
        .strip_prefix(ALIAS_MARK)
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return false;
    };
    if pid_alive(pid) {
        return false;
    }
    let prefix = format!("{BRIDGE_PREFIX}{index}h");
    if let Ok(list) = run("list namespaces", "ip", &["netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with(&prefix) {
                kill_netns_processes(ns, None);
                let _ = run("delete a stale namespace", "ip", &["netns", "del", ns]);
            }
        }
    }
    run(
        "delete a stale bridge",
        "ip",
        &["link", "del", "dev", &bridge],
    )
    .is_ok()
}

/// Kills (SIGKILL) every process in network namespace `ns`, repeatedly until
/// none is left and every killed process has exited (or 5 s), reaping
/// `holder` if given.
fn kill_netns_processes(ns: &str, mut holder: Option<&mut Child>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut killed: Vec<i32> = Vec::new();
    loop {
        let pids: Vec<i32> = run(
            "list processes in a namespace",
            "ip",
            &["netns", "pids", ns],
        )
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default();
        if let Some(h) = holder.as_deref_mut() {
            let _ = h.kill();
            let _ = h.wait();
        }
        killed.retain(|pid| running(*pid));
        if (pids.is_empty() && killed.is_empty()) || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            if !killed.contains(&pid) {
                killed.push(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True if `pid` exists and is not a zombie (exited, waiting to be reaped).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "pid (comm) S ...": the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// One host: a network namespace, an overlay root and a hostname. See the
/// crate documentation.
#[derive(Debug)]
pub struct TestHost {
    name: String,
    netns: String,
    veth: String,
    ip: Ipv4Addr,
    holder: Option<Child>,
    holder_pid: u32,
    dir: Option<tempfile::TempDir>,
}

impl TestHost {
    fn create(net: &TestNet, name: &str, number: u8) -> Result<Self> {
        let index = net.index;
        let netns = format!("{BRIDGE_PREFIX}{index}h{number}");
        let veth = format!("{BRIDGE_PREFIX}{index}v{number}");
        let peer = format!("{BRIDGE_PREFIX}{index}p{number}");
        let ip = Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], index, number);
        let mut host = TestHost {
            name: name.to_owned(),
            netns: netns.clone(),
            veth: veth.clone(),
            ip,
            holder: None,
            holder_pid: 0,
            dir: None,
        };
        // From here on, Drop undoes whatever was set up.
        run(
            "create the network namespace",
            "ip",
            &["netns", "add", &netns],
        )?;
        run(
            "create the veth pair",
            "ip",
            &[
                "link", "add", "name", &veth, "type", "veth", "peer", "name", &peer,
            ],
        )?;
        run(
            "move the veth into the namespace",
            "ip",
            &["link", "set", "dev", &peer, "netns", &netns],
        )?;
        run(
            "attach the veth to the bridge",
            "ip",
            &["link", "set", "dev", &veth, "master", &net.bridge],
        )?;
        run(
            "bring the veth up",
            "ip",
            &["link", "set", "dev", &veth, "up"],
        )?;
        let ns = |what: &str, args: &[&str]| {
            let mut full = vec!["-n", netns.as_str()];
            full.extend_from_slice(args);
            run(what, "ip", &full)
        };
        ns(
            "rename the host's interface",
            &["link", "set", "dev", &peer, "name", "eth0"],
        )?;
        let cidr = format!("{ip}/24");
        ns("address the host", &["addr", "add", &cidr, "dev", "eth0"])?;
        ns("bring eth0 up", &["link", "set", "dev", "eth0", "up"])?;
        ns("bring lo up", &["link", "set", "dev", "lo", "up"])?;
        let gw = net.gateway().to_string();
        ns(
            "add the default route",
            &["route", "add", "default", "via", &gw],
        )?;

        let dir = tempfile::Builder::new()
            .prefix(&format!("aviary-testhost-{name}-"))
            .tempdir()
            .map_err(io_err("create the host's directory"))?;
        let (merged, upper, work) = (
            dir.path().join("root"),
            dir.path().join("upper"),
            dir.path().join("work"),
        );
        for d in [&merged, &upper, &work] {
            std::fs::create_dir(d).map_err(io_err(format!("create {}", d.display())))?;
        }
        host.dir = Some(dir);
        let ip_text = ip.to_string();
        let mut holder = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--",
            ])
            .args(["sh", "-c", HOLDER_SCRIPT, "aviary-testhost"])
            .arg(&merged)
            .arg(&upper)
            .arg(&work)
            .args([name, &ip_text])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err("start the host's holder process"))?;
        host.holder_pid = holder.id();
        let stdout = holder.stdout.take();
        let mut stderr = holder.stderr.take();
        host.holder = Some(holder);
        let mut line = String::new();
        if let Some(out) = stdout {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        if line.trim() != "ready" {
            let mut err = String::new();
            if let Some(h) = host.holder.as_mut() {
                let _ = h.kill();
                let _ = h.wait();
            }
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            return Err(Error::Command {
                what: format!("set up host {name}'s filesystem"),
                command: "ip netns exec ... unshare ... sh -c <holder script>".into(),
                status: "did not report ready".into(),
                stderr: err.trim().to_owned(),
            });
        }
        // The holder's pid is `ip`'s, which exec'd into unshare, sh, chroot, sleep.
        Ok(host)
    }

    /// The host's name (also its hostname).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on the net.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The network namespace's name (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The host's root filesystem as seen from outside
    /// (`/proc/<holder>/root`): read and write the host's files here,
    /// including its private `/tmp`.
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.holder_pid))
    }

    /// Copies an executable from the real machine into the host (as
    /// `/usr/local/bin/<file name>`) and returns its path inside the host.
    /// Needed for programs under `/tmp` or `/run`, which a host does not
    /// see (they are its own tmpfs), e.g. a binary built in a clone in /tmp.
    pub fn install_program(&self, program: &Path) -> Result<PathBuf> {
        let name = program
            .file_name()
            .ok_or_else(|| Error::BadName(program.display().to_string()))?;
        let inside = Path::new("/usr/local/bin").join(name);
        let outside = self.root().join("usr/local/bin").join(name);
        if let Some(dir) = outside.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        }
        std::fs::copy(program, &outside).map_err(io_err(format!(
            "copy {} into host {}",
            program.display(),
            self.name
        )))?;
        Ok(inside)
    }

    /// The overlay's upper directory: every file the host changed.
    pub fn upper_dir(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path().join("upper"))
    }

    /// A command that runs `program` inside the host (its network, mount and
    /// UTS namespaces, chrooted into its root, working directory `/`). Add
    /// arguments and environment as usual; do not set `current_dir` (it would
    /// apply outside): use [`TestHost::command_in`].
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.command_in("/", program)
    }

    /// Like [`TestHost::command`], with working directory `cwd` (a path inside the host).
    pub fn command_in(&self, cwd: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.holder_pid))
            .args(["--mount", "--uts", "--net", "--root"])
            .arg(format!("--wd={cwd}"))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `cmd` (from [`TestHost::command`]) to completion and returns its
    /// stdout; a non-zero exit is an error carrying stderr.
    pub fn run(&self, cmd: &mut Command) -> Result<String> {
        let what = format!("run a command in host {}", self.name);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(what.clone()))?;
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        check(&what, "nsenter", &args, out)
    }

    /// Starts a long-running process (a daemon: agent, sshd, app) from `cmd`
    /// (built with [`TestHost::command`]). It is killed when the returned
    /// handle is dropped, and in any case when the host is dropped.
    pub fn spawn(&self, cmd: &mut Command) -> Result<HostProcess> {
        let child = cmd
            .spawn()
            .map_err(io_err(format!("start a process in host {}", self.name)))?;
        Ok(HostProcess { child: Some(child) })
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        kill_netns_processes(&self.netns, self.holder.as_mut());
        let _ = run("delete the namespace", "ip", &["netns", "del", &self.netns]);
        let _ = run("delete the veth", "ip", &["link", "del", "dev", &self.veth]);
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_owned();
            // The overlay goes away with its mount namespace, which the
            // kernel may release a moment after the last process is reaped.
            for _ in 0..50 {
                if std::fs::remove_dir_all(&path).is_ok() || !path.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::mem::forget(dir);
        }
    }
}

/// A process started with [`TestHost::spawn`]; killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct HostProcess {
    child: Option<Child>,
}

impl HostProcess {
    /// The process id (of `nsenter`, which execs into the program).
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The underlying child (to take its stdout, wait, or signal it).
    pub fn child(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Kills and reaps the process now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until a TCP connection to `addr` succeeds (a daemon is listening),
/// up to `timeout`. Connect from the test process: the bridge reaches every host.
pub fn wait_for_tcp(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(Error::Io {
                    what: format!("nothing listening on {addr} after {timeout:?}"),
                    source: e,
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(25)),
        }
    }
}
