//! One behavioural suite for the `Store` interface, run against BOTH backends:
//! SQLite (a fresh file in a temp dir) and PostgreSQL (a fresh schema
//! `aviary_test_<random>` in `$AVIARY_TEST_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`, dropped at the end).
//!
//! Run the throughput figures with `cargo test -p aviary-store --test
//! store_suite throughput -- --nocapture`.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use aviary_core::model::{
    ApiToken, AuditRecord, Enforcement, Execution, ExecutionStatus, KeyValue, KvScope,
    TriggerInstance, TriggerInstanceStatus, new_id,
};
use aviary_store::{
    ChildEnd, ExecutionFilter, Ingest, IngestOutcome, NewExecution, OutputChunk, Store, StoreError,
};
use chrono::{DateTime, Duration, Utc};
use serde_json::json;

const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

fn pg_base() -> String {
    std::env::var("AVIARY_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG.to_string())
}

/// A store under test plus what is needed to reopen and clean it up.
struct Harness {
    store: Arc<dyn Store>,
    url: String,
    _dir: Option<tempfile::TempDir>,
    pg_schema: Option<String>,
}

impl Harness {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("aviary.db").display());
        let store = aviary_store::open(&url).await.unwrap();
        assert_eq!(store.backend(), "sqlite");
        Self {
            store,
            url,
            _dir: Some(dir),
            pg_schema: None,
        }
    }

    async fn postgres() -> Self {
        let schema = format!("aviary_test_{}", uuid::Uuid::new_v4().simple());
        let url = format!("{}?schema={schema}", pg_base());
        let store = aviary_store::open(&url).await.unwrap();
        assert_eq!(store.backend(), "postgres");
        Self {
            store,
            url,
            _dir: None,
            pg_schema: Some(schema),
        }
    }

    async fn reopen(&self) -> Arc<dyn Store> {
        aviary_store::open(&self.url).await.unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Drop the PostgreSQL schema even when the test panicked: use a
        // separate thread and runtime (we may be inside the test's runtime).
        if let Some(schema) = self.pg_schema.take() {
            let handle = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    use sqlx::Connection;
                    let mut conn = sqlx::PgConnection::connect(&pg_base()).await.unwrap();
                    sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                        .execute(&mut conn)
                        .await
                        .unwrap();
                });
            });
            let _ = handle.join();
        }
    }
}

/// Generates one test per backend for each listed `async fn name(h: &Harness)`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let h = super::Harness::sqlite().await;
                    super::$name(&h).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let h = super::Harness::postgres().await;
                    super::$name(&h).await;
                }
            )*
        }
    };
}

both_backends!(
    ingest_round_trips_everything,
    dedup_key_twice_is_duplicate_and_writes_nothing,
    concurrent_dedup_stores_exactly_one,
    ingest_is_atomic,
    trigger_instances_list_newest_first_with_filter,
    claim_takes_oldest_requested_with_secrets,
    concurrent_claimers_never_share_an_execution,
    transitions_are_conditional,
    list_executions_filters,
    recover_node_requeues_and_abandons,
    output_appends_and_tails,
    kv_scopes_ttl_prefix_delete_purge,
    tokens_unique_names_and_revocation,
    audit_newest_first,
    rule_overrides_round_trip,
    timers_round_trip,
    migrations_are_idempotent_on_reopen,
    concurrent_opens_migrate_once,
    workflow_state_is_versioned_and_saved_with_children,
    workflow_step_ends_a_child_with_the_state_or_not_at_all,
    running_workflows_survive_recovery,
    future_executions_are_not_claimed_early,
    hosts_round_trip_and_reports,
    versions_change_only_by_policy_with_history,
    concurrent_promotions_apply_once,
    deploy_locks_are_exclusive_and_recovered,
    output_is_deleted_per_execution,
);

// ---------------------------------------------------------------- builders

fn now() -> DateTime<Utc> {
    Utc::now()
}

fn trigger_instance(trigger: &str, dedup_key: Option<&str>) -> TriggerInstance {
    TriggerInstance {
        id: new_id(),
        trigger: trigger.to_string(),
        payload: json!({
            "body": {"ref": "refs/heads/main", "n": 42, "f": 0.1, "big": 18_446_744_073_709_551_615u64,
                     "nested": [1, {"a": null}, "é✓"], "neg": -7},
            "headers": {"X-GitHub-Event": "push"}
        }),
        occurrence_time: now(),
        dedup_key: dedup_key.map(str::to_string),
        status: TriggerInstanceStatus::Processed,
    }
}

fn execution(action: &str, created_at: DateTime<Utc>) -> Execution {
    Execution {
        id: new_id(),
        action: action.to_string(),
        runner: "local-shell-cmd".into(),
        parameters: json!({"cmd": "echo hi", "password": aviary_core::model::MASK}),
        status: ExecutionStatus::Requested,
        result: json!({}),
        trigger_instance_id: None,
        rule: None,
        enforcement_id: None,
        parent_id: None,
        requested_by: "admin".into(),
        created_at,
        started_at: None,
        finished_at: None,
        timeout_secs: 600,
        node: None,
    }
}

fn new_exec(action: &str, created_at: DateTime<Utc>, secrets: Option<&str>) -> NewExecution {
    NewExecution {
        execution: execution(action, created_at),
        secrets: secrets.map(str::to_string),
    }
}

/// An event matched by one rule that requested one execution.
fn event_with_execution(key: Option<&str>) -> Ingest {
    let ti = trigger_instance("core.st2.webhook", key);
    let mut x = new_exec("deploy.canary", now(), Some("ciphertext"));
    let enf = Enforcement {
        id: new_id(),
        trigger_instance_id: ti.id.clone(),
        rule: "deploy.on_push".into(),
        execution_id: Some(x.execution.id.clone()),
        failure_reason: None,
        enforced_at: now(),
    };
    x.execution.trigger_instance_id = Some(ti.id.clone());
    x.execution.rule = Some(enf.rule.clone());
    x.execution.enforcement_id = Some(enf.id.clone());
    Ingest {
        trigger_instance: ti,
        enforcements: vec![enf],
        executions: vec![x],
    }
}

// ---------------------------------------------------------------- tests

async fn ingest_round_trips_everything(h: &Harness) {
    let s = &h.store;
    let mut ing = event_with_execution(Some("github:abc"));
    let failed = Enforcement {
        id: new_id(),
        trigger_instance_id: ing.trigger_instance.id.clone(),
        rule: "deploy.broken".into(),
        execution_id: None,
        failure_reason: Some("parameter `x` is required".into()),
        enforced_at: now(),
    };
    ing.enforcements.push(failed.clone());
    assert_eq!(s.ingest(ing.clone()).await.unwrap(), IngestOutcome::Stored);

    let got = s
        .get_trigger_instance(&ing.trigger_instance.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got, ing.trigger_instance,
        "nanosecond times and JSON round-trip exactly"
    );
    assert!(s.get_trigger_instance("nope").await.unwrap().is_none());

    let enfs = s
        .list_enforcements(Some(&ing.trigger_instance.id), None, 10)
        .await
        .unwrap();
    assert_eq!(
        enfs,
        vec![failed.clone(), ing.enforcements[0].clone()],
        "newest first"
    );
    let by_rule = s
        .list_enforcements(None, Some("deploy.broken"), 10)
        .await
        .unwrap();
    assert_eq!(by_rule, vec![failed]);
    assert_eq!(s.list_enforcements(None, None, 1).await.unwrap().len(), 1);

    let x = &ing.executions[0];
    let got = s.get_execution(&x.execution.id).await.unwrap().unwrap();
    assert_eq!(got, x.execution);
    assert_eq!(s.count_trigger_instances().await.unwrap(), 1);
    assert_eq!(s.count_executions(None).await.unwrap(), 1);

    // A standalone execution with every optional field set round-trips too.
    let mut full = new_exec("core.http", now(), None);
    full.execution.status = ExecutionStatus::Succeeded;
    full.execution.result = json!({"status_code": 200, "body": {"ok": true}});
    full.execution.parent_id = Some(x.execution.id.clone());
    full.execution.started_at = Some(now());
    full.execution.finished_at = Some(now());
    full.execution.node = Some("node-1".into());
    full.execution.timeout_secs = u64::try_from(i64::MAX).unwrap();
    s.create_execution(full.clone()).await.unwrap();
    assert_eq!(
        s.get_execution(&full.execution.id).await.unwrap().unwrap(),
        full.execution
    );
    // Same id again is a conflict.
    let err = s.create_execution(full).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
}

async fn dedup_key_twice_is_duplicate_and_writes_nothing(h: &Harness) {
    let s = &h.store;
    let first = event_with_execution(Some("github:delivery-1"));
    assert_eq!(
        s.ingest(first.clone()).await.unwrap(),
        IngestOutcome::Stored
    );
    let second = event_with_execution(Some("github:delivery-1"));
    assert_eq!(
        s.ingest(second.clone()).await.unwrap(),
        IngestOutcome::Duplicate {
            existing_id: first.trigger_instance.id.clone()
        }
    );
    assert_eq!(s.count_trigger_instances().await.unwrap(), 1);
    assert!(
        s.get_trigger_instance(&second.trigger_instance.id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.list_enforcements(Some(&second.trigger_instance.id), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.get_execution(&second.executions[0].execution.id)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.count_executions(None).await.unwrap(), 1);
    // Events without a key are never duplicates.
    assert_eq!(
        s.ingest(event_with_execution(None)).await.unwrap(),
        IngestOutcome::Stored
    );
    assert_eq!(
        s.ingest(event_with_execution(None)).await.unwrap(),
        IngestOutcome::Stored
    );
    assert_eq!(s.count_trigger_instances().await.unwrap(), 3);
}

async fn concurrent_dedup_stores_exactly_one(h: &Harness) {
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = Arc::clone(&h.store);
        tasks.push(tokio::spawn(async move {
            let ing = event_with_execution(Some("race-key"));
            let id = ing.trigger_instance.id.clone();
            (id, s.ingest(ing).await.unwrap())
        }));
    }
    let mut stored = Vec::new();
    let mut dup_ids = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            (id, IngestOutcome::Stored) => stored.push(id),
            (_, IngestOutcome::Duplicate { existing_id }) => {
                dup_ids.insert(existing_id);
            }
        }
    }
    assert_eq!(stored.len(), 1, "exactly one ingest wins");
    assert_eq!(dup_ids, HashSet::from([stored[0].clone()]));
    assert_eq!(h.store.count_trigger_instances().await.unwrap(), 1);
    assert_eq!(h.store.count_executions(None).await.unwrap(), 1);
}

async fn ingest_is_atomic(h: &Harness) {
    let s = &h.store;
    let existing = new_exec("a.b", now(), None);
    s.create_execution(existing.clone()).await.unwrap();
    // The event's execution reuses an existing id: the whole ingest fails.
    let mut bad = event_with_execution(Some("atomic-key"));
    bad.executions[0].execution.id = existing.execution.id.clone();
    let err = s.ingest(bad.clone()).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert!(
        s.get_trigger_instance(&bad.trigger_instance.id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.list_enforcements(Some(&bad.trigger_instance.id), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.count_trigger_instances().await.unwrap(), 0);
    assert_eq!(s.count_executions(None).await.unwrap(), 1);
    // The dedup key was not consumed by the failed ingest.
    let good = event_with_execution(Some("atomic-key"));
    assert_eq!(s.ingest(good).await.unwrap(), IngestOutcome::Stored);

    // Failing and succeeding writes issued together: only the failing one fails.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = Arc::clone(s);
        let mut ing = event_with_execution(None);
        if i % 4 == 0 {
            ing.executions[0].execution.id = existing.execution.id.clone();
        }
        tasks.push(tokio::spawn(async move { (i, s.ingest(ing).await) }));
    }
    for t in tasks {
        let (i, r) = t.await.unwrap();
        if i % 4 == 0 {
            assert!(matches!(r, Err(StoreError::Conflict { .. })), "{r:?}");
        } else {
            assert_eq!(r.unwrap(), IngestOutcome::Stored);
        }
    }
    assert_eq!(s.count_trigger_instances().await.unwrap(), 1 + 30);
}

async fn trigger_instances_list_newest_first_with_filter(h: &Harness) {
    let s = &h.store;
    let mut ids = Vec::new();
    for i in 0..5 {
        let trigger = if i % 2 == 0 {
            "core.st2.webhook"
        } else {
            "core.st2.CronTimer"
        };
        let ti = trigger_instance(trigger, None);
        ids.push(ti.id.clone());
        let ing = Ingest {
            trigger_instance: ti,
            enforcements: vec![],
            executions: vec![],
        };
        assert_eq!(s.ingest(ing).await.unwrap(), IngestOutcome::Stored);
    }
    let all: Vec<String> = s
        .list_trigger_instances(None, 10, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    let expected: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(all, expected);
    let page: Vec<String> = s
        .list_trigger_instances(None, 2, 1)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(page, expected[1..3].to_vec());
    let hooks: Vec<String> = s
        .list_trigger_instances(Some("core.st2.webhook"), 10, 0)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(hooks, vec![ids[4].clone(), ids[2].clone(), ids[0].clone()]);
    assert!(
        s.list_trigger_instances(Some("nope"), 10, 0)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn claim_takes_oldest_requested_with_secrets(h: &Harness) {
    let s = &h.store;
    // In the past: executions created in the future are not due yet.
    let t0 = now() - Duration::hours(1);
    let mut made = Vec::new();
    // Created out of order on purpose: claim follows created_at, not insertion.
    for i in [3i64, 0, 4, 1, 2] {
        let x = new_exec(
            "a.b",
            t0 + Duration::seconds(i),
            Some(&format!("secret-{i}")),
        );
        s.create_execution(x.clone()).await.unwrap();
        made.push((i, x));
    }
    made.sort_by_key(|(i, _)| *i);
    let mut not_requested = new_exec("a.b", t0 - Duration::seconds(10), None);
    not_requested.execution.status = ExecutionStatus::Running;
    s.create_execution(not_requested).await.unwrap();

    assert!(s.claim_executions("n1", 0).await.unwrap().is_empty());
    let first = s.claim_executions("n1", 2).await.unwrap();
    let first_ids: Vec<&str> = first.iter().map(|x| x.execution.id.as_str()).collect();
    assert_eq!(
        first_ids,
        vec![
            made[0].1.execution.id.as_str(),
            made[1].1.execution.id.as_str()
        ]
    );
    for (x, (i, _)) in first.iter().zip(&made) {
        assert_eq!(x.execution.status, ExecutionStatus::Scheduled);
        assert_eq!(x.execution.node.as_deref(), Some("n1"));
        assert_eq!(x.secrets.as_deref(), Some(format!("secret-{i}").as_str()));
    }
    let stored = s.get_execution(first_ids[0]).await.unwrap().unwrap();
    assert_eq!(stored.status, ExecutionStatus::Scheduled);
    assert_eq!(stored.node.as_deref(), Some("n1"));

    let rest = s.claim_executions("n2", 10).await.unwrap();
    assert_eq!(rest.len(), 3);
    assert!(
        rest.iter()
            .all(|x| x.execution.node.as_deref() == Some("n2"))
    );
    assert!(s.claim_executions("n2", 10).await.unwrap().is_empty());
    assert_eq!(
        s.count_executions(Some(ExecutionStatus::Scheduled))
            .await
            .unwrap(),
        5
    );
    assert_eq!(
        s.count_executions(Some(ExecutionStatus::Requested))
            .await
            .unwrap(),
        0
    );
}

async fn concurrent_claimers_never_share_an_execution(h: &Harness) {
    let s = &h.store;
    let t0 = now() - Duration::hours(1);
    let mut all = HashSet::new();
    for i in 0..200 {
        let x = new_exec("a.b", t0 + Duration::milliseconds(i), None);
        all.insert(x.execution.id.clone());
        s.create_execution(x).await.unwrap();
    }
    let mut tasks = Vec::new();
    for c in 0..8 {
        let s = Arc::clone(s);
        tasks.push(tokio::spawn(async move {
            let node = format!("node-{c}");
            let mut got = Vec::new();
            loop {
                let batch = s.claim_executions(&node, 7).await.unwrap();
                if batch.is_empty() {
                    break;
                }
                got.extend(batch.into_iter().map(|x| x.execution.id));
                tokio::task::yield_now().await;
            }
            (node, got)
        }));
    }
    let mut seen: HashMap<String, String> = HashMap::new();
    for t in tasks {
        let (node, ids) = t.await.unwrap();
        for id in ids {
            if let Some(other) = seen.insert(id.clone(), node.clone()) {
                panic!("execution {id} claimed by both {other} and {node}");
            }
        }
    }
    let claimed: HashSet<String> = seen.keys().cloned().collect();
    assert_eq!(claimed, all, "every execution claimed exactly once");
    for (id, node) in &seen {
        let x = s.get_execution(id).await.unwrap().unwrap();
        assert_eq!(x.status, ExecutionStatus::Scheduled);
        assert_eq!(x.node.as_ref(), Some(node));
    }
}

async fn transitions_are_conditional(h: &Harness) {
    use ExecutionStatus::*;
    let s = &h.store;
    let x = new_exec("a.b", now(), None);
    let id = x.execution.id.clone();
    s.create_execution(x).await.unwrap();
    let t1 = now();
    assert!(
        !s.transition_execution(&id, &[Scheduled], Running, None, t1)
            .await
            .unwrap()
    );
    assert!(
        !s.transition_execution(&id, &[], Running, None, t1)
            .await
            .unwrap()
    );
    assert!(
        !s.transition_execution("missing", &[Requested], Running, None, t1)
            .await
            .unwrap()
    );
    assert!(
        s.transition_execution(&id, &[Requested, Scheduled], Running, None, t1)
            .await
            .unwrap()
    );
    let got = s.get_execution(&id).await.unwrap().unwrap();
    assert_eq!(got.status, Running);
    assert_eq!(got.started_at, Some(t1));
    assert_eq!(got.finished_at, None);
    assert_eq!(got.result, json!({}), "result unchanged when None");

    let t2 = t1 + Duration::nanoseconds(1_234_567_891);
    let result = json!({"stdout": "hi\n", "stderr": "", "return_code": 0});
    assert!(
        s.transition_execution(
            &id,
            &[Running, Canceling],
            Succeeded,
            Some(result.clone()),
            t2
        )
        .await
        .unwrap()
    );
    let got = s.get_execution(&id).await.unwrap().unwrap();
    assert_eq!(got.status, Succeeded);
    assert_eq!(got.started_at, Some(t1), "started_at kept");
    assert_eq!(got.finished_at, Some(t2));
    assert_eq!(got.result, result);

    // Terminal: a second finisher loses.
    assert!(
        !s.transition_execution(&id, &[Running, Canceling], Failed, Some(json!({})), now())
            .await
            .unwrap()
    );
    assert_eq!(s.get_execution(&id).await.unwrap().unwrap().result, result);

    // Non-terminal, non-running transition touches neither time.
    let y = new_exec("a.b", now(), None);
    let yid = y.execution.id.clone();
    s.create_execution(y).await.unwrap();
    assert!(
        s.transition_execution(&yid, &[Requested], Canceling, None, now())
            .await
            .unwrap()
    );
    let got = s.get_execution(&yid).await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.started_at, got.finished_at),
        (Canceling, None, None)
    );
}

async fn list_executions_filters(h: &Harness) {
    let s = &h.store;
    let t0 = now();
    let parent = new_exec("wf.main", t0, None);
    s.create_execution(parent.clone()).await.unwrap();
    let mut ids = vec![parent.execution.id.clone()];
    for i in 1..=6 {
        let mut x = new_exec(
            if i % 2 == 0 { "a.even" } else { "a.odd" },
            t0 + Duration::seconds(i),
            None,
        );
        if i % 3 == 0 {
            x.execution.rule = Some("r.three".into());
            x.execution.trigger_instance_id = Some("ti-3".into());
        }
        if i <= 2 {
            x.execution.parent_id = Some(parent.execution.id.clone());
        }
        if i == 6 {
            x.execution.status = ExecutionStatus::Failed;
        }
        ids.push(x.execution.id.clone());
        s.create_execution(x).await.unwrap();
    }
    let list = |f: ExecutionFilter| {
        let s = Arc::clone(s);
        async move {
            s.list_executions(&f)
                .await
                .unwrap()
                .into_iter()
                .map(|x| x.id)
                .collect::<Vec<_>>()
        }
    };
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(list(ExecutionFilter::default()).await, newest_first);
    assert_eq!(ExecutionFilter::default().limit, 50);
    assert_eq!(
        list(ExecutionFilter {
            limit: 2,
            offset: 1,
            ..Default::default()
        })
        .await,
        newest_first[1..3].to_vec()
    );
    assert_eq!(
        list(ExecutionFilter {
            action: Some("a.even".into()),
            ..Default::default()
        })
        .await,
        vec![ids[6].clone(), ids[4].clone(), ids[2].clone()]
    );
    assert_eq!(
        list(ExecutionFilter {
            status: Some(ExecutionStatus::Failed),
            ..Default::default()
        })
        .await,
        vec![ids[6].clone()]
    );
    assert_eq!(
        list(ExecutionFilter {
            rule: Some("r.three".into()),
            ..Default::default()
        })
        .await,
        vec![ids[6].clone(), ids[3].clone()]
    );
    assert_eq!(
        list(ExecutionFilter {
            trigger_instance_id: Some("ti-3".into()),
            action: Some("a.odd".into()),
            ..Default::default()
        })
        .await,
        vec![ids[3].clone()]
    );
    assert_eq!(
        list(ExecutionFilter {
            parent_id: Some(ids[0].clone()),
            ..Default::default()
        })
        .await,
        vec![ids[2].clone(), ids[1].clone()]
    );
    assert_eq!(s.count_executions(None).await.unwrap(), 7);
    assert_eq!(
        s.count_executions(Some(ExecutionStatus::Failed))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.count_executions(Some(ExecutionStatus::Requested))
            .await
            .unwrap(),
        6
    );
}

async fn recover_node_requeues_and_abandons(h: &Harness) {
    use ExecutionStatus::*;
    let s = &h.store;
    let t0 = now();
    let mk = |status: ExecutionStatus, node: &str, result: serde_json::Value| {
        let mut x = new_exec("a.b", t0, Some("sec"));
        x.execution.status = status;
        x.execution.node = Some(node.to_string());
        x.execution.result = result;
        x
    };
    let scheduled = mk(Scheduled, "A", json!({}));
    let running = mk(Running, "A", json!({"stdout": "partial"}));
    let canceling = mk(Canceling, "A", json!("not an object"));
    let done = mk(Succeeded, "A", json!({"ok": 1}));
    let other = mk(Running, "B", json!({}));
    for x in [&scheduled, &running, &canceling, &done, &other] {
        s.create_execution(x.clone()).await.unwrap();
    }
    let at = now();
    let mut abandoned = s.recover_node("A", at).await.unwrap();
    abandoned.sort();
    let mut expected = vec![running.execution.id.clone(), canceling.execution.id.clone()];
    expected.sort();
    assert_eq!(abandoned, expected);

    let got = s
        .get_execution(&scheduled.execution.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.status, got.node), (Requested, None));
    let got = s
        .get_execution(&running.execution.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.status, Abandoned);
    assert_eq!(got.finished_at, Some(at));
    assert_eq!(got.result["stdout"], "partial", "partial result kept");
    let msg = got.result["error"].as_str().unwrap();
    assert!(msg.contains("stopped while it ran"), "{msg}");
    let got = s
        .get_execution(&canceling.execution.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.status, Abandoned);
    assert!(got.result["error"].is_string());
    assert_eq!(
        s.get_execution(&done.execution.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        Succeeded
    );
    assert_eq!(
        s.get_execution(&other.execution.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        Running
    );

    // The requeued one is claimable again, with its secrets.
    let claimed = s.claim_executions("A", 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].execution.id, scheduled.execution.id);
    assert_eq!(claimed[0].secrets.as_deref(), Some("sec"));
    // Recovering again changes nothing more.
    s.transition_execution(&scheduled.execution.id, &[Scheduled], Running, None, now())
        .await
        .unwrap();
    assert!(s.recover_node("B-unknown", now()).await.unwrap().is_empty());
}

async fn output_appends_and_tails(h: &Harness) {
    let s = &h.store;
    let t = now();
    let chunk = |id: &str, seq: i64, stream: &str, data: &str| OutputChunk {
        execution_id: id.to_string(),
        seq,
        stream: stream.to_string(),
        data: data.to_string(),
        at: t + Duration::nanoseconds(seq),
    };
    s.append_output(vec![
        chunk("x1", 1, "stdout", "hello\n"),
        chunk("x1", 2, "stderr", "warn\n"),
    ])
    .await
    .unwrap();
    s.append_output(vec![]).await.unwrap();
    s.append_output(vec![
        chunk("x1", 3, "stdout", "ünïcødé ✓\n"),
        chunk("x2", 1, "stdout", "other"),
    ])
    .await
    .unwrap();
    // Re-sending a chunk is ignored.
    s.append_output(vec![chunk("x1", 2, "stderr", "DIFFERENT")])
        .await
        .unwrap();
    let all = s.get_output("x1", 0).await.unwrap();
    assert_eq!(
        all,
        vec![
            chunk("x1", 1, "stdout", "hello\n"),
            chunk("x1", 2, "stderr", "warn\n"),
            chunk("x1", 3, "stdout", "ünïcødé ✓\n"),
        ]
    );
    assert_eq!(
        s.get_output("x1", 2).await.unwrap(),
        vec![chunk("x1", 3, "stdout", "ünïcødé ✓\n")]
    );
    assert!(s.get_output("x1", 3).await.unwrap().is_empty());
    assert_eq!(s.get_output("x2", -1).await.unwrap().len(), 1);
    assert!(s.get_output("none", 0).await.unwrap().is_empty());
}

async fn output_is_deleted_per_execution(h: &Harness) {
    let s = &h.store;
    let t = now();
    let chunk = |id: &str, seq: i64| OutputChunk {
        execution_id: id.to_string(),
        seq,
        stream: "stdout".to_string(),
        data: format!("{id} line {seq}\n"),
        at: t,
    };
    s.append_output(vec![
        chunk("d1", 1),
        chunk("d1", 2),
        chunk("d2", 1),
        chunk("d3", 1),
    ])
    .await
    .unwrap();
    assert_eq!(s.delete_output(&[]).await.unwrap(), 0);
    let n = s
        .delete_output(&["d1".to_string(), "d3".to_string(), "missing".to_string()])
        .await
        .unwrap();
    assert_eq!(n, 3);
    assert!(s.get_output("d1", 0).await.unwrap().is_empty());
    assert!(s.get_output("d3", 0).await.unwrap().is_empty());
    assert_eq!(s.get_output("d2", 0).await.unwrap(), vec![chunk("d2", 1)]);
    // Deleting again is a no-op.
    assert_eq!(s.delete_output(&["d1".to_string()]).await.unwrap(), 0);
}

async fn kv_scopes_ttl_prefix_delete_purge(h: &Harness) {
    let s = &h.store;
    let t0 = now();
    let kv = |scope: KvScope, name: &str, value: &str, expire: Option<DateTime<Utc>>| KeyValue {
        scope,
        name: name.to_string(),
        value: value.to_string(),
        secret: false,
        expire_at: expire,
        updated_at: t0,
    };
    s.set_kv(kv(KvScope::System, "deploy.version", "1.2.3", None))
        .await
        .unwrap();
    s.set_kv(kv(
        KvScope::System,
        "deploy.canary_pct",
        "10",
        Some(t0 + Duration::seconds(60)),
    ))
    .await
    .unwrap();
    s.set_kv(kv(KvScope::System, "Deploy.upper", "x", None))
        .await
        .unwrap();
    s.set_kv(kv(KvScope::System, "other", "y", None))
        .await
        .unwrap();
    let mut secret = kv(KvScope::User, "bob:token", "ciphertext", None);
    secret.secret = true;
    s.set_kv(secret.clone()).await.unwrap();
    s.set_kv(kv(KvScope::User, "deploy.version", "user-scoped", None))
        .await
        .unwrap();

    // Scopes are separate namespaces.
    assert_eq!(
        s.get_kv(KvScope::System, "deploy.version", t0)
            .await
            .unwrap()
            .unwrap()
            .value,
        "1.2.3"
    );
    assert_eq!(
        s.get_kv(KvScope::User, "deploy.version", t0)
            .await
            .unwrap()
            .unwrap()
            .value,
        "user-scoped"
    );
    assert_eq!(
        s.get_kv(KvScope::User, "bob:token", t0)
            .await
            .unwrap()
            .unwrap(),
        secret
    );
    assert!(
        s.get_kv(KvScope::System, "bob:token", t0)
            .await
            .unwrap()
            .is_none()
    );

    // TTL: visible before expiry, invisible at and after it.
    let ttl = s
        .get_kv(KvScope::System, "deploy.canary_pct", t0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ttl.expire_at, Some(t0 + Duration::seconds(60)));
    let at_expiry = t0 + Duration::seconds(60);
    assert!(
        s.get_kv(KvScope::System, "deploy.canary_pct", at_expiry)
            .await
            .unwrap()
            .is_none()
    );

    let names = |v: Vec<KeyValue>| v.into_iter().map(|k| (k.scope, k.name)).collect::<Vec<_>>();
    assert_eq!(
        names(
            s.list_kv(Some(KvScope::System), Some("deploy."), t0)
                .await
                .unwrap()
        ),
        vec![
            (KvScope::System, "deploy.canary_pct".to_string()),
            (KvScope::System, "deploy.version".to_string())
        ],
        "prefix is case-sensitive, sorted by name"
    );
    assert_eq!(
        names(
            s.list_kv(Some(KvScope::System), Some("deploy."), at_expiry)
                .await
                .unwrap()
        ),
        vec![(KvScope::System, "deploy.version".to_string())]
    );
    assert_eq!(s.list_kv(None, None, t0).await.unwrap().len(), 6);
    assert_eq!(
        names(s.list_kv(Some(KvScope::User), None, t0).await.unwrap()),
        vec![
            (KvScope::User, "bob:token".to_string()),
            (KvScope::User, "deploy.version".to_string())
        ]
    );
    assert_eq!(
        s.list_kv(None, Some("deploy.version"), t0)
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(
        s.list_kv(None, Some("%"), t0).await.unwrap().is_empty(),
        "no LIKE wildcards"
    );

    // Overwrite replaces value and TTL.
    let mut updated = kv(
        KvScope::System,
        "deploy.version",
        "2.0.0",
        Some(t0 + Duration::hours(1)),
    );
    updated.updated_at = t0 + Duration::seconds(5);
    s.set_kv(updated.clone()).await.unwrap();
    assert_eq!(
        s.get_kv(KvScope::System, "deploy.version", t0)
            .await
            .unwrap()
            .unwrap(),
        updated
    );

    // Purge removes only expired items.
    assert_eq!(s.purge_expired_kv(t0).await.unwrap(), 0);
    assert_eq!(s.purge_expired_kv(at_expiry).await.unwrap(), 1);
    assert_eq!(s.purge_expired_kv(at_expiry).await.unwrap(), 0);

    assert!(s.delete_kv(KvScope::User, "deploy.version").await.unwrap());
    assert!(!s.delete_kv(KvScope::User, "deploy.version").await.unwrap());
    assert_eq!(
        s.get_kv(KvScope::System, "deploy.version", t0)
            .await
            .unwrap()
            .unwrap()
            .value,
        "2.0.0"
    );
}

async fn tokens_unique_names_and_revocation(h: &Harness) {
    let s = &h.store;
    let token = |name: &str, hash: &str| ApiToken {
        id: new_id(),
        name: name.to_string(),
        hash: hash.to_string(),
        role: "admin".into(),
        created_at: now(),
        revoked_at: None,
        last_used_at: None,
    };
    let admin = token("admin", "h-admin");
    s.insert_token(admin.clone()).await.unwrap();
    let ci = token("ci-bot", "h-ci");
    s.insert_token(ci.clone()).await.unwrap();
    assert_eq!(s.count_tokens().await.unwrap(), 2);
    assert_eq!(
        s.find_token_by_hash("h-admin").await.unwrap().unwrap(),
        admin
    );
    assert!(s.find_token_by_hash("h-unknown").await.unwrap().is_none());

    let err = s.insert_token(token("admin", "h-other")).await.unwrap_err();
    match &err {
        StoreError::Conflict { what, .. } => assert!(what.contains("name"), "{err}"),
        other => panic!("expected Conflict, got {other}"),
    }
    let err = s.insert_token(token("third", "h-ci")).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");

    let at = now();
    assert!(s.revoke_token("admin", at).await.unwrap());
    assert!(
        !s.revoke_token("admin", at).await.unwrap(),
        "already revoked"
    );
    assert!(s.find_token_by_hash("h-admin").await.unwrap().is_none());
    assert_eq!(s.count_tokens().await.unwrap(), 1);
    // The name is free again once revoked.
    let admin2 = token("admin", "h-admin-2");
    s.insert_token(admin2.clone()).await.unwrap();
    assert!(s.revoke_token(&ci.id, at).await.unwrap(), "revoke by id");
    assert!(!s.revoke_token("nobody", at).await.unwrap());

    let list = s.list_tokens().await.unwrap();
    assert_eq!(list.len(), 3, "revoked tokens are listed");
    assert_eq!(list[0].id, admin.id);
    assert_eq!(list[0].revoked_at, Some(at));
    assert_eq!(list[1].revoked_at, Some(at));
    assert_eq!(list[2], admin2);
    assert_eq!(s.count_tokens().await.unwrap(), 1);
}

async fn audit_newest_first(h: &Harness) {
    let s = &h.store;
    let mut recs = Vec::new();
    for (i, action) in ["token.create", "rule.disable", "key.set"]
        .iter()
        .enumerate()
    {
        let r = AuditRecord {
            id: new_id(),
            at: now(),
            actor: "admin".into(),
            action: action.to_string(),
            target: format!("t{i}"),
            details: json!({"i": i, "note": "no secrets here"}),
        };
        s.append_audit(r.clone()).await.unwrap();
        recs.push(r);
    }
    let got = s.list_audit(2).await.unwrap();
    assert_eq!(got, vec![recs[2].clone(), recs[1].clone()]);
    assert_eq!(s.list_audit(100).await.unwrap().len(), 3);
}

async fn rule_overrides_round_trip(h: &Harness) {
    let s = &h.store;
    assert!(s.rule_overrides().await.unwrap().is_empty());
    s.set_rule_enabled("deploy.on_push", false).await.unwrap();
    s.set_rule_enabled("deploy.nightly", true).await.unwrap();
    s.set_rule_enabled("deploy.on_push", true).await.unwrap();
    s.set_rule_enabled("deploy.nightly", false).await.unwrap();
    let got = s.rule_overrides().await.unwrap();
    assert_eq!(
        got,
        HashMap::from([
            ("deploy.on_push".to_string(), true),
            ("deploy.nightly".to_string(), false)
        ])
    );
}

async fn timers_round_trip(h: &Harness) {
    let s = &h.store;
    assert!(s.get_timer_fired("pack.t1").await.unwrap().is_none());
    let t1 = now();
    s.set_timer_fired("pack.t1", t1).await.unwrap();
    assert_eq!(s.get_timer_fired("pack.t1").await.unwrap(), Some(t1));
    let t2 = t1 + Duration::minutes(5);
    s.set_timer_fired("pack.t1", t2).await.unwrap();
    assert_eq!(s.get_timer_fired("pack.t1").await.unwrap(), Some(t2));
    assert!(s.get_timer_fired("pack.t2").await.unwrap().is_none());
}

async fn migrations_are_idempotent_on_reopen(h: &Harness) {
    let ing = event_with_execution(Some("persist"));
    h.store.ingest(ing.clone()).await.unwrap();
    for _ in 0..2 {
        let again = h.reopen().await;
        assert_eq!(again.count_trigger_instances().await.unwrap(), 1);
        assert_eq!(
            again
                .get_trigger_instance(&ing.trigger_instance.id)
                .await
                .unwrap()
                .unwrap(),
            ing.trigger_instance
        );
        assert_eq!(
            again.ingest(ing.clone()).await.unwrap(),
            IngestOutcome::Duplicate {
                existing_id: ing.trigger_instance.id.clone()
            }
        );
    }
    assert_eq!(migration_rows(h).await, vec![1, 2, 3]);
}

async fn concurrent_opens_migrate_once(h: &Harness) {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = h.url.clone();
        tasks.push(tokio::spawn(async move { aviary_store::open(&url).await }));
    }
    for t in tasks {
        let s = t.await.unwrap().unwrap();
        assert_eq!(s.count_executions(None).await.unwrap(), 0);
    }
    assert_eq!(migration_rows(h).await, vec![1, 2, 3]);
}

/// The versions recorded in `schema_migrations`, read directly.
async fn migration_rows(h: &Harness) -> Vec<i64> {
    if let Some(schema) = &h.pg_schema {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&pg_base()).await.unwrap();
        sqlx::query_scalar(&format!(
            "SELECT version FROM \"{schema}\".schema_migrations ORDER BY version"
        ))
        .fetch_all(&mut conn)
        .await
        .unwrap()
    } else {
        let path = h.url.trim_start_matches("sqlite:").to_string();
        tokio::task::spawn_blocking(move || {
            let conn = rusqlite::Connection::open(path).unwrap();
            let mut stmt = conn
                .prepare("SELECT version FROM schema_migrations ORDER BY version")
                .unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<Vec<i64>, _>>()
                .unwrap()
        })
        .await
        .unwrap()
    }
}

async fn workflow_state_is_versioned_and_saved_with_children(h: &Harness) {
    let s = &h.store;
    assert_eq!(s.load_workflow("wf1").await.unwrap(), None);
    let child1 = new_exec("core.echo", now(), Some("sec"));
    assert!(
        s.save_workflow("wf1", None, json!({"step": 1}), vec![child1.clone()])
            .await
            .unwrap()
    );
    assert_eq!(
        s.load_workflow("wf1").await.unwrap(),
        Some((1, json!({"step": 1})))
    );
    assert_eq!(
        s.get_execution(&child1.execution.id).await.unwrap(),
        Some(child1.execution.clone())
    );
    // A second first-save loses, and writes nothing.
    let lost = new_exec("core.echo", now(), None);
    assert!(
        !s.save_workflow("wf1", None, json!({"step": 9}), vec![lost.clone()])
            .await
            .unwrap()
    );
    assert_eq!(s.get_execution(&lost.execution.id).await.unwrap(), None);
    // A stale version loses; the right one wins and bumps it.
    assert!(
        !s.save_workflow("wf1", Some(7), json!({"step": 9}), vec![lost.clone()])
            .await
            .unwrap()
    );
    assert_eq!(s.get_execution(&lost.execution.id).await.unwrap(), None);
    let child2 = new_exec("core.local", now(), None);
    let child3 = new_exec("core.local", now(), None);
    assert!(
        s.save_workflow(
            "wf1",
            Some(1),
            json!({"step": 2}),
            vec![child2.clone(), child3.clone()]
        )
        .await
        .unwrap()
    );
    assert_eq!(
        s.load_workflow("wf1").await.unwrap(),
        Some((2, json!({"step": 2})))
    );
    assert!(
        s.get_execution(&child2.execution.id)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        s.get_execution(&child3.execution.id)
            .await
            .unwrap()
            .is_some()
    );
    // Concurrent savers of the same version: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let store = s.clone();
        tasks.push(tokio::spawn(async move {
            store
                .save_workflow("wf1", Some(2), json!({"by": i}), Vec::new())
                .await
                .unwrap()
        }));
    }
    let mut wins = 0;
    for t in tasks {
        if t.await.unwrap() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(s.load_workflow("wf1").await.unwrap().unwrap().0, 3);
}

async fn workflow_step_ends_a_child_with_the_state_or_not_at_all(h: &Harness) {
    use ExecutionStatus::*;
    let s = &h.store;
    let mut wf = new_exec("p.wf", now(), None);
    wf.execution.id = "wf2".into();
    wf.execution.runner = "orquesta".into();
    wf.execution.status = Running;
    s.create_execution(wf).await.unwrap();
    let mut running = new_exec("core.local", now(), None);
    running.execution.status = Running;
    running.execution.started_at = Some(now());
    assert!(
        s.save_workflow("wf2", None, json!({"step": 1}), vec![running.clone()])
            .await
            .unwrap()
    );
    let child = running.execution.id.clone();
    let end = |result: serde_json::Value| ChildEnd {
        id: child.clone(),
        from: vec![Running, Canceling],
        to: Succeeded,
        result,
        at: now(),
    };
    // A stale version: nothing written, the child still runs.
    let next = new_exec("core.local", now(), None);
    assert!(
        !s.save_workflow_step(
            "wf2",
            9,
            json!({"step": 9}).to_string(),
            vec![next.clone()],
            Some(end(json!({"n": 1})))
        )
        .await
        .unwrap()
    );
    assert_eq!(
        s.get_execution(&child).await.unwrap().unwrap().status,
        Running
    );
    assert_eq!(s.get_execution(&next.execution.id).await.unwrap(), None);
    assert_eq!(s.load_workflow("wf2").await.unwrap().unwrap().0, 1);
    // The right version: child ended, state replaced, next child created.
    let mut scheduled = next.clone();
    scheduled.execution.status = Scheduled;
    scheduled.execution.node = Some("n1".into());
    assert!(
        s.save_workflow_step(
            "wf2",
            1,
            json!({"step": 2}).to_string(),
            vec![scheduled.clone()],
            Some(end(json!({"n": 2})))
        )
        .await
        .unwrap()
    );
    let ended = s.get_execution(&child).await.unwrap().unwrap();
    assert_eq!(ended.status, Succeeded);
    assert_eq!(ended.result, json!({"n": 2}));
    assert!(ended.finished_at.is_some());
    assert_eq!(
        s.get_execution(&next.execution.id).await.unwrap(),
        Some(scheduled.execution.clone())
    );
    assert_eq!(
        s.load_workflow("wf2").await.unwrap(),
        Some((2, json!({"step": 2})))
    );
    // The child already ended: nothing written, the version stays.
    assert!(
        !s.save_workflow_step(
            "wf2",
            2,
            json!({"step": 3}).to_string(),
            Vec::new(),
            Some(end(json!({"n": 3})))
        )
        .await
        .unwrap()
    );
    assert_eq!(s.load_workflow("wf2").await.unwrap().unwrap().0, 2);
    assert_eq!(
        s.get_execution(&child).await.unwrap().unwrap().result,
        json!({"n": 2})
    );
    // Only while the workflow runs (not once pausing, canceling...).
    assert!(
        s.transition_execution("wf2", &[Running], Pausing, None, now())
            .await
            .unwrap()
    );
    assert!(
        !s.save_workflow_step("wf2", 2, json!({"step": 3}).to_string(), Vec::new(), None)
            .await
            .unwrap()
    );
    assert_eq!(s.load_workflow("wf2").await.unwrap().unwrap().0, 2);
    assert!(
        s.transition_execution("wf2", &[Pausing], Running, None, now())
            .await
            .unwrap()
    );
    // Without a child end it is a plain versioned save.
    assert!(
        s.save_workflow_step("wf2", 2, json!({"step": 3}).to_string(), Vec::new(), None)
            .await
            .unwrap()
    );
    assert_eq!(s.load_workflow("wf2").await.unwrap().unwrap().0, 3);
}

async fn running_workflows_survive_recovery(h: &Harness) {
    use ExecutionStatus::*;
    let s = &h.store;
    let mk = |status: ExecutionStatus, runner: &str, node: &str| {
        let mut x = new_exec("p.wf", now(), None);
        x.execution.status = status;
        x.execution.runner = runner.to_string();
        x.execution.node = Some(node.to_string());
        x
    };
    let wf_a = mk(Running, "orquesta", "A");
    let wf_b = mk(Running, "orquesta", "B");
    let wf_done = mk(Succeeded, "orquesta", "A");
    let task_a = mk(Running, "local-shell-cmd", "A");
    for x in [&wf_a, &wf_b, &wf_done, &task_a] {
        s.create_execution(x.clone()).await.unwrap();
    }
    assert_eq!(
        s.list_running_workflows(Some("A")).await.unwrap(),
        vec![wf_a.execution.id.clone()]
    );
    assert_eq!(
        s.list_running_workflows(None).await.unwrap(),
        vec![wf_a.execution.id.clone(), wf_b.execution.id.clone()]
    );
    let abandoned = s.recover_node("A", now()).await.unwrap();
    assert_eq!(abandoned, vec![task_a.execution.id.clone()]);
    let wf = s.get_execution(&wf_a.execution.id).await.unwrap().unwrap();
    assert_eq!(wf.status, Running);
    assert_eq!(
        s.list_running_workflows(Some("A")).await.unwrap(),
        vec![wf_a.execution.id.clone()]
    );
    // Paused (and pausing) workflows are resumed too; a pending inquiry is
    // not abandoned by a restart.
    let wf_paused = mk(Paused, "orquesta", "A");
    let wf_pausing = mk(Pausing, "orquesta", "A");
    let inquiry = mk(Pending, "inquirer", "A");
    for x in [&wf_paused, &wf_pausing, &inquiry] {
        s.create_execution(x.clone()).await.unwrap();
    }
    assert_eq!(
        s.list_running_workflows(Some("A")).await.unwrap(),
        vec![
            wf_a.execution.id.clone(),
            wf_paused.execution.id.clone(),
            wf_pausing.execution.id.clone()
        ]
    );
    assert!(s.recover_node("A", now()).await.unwrap().is_empty());
    let q = s
        .get_execution(&inquiry.execution.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(q.status, Pending);
}

async fn future_executions_are_not_claimed_early(h: &Harness) {
    let s = &h.store;
    let later = new_exec("a.b", now() + chrono::Duration::hours(1), None);
    let due = new_exec("a.b", now(), None);
    s.create_execution(later.clone()).await.unwrap();
    s.create_execution(due.clone()).await.unwrap();
    let got = s.claim_executions("A", 10).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].execution.id, due.execution.id);
    assert!(s.claim_executions("A", 10).await.unwrap().is_empty());
}

// ------------------------------------------------------- backend-specific

#[tokio::test]
async fn open_rejects_bad_urls_with_helpful_messages() {
    let err = aviary_store::open("mysql://u:secret@h/db")
        .await
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::InvalidUrl { .. }), "{msg}");
    assert!(!msg.contains("secret"), "password redacted: {msg}");
    assert!(aviary_store::open("").await.is_err());
    assert!(aviary_store::open("sqlite:").await.is_err());
    let err = aviary_store::open("postgres://u:hunter2@127.0.0.1:1/db")
        .await
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::PgConnect { .. }), "{msg}");
    assert!(msg.contains("is it running"), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
    let err = aviary_store::open("postgres://u@h/db?schema=bad-name")
        .await
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err}");
}

#[tokio::test]
async fn sqlite_url_forms_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sub/dir/a.db");
    // sqlite:///abs/path (and the parent directory is created).
    let s = aviary_store::open(&format!("sqlite://{}", p.display()))
        .await
        .unwrap();
    s.set_timer_fired("k", now()).await.unwrap();
    drop(s);
    // bare path to the same file sees the data
    let s = aviary_store::open(&p.display().to_string()).await.unwrap();
    assert!(s.get_timer_fired("k").await.unwrap().is_some());

    let m = aviary_store::open("sqlite::memory:").await.unwrap();
    assert_eq!(m.backend(), "sqlite");
    assert_eq!(
        m.ingest(event_with_execution(Some("k"))).await.unwrap(),
        IngestOutcome::Stored
    );
    assert_eq!(m.count_trigger_instances().await.unwrap(), 1);
    assert_eq!(m.claim_executions("n", 5).await.unwrap().len(), 1);
}

#[tokio::test]
async fn sqlite_is_in_wal_mode_with_full_sync() {
    let h = Harness::sqlite().await;
    h.store.set_timer_fired("x", now()).await.unwrap();
    let path = h.url.trim_start_matches("sqlite:").to_string();
    let mode: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

/// Throughput figures (printed, not asserted): 10,000 ingests from 64
/// concurrent tasks, each event with one enforcement and one execution.
async fn throughput(h: &Harness, events: usize) {
    let tasks = 64;
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let s = Arc::clone(&h.store);
        handles.push(tokio::spawn(async move {
            for i in (t..events).step_by(tasks) {
                let ing = event_with_execution(Some(&format!("bench-{i}")));
                assert_eq!(s.ingest(ing).await.unwrap(), IngestOutcome::Stored);
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(
        h.store.count_trigger_instances().await.unwrap(),
        events as u64
    );
    println!(
        "THROUGHPUT {}: {events} ingests from {tasks} tasks in {secs:.2}s = {:.0} ingests/s",
        h.store.backend(),
        events as f64 / secs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_sqlite() {
    let h = Harness::sqlite().await;
    throughput(&h, 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_postgres() {
    let h = Harness::postgres().await;
    throughput(&h, 2_000).await;
}

// ---------------------------------------------------------------- deploy

fn host(name: &str, tags: &[&str]) -> aviary_deploy::Host {
    aviary_deploy::Host {
        name: name.into(),
        address: format!("10.0.0.{}", name.len()),
        tags: tags.iter().map(|t| (*t).to_string()).collect(),
        apps: Default::default(),
        last_seen: None,
        token_id: None,
        created_at: now(),
    }
}

fn change(
    kind: aviary_deploy::VersionChangeKind,
    exec: &str,
) -> aviary_deploy::VersionChangeRequest {
    aviary_deploy::VersionChangeRequest {
        app: "web".into(),
        role: "app".into(),
        kind,
        actor: "tester".into(),
        execution_id: Some(exec.into()),
        at: now(),
    }
}

async fn hosts_round_trip_and_reports(h: &Harness) {
    use aviary_deploy::{AppStatus, Health};
    let s = &h.store;
    s.upsert_host(host("c1", &["web::app_canary"]))
        .await
        .unwrap();
    s.upsert_host(host("p1", &["web::app"])).await.unwrap();
    let mut apps = std::collections::BTreeMap::new();
    apps.insert(
        "web".to_string(),
        AppStatus {
            installed: Some("1.0".into()),
            target: Some("1.0".into()),
            health: Health::Healthy,
            error: None,
            output: "Setting up web (1.0) ...".into(),
            updated_at: Some(now()),
            timings_ms: Default::default(),
        },
    );
    let at = now();
    assert!(s.record_host_report("c1", apps.clone(), at).await.unwrap());
    assert!(
        !s.record_host_report("nope", apps.clone(), at)
            .await
            .unwrap()
    );
    let c1 = s.get_host("c1").await.unwrap().unwrap();
    assert_eq!(c1.apps, apps);
    assert_eq!(c1.last_seen, Some(at));
    // Re-adding keeps reports, replaces tags and address.
    let mut again = host("c1", &["web::app_canary", "web::app"]);
    again.address = "10.9.9.9".into();
    s.upsert_host(again).await.unwrap();
    let c1 = s.get_host("c1").await.unwrap().unwrap();
    assert_eq!(c1.apps, apps);
    assert_eq!(c1.address, "10.9.9.9");
    assert_eq!(c1.tags.len(), 2);
    let names: Vec<String> = s
        .list_hosts()
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.name)
        .collect();
    assert_eq!(names, vec!["c1", "p1"]);
    assert!(s.delete_host("p1").await.unwrap());
    assert!(!s.delete_host("p1").await.unwrap());
    assert_eq!(s.get_host("p1").await.unwrap(), None);
}

async fn versions_change_only_by_policy_with_history(h: &Harness) {
    use aviary_deploy::{VersionChangeKind as K, VersionOutcome};
    let s = &h.store;
    assert_eq!(s.get_versions("web", "app").await.unwrap(), None);
    // Nothing to promote or roll back yet: refused and audited.
    let r = s
        .change_version(change(
            K::Production {
                version: "1.0".into(),
            },
            "e0",
        ))
        .await
        .unwrap();
    assert!(
        matches!(r, VersionOutcome::Refused { ref reason } if reason.contains("no canary version")),
        "{r:?}"
    );
    let r = s.change_version(change(K::Rollback, "e0")).await.unwrap();
    assert!(matches!(r, VersionOutcome::Refused { .. }));
    // Canary 1.0, promote 1.0.
    let r = s
        .change_version(change(
            K::Canary {
                version: "1.0".into(),
            },
            "e1",
        ))
        .await
        .unwrap();
    assert!(matches!(r, VersionOutcome::Changed { .. }));
    let r = s
        .change_version(change(
            K::Production {
                version: "1.0".into(),
            },
            "e2",
        ))
        .await
        .unwrap();
    let VersionOutcome::Changed {
        versions,
        change: c,
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(versions.production_version.as_deref(), Some("1.0"));
    assert_eq!(
        (c.old_version, c.new_version.as_deref()),
        (None, Some("1.0"))
    );
    // Canary 1.1; a direct production set to anything but 1.1 is refused.
    s.change_version(change(
        K::Canary {
            version: "1.1".into(),
        },
        "e3",
    ))
    .await
    .unwrap();
    let r = s
        .change_version(change(
            K::Production {
                version: "2.0".into(),
            },
            "e4",
        ))
        .await
        .unwrap();
    let VersionOutcome::Refused { reason } = r else {
        panic!("{r:?}")
    };
    assert!(reason.contains("current canary version `1.1`"), "{reason}");
    let v = s.get_versions("web", "app").await.unwrap().unwrap();
    assert_eq!(
        (v.canary_version.as_deref(), v.production_version.as_deref()),
        (Some("1.1"), Some("1.0"))
    );
    // Rollback: canary goes back to production.
    let r = s.change_version(change(K::Rollback, "e5")).await.unwrap();
    let VersionOutcome::Changed { versions, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(versions.canary_version.as_deref(), Some("1.0"));
    let hist = s.version_history("web", "app", 10).await.unwrap();
    type Line = (String, Option<String>, Option<String>, Option<String>);
    let kinds: Vec<Line> = hist
        .iter()
        .map(|c| {
            (
                c.kind.clone(),
                c.old_version.clone(),
                c.new_version.clone(),
                c.execution_id.clone(),
            )
        })
        .collect();
    let o = |x: &str| Some(x.to_string());
    assert_eq!(
        kinds,
        vec![
            ("rollback".into(), o("1.1"), o("1.0"), o("e5")),
            ("canary".into(), o("1.0"), o("1.1"), o("e3")),
            ("production".into(), None, o("1.0"), o("e2")),
            ("canary".into(), None, o("1.0"), o("e1")),
        ]
    );
    let refused: Vec<_> = s
        .list_audit(50)
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.action == "version.refused")
        .collect();
    assert_eq!(refused.len(), 3);
    assert_eq!(refused[0].target, "web::app");
    assert_eq!(refused[0].details["execution_id"], json!("e4"));
    assert_eq!(s.list_versions().await.unwrap().len(), 1);
    assert_eq!(s.version_history("web", "db", 10).await.unwrap(), vec![]);
}

async fn concurrent_promotions_apply_once(h: &Harness) {
    use aviary_deploy::{VersionChangeKind as K, VersionOutcome};
    let s = &h.store;
    s.change_version(change(
        K::Canary {
            version: "1.0".into(),
        },
        "e1",
    ))
    .await
    .unwrap();
    // Ten racing requests: promote 1.0 and move the canary to 2.0. Whatever
    // the order, production only ever becomes a version that was the canary
    // at that moment, and each change is recorded exactly once.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let kind = if i % 2 == 0 {
                K::Production {
                    version: "1.0".into(),
                }
            } else {
                K::Canary {
                    version: "2.0".into(),
                }
            };
            s.change_version(change(kind, &format!("r{i}")))
                .await
                .unwrap()
        }));
    }
    let mut changed = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), VersionOutcome::Changed { .. }) {
            changed += 1;
        }
    }
    let hist = s.version_history("web", "app", 100).await.unwrap();
    assert_eq!(hist.len(), changed + 1);
    for c in hist.iter().filter(|c| c.kind == "production") {
        assert_eq!(c.new_version.as_deref(), Some("1.0"));
    }
}

async fn deploy_locks_are_exclusive_and_recovered(h: &Harness) {
    use aviary_deploy::DeployLock;
    let s = &h.store;
    let lock = |holder: &str| DeployLock {
        app: "web".into(),
        role: "app".into(),
        holder: holder.into(),
        actor: "tester".into(),
        acquired_at: now(),
    };
    // The holder is a running execution.
    let mut running = new_exec("core.deploy_canary", now(), None);
    running.execution.status = ExecutionStatus::Running;
    s.create_execution(running.clone()).await.unwrap();
    let id = running.execution.id.clone();
    assert_eq!(s.acquire_deploy_lock(lock(&id)).await.unwrap(), None);
    assert_eq!(
        s.acquire_deploy_lock(lock(&id)).await.unwrap(),
        None,
        "re-entrant"
    );
    let held = s.acquire_deploy_lock(lock("other")).await.unwrap().unwrap();
    assert_eq!(held.holder, id);
    assert_eq!(s.list_deploy_locks().await.unwrap().len(), 1);
    // Another app's lock is independent; its holder does not exist.
    let mut db = lock("ghost");
    db.app = "db".into();
    assert_eq!(s.acquire_deploy_lock(db).await.unwrap(), None);
    let released = s.release_orphan_deploy_locks().await.unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].holder, "ghost");
    assert!(!s.release_deploy_lock("web", "app", "other").await.unwrap());
    assert!(s.release_deploy_lock("web", "app", &id).await.unwrap());
    assert_eq!(s.acquire_deploy_lock(lock("other")).await.unwrap(), None);
    assert_eq!(s.list_deploy_locks().await.unwrap().len(), 1);
}
