//! A real haproxy in front of small HTTP backends that answer with their
//! name: the canary header and cookie, the canary share, draining, hitless
//! reloads, refused configurations, and templates.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use aviary_traffic::haproxy::{Haproxy, ServerState};
use aviary_traffic::{
    App, Error, RenderOptions, Server, Snapshot, canary_backend, production_backend,
    render_haproxy, template,
};
use axum::Router;
use axum::routing::get;

/// Starts a backend on loopback answering `name` on `/` and 200 on `/healthz`.
async fn backend(name: &'static str) -> u16 {
    let app = Router::new()
        .route("/", get(move || async move { name }))
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn server(name: &str, port: u16) -> Server {
    Server {
        name: name.into(),
        address: "127.0.0.1".into(),
        port,
        weight: 100,
        draining: false,
    }
}

/// Production p1, p2 and canary c1 behind app `shop`.
struct Setup {
    snapshot: Snapshot,
    proxy: Haproxy,
    url: String,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn new(share: u8) -> Setup {
        let (p1, p2, c1) = (
            backend("p1").await,
            backend("p2").await,
            backend("c1").await,
        );
        let bind: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let snapshot = Snapshot {
            apps: vec![App {
                name: "shop".into(),
                bind,
                health_path: "/healthz".into(),
                canary_share: share,
                production: vec![server("p1", p1), server("p2", p2)],
                canary: vec![server("c1", c1)],
            }],
        };
        let dir = tempfile::tempdir().unwrap();
        let text = render_haproxy(&snapshot, &options(dir.path())).unwrap();
        let proxy = Haproxy::start("haproxy", dir.path(), &text).await.unwrap();
        Setup {
            snapshot,
            proxy,
            url: format!("http://{bind}/"),
            _dir: dir,
        }
    }

    fn options(&self) -> RenderOptions {
        options(self._dir.path())
    }

    /// Re-renders the snapshot and applies it (reload).
    async fn apply(&self) -> bool {
        let text = render_haproxy(&self.snapshot, &self.options()).unwrap();
        self.proxy.apply(&text).await.unwrap()
    }
}

fn options(dir: &Path) -> RenderOptions {
    RenderOptions::new(Haproxy::stats_socket_for(dir).display().to_string())
}

/// A client that opens a new connection for every request.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Sends `n` requests (with `header` if given) and counts the answers by name.
async fn tally(url: &str, n: usize, header: Option<(&str, &str)>) -> HashMap<String, usize> {
    let client = client();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let mut req = client.get(url);
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        *counts.entry(resp.text().await.unwrap()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn rendered_configuration() {
    let snapshot = Snapshot {
        apps: vec![App {
            name: "seatshare".into(),
            bind: "127.0.0.1:8080".parse().unwrap(),
            health_path: "/healthz".into(),
            canary_share: 5,
            production: vec![
                server("web1", 9001),
                Server {
                    draining: true,
                    ..server("web2", 9002)
                },
            ],
            canary: vec![Server {
                weight: 50,
                ..server("canary1", 9003)
            }],
        }],
    };
    let text = render_haproxy(&snapshot, &RenderOptions::new("/run/aviary/haproxy.sock")).unwrap();
    insta::assert_snapshot!(text);
}

#[tokio::test(flavor = "multi_thread")]
async fn header_and_cookie_send_every_request_to_the_canary() {
    let s = Setup::new(0).await;
    let forced = tally(&s.url, 100, Some(("X-Shop-Canary", "true"))).await;
    assert_eq!(forced.get("c1"), Some(&100), "{forced:?}");
    let cookie = tally(&s.url, 50, Some(("Cookie", "a=b; shop_canary=true"))).await;
    assert_eq!(cookie.get("c1"), Some(&50), "{cookie:?}");
    let plain = tally(&s.url, 100, None).await;
    assert_eq!(
        plain.get("c1"),
        None,
        "share 0 sends nothing to canary: {plain:?}"
    );
    assert_eq!(
        plain.get("p1").copied().unwrap_or(0) + plain.get("p2").copied().unwrap_or(0),
        100
    );
    let not_true = tally(&s.url, 20, Some(("X-Shop-Canary", "false"))).await;
    assert_eq!(not_true.get("c1"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ten_percent_share_sends_about_ten_percent() {
    let s = Setup::new(10).await;
    let counts = tally(&s.url, 1000, None).await;
    let canary = counts.get("c1").copied().unwrap_or(0);
    println!("canary share 10%: {canary} of 1000 requests went to the canary");
    assert!((70..=130).contains(&canary), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_server_gets_no_new_requests() {
    let mut s = Setup::new(0).await;
    // Runtime API: no reload.
    s.proxy
        .set_state(&production_backend("shop"), "p2", ServerState::Drain)
        .await
        .unwrap();
    let counts = tally(&s.url, 100, None).await;
    assert_eq!(counts.get("p1"), Some(&100), "{counts:?}");
    s.proxy
        .set_state(&production_backend("shop"), "p2", ServerState::Ready)
        .await
        .unwrap();
    let counts = tally(&s.url, 100, None).await;
    assert!(counts.contains_key("p2"), "{counts:?}");

    // From the inventory: draining in the snapshot, applied by a reload.
    s.snapshot.apps[0].production[0].draining = true;
    assert!(s.apply().await);
    let counts = tally(&s.url, 100, None).await;
    assert_eq!(counts.get("p2"), Some(&100), "{counts:?}");

    // Weights through the runtime API.
    s.proxy
        .set_weight(&canary_backend("shop"), "c1", 0)
        .await
        .unwrap();
    let err = s
        .proxy
        .set_weight(&production_backend("shop"), "nosuch", 10)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("No such server"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_during_a_stream_of_requests_drops_none() {
    let mut s = Setup::new(0).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let mut streams = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), s.url.clone());
        streams.push(tokio::spawn(async move {
            let client = client();
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    let before = s.proxy.workers().await.unwrap();
    for share in [10, 30, 0] {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        s.snapshot.apps[0].canary_share = share;
        assert!(s.apply().await, "share {share} changes the configuration");
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in streams {
        t.await.unwrap();
    }
    let after = s.proxy.workers().await.unwrap();
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "workers were replaced"
    );
    let failed = failed.lock().unwrap();
    let ok = ok.load(Ordering::Relaxed);
    println!("3 reloads during {ok} requests: {} failed", failed.len());
    assert!(ok > 100, "the stream ran ({ok} requests)");
    assert!(
        failed.is_empty(),
        "requests failed during reloads: {failed:?}"
    );
}

use std::sync::Mutex;

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_configuration_never_replaces_the_live_one() {
    let s = Setup::new(0).await;
    let live = std::fs::read_to_string(s.proxy.config_path()).unwrap();
    let broken = live.replace("balance roundrobin", "balance nonsense");
    let err = s.proxy.apply(&broken).await.unwrap_err();
    assert!(matches!(err, Error::ConfigRejected { .. }), "{err}");
    assert!(err.to_string().contains("balance only supports"), "{err}");
    assert_eq!(
        std::fs::read_to_string(s.proxy.config_path()).unwrap(),
        live
    );
    let counts = tally(&s.url, 10, None).await;
    assert_eq!(counts.values().sum::<usize>(), 10);
    // Unchanged text is not reloaded.
    assert!(!s.proxy.apply(&live).await.unwrap());
}

#[test]
fn templates_render_from_the_same_snapshot() {
    let snapshot = Snapshot {
        apps: vec![App {
            name: "seatshare".into(),
            bind: "127.0.0.1:8080".parse().unwrap(),
            health_path: "/healthz".into(),
            canary_share: 0,
            production: vec![server("web1", 9001), server("web2", 9002)],
            canary: vec![server("canary1", 9003)],
        }],
    };
    let out = template::render(
        "upstreams.conf",
        "{% for app in apps %}upstream {{ app.name }} {\n{% for s in app.production %}  server {{ s.address }}:{{ s.port }};\n{% endfor %}}\n{% endfor %}",
        &snapshot,
    )
    .unwrap();
    assert_eq!(
        out,
        "upstream seatshare {\n  server 127.0.0.1:9001;\n  server 127.0.0.1:9002;\n}\n"
    );
    let err = template::render("bad.tmpl", "line1\n{{ apps[0].nme }}", &snapshot).unwrap_err();
    assert!(err.to_string().contains("bad.tmpl"), "{err}");
    assert!(err.to_string().contains("line 2"), "{err}");
}
