//! The resource commands: rules, actions, trigger instances, datastore keys,
//! tokens, packs and the audit trail.

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use aviary_core::model::{AuditRecord, Enforcement, KeyValue, TriggerInstance};

use crate::client::{ApiClient, describe_detail};
use crate::error::{CliError, EXIT_FAILED, EXIT_OK};
use crate::exec::print_table;
use crate::format::{self, Table, value_cell};
use crate::{
    ActionCmd, AuditArgs, Console, KeyCmd, PackCmd, RuleCmd, TokenCmd, TriggerInstanceCmd,
};

/// `pack.name` of a rule or action object (its `ref`, else `pack` + `name`).
fn reference(v: &Value) -> String {
    if let Some(r) = v.get("ref").and_then(Value::as_str) {
        return r.to_string();
    }
    match (
        v.get("pack").and_then(Value::as_str),
        v.get("name").and_then(Value::as_str),
    ) {
        (Some(p), Some(n)) => format!("{p}.{n}"),
        (None, Some(n)) => n.to_string(),
        _ => "-".to_string(),
    }
}

fn str_field(v: &Value, key: &str) -> String {
    value_cell(v.get(key))
}

/// A rule's trigger type (`trigger.type`, or `trigger` when a string).
fn rule_trigger(v: &Value) -> String {
    match v.get("trigger") {
        Some(Value::Object(t)) => value_cell(t.get("type").or_else(|| t.get("ref"))),
        other => value_cell(other),
    }
}

/// A rule's action reference (`action.ref`, or `action` when a string).
fn rule_action(v: &Value) -> String {
    match v.get("action") {
        Some(Value::Object(a)) => value_cell(a.get("ref")),
        other => value_cell(other),
    }
}

fn list_of<'a>(body: &'a Value, key: &str) -> &'a [Value] {
    body.as_array()
        .or_else(|| body.get(key).and_then(Value::as_array))
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// `aviary rule ...`.
pub(crate) async fn rule(
    api: &ApiClient,
    cmd: RuleCmd,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    let body = match &cmd {
        RuleCmd::List => api.get(&["rules"], &[]).await?,
        RuleCmd::Get { r#ref } => api.get(&["rules", r#ref], &[]).await?,
        RuleCmd::Enable { r#ref } => {
            api.call(Method::POST, &["rules", r#ref, "enable"], &[], None)
                .await?
        }
        RuleCmd::Disable { r#ref } => {
            api.call(Method::POST, &["rules", r#ref, "disable"], &[], None)
                .await?
        }
    };
    if console.json {
        console.print_json(&body)?;
        return Ok(EXIT_OK);
    }
    match cmd {
        RuleCmd::List => {
            let mut t = Table::new(&["ref", "enabled", "trigger", "action", "description"]);
            for r in list_of(&body, "rules") {
                t.row(vec![
                    reference(r),
                    str_field(r, "enabled"),
                    rule_trigger(r),
                    rule_action(r),
                    str_field(r, "description"),
                ]);
            }
            print_table(console, &t, "no rules")?;
        }
        RuleCmd::Get { .. } => {
            let pairs = [
                ("ref", reference(&body)),
                ("enabled", str_field(&body, "enabled")),
                ("description", str_field(&body, "description")),
                ("trigger", rule_trigger(&body)),
                (
                    "trigger params",
                    format::pretty(
                        body.get("trigger")
                            .and_then(|t| t.get("parameters"))
                            .unwrap_or(&Value::Null),
                        2,
                    ),
                ),
                (
                    "criteria",
                    format::pretty(body.get("criteria").unwrap_or(&Value::Null), 2),
                ),
                ("action", rule_action(&body)),
                (
                    "action params",
                    format::pretty(
                        body.get("action")
                            .and_then(|a| a.get("parameters"))
                            .unwrap_or(&Value::Null),
                        2,
                    ),
                ),
            ];
            console.print(&format::fields(&pairs))?;
        }
        RuleCmd::Enable { r#ref } | RuleCmd::Disable { r#ref } => {
            let enabled = body.get("enabled").and_then(Value::as_bool);
            let state = match enabled {
                Some(true) => "enabled",
                Some(false) => "disabled",
                None => "updated",
            };
            let mut shown = reference(&body);
            if shown == "-" {
                shown = r#ref;
            }
            console.print(&format!("rule {shown}: {state}\n"))?;
        }
    }
    Ok(EXIT_OK)
}

/// The rows of an action's parameter table.
fn parameter_rows(params: &Value) -> Vec<(String, &Value)> {
    match params {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Value::Array(a) => a.iter().map(|p| (value_cell(p.get("name")), p)).collect(),
        _ => Vec::new(),
    }
}

/// `aviary action ...`.
pub(crate) async fn action(
    api: &ApiClient,
    cmd: ActionCmd,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    match cmd {
        ActionCmd::List => {
            let body = api.get(&["actions"], &[]).await?;
            if console.json {
                console.print_json(&body)?;
                return Ok(EXIT_OK);
            }
            let mut t = Table::new(&["ref", "runner", "description"]);
            for a in list_of(&body, "actions") {
                t.row(vec![
                    reference(a),
                    str_field(a, "runner_type"),
                    str_field(a, "description"),
                ]);
            }
            print_table(console, &t, "no actions")?;
        }
        ActionCmd::Get { r#ref } => {
            let body = api.get(&["actions", &r#ref], &[]).await?;
            if console.json {
                console.print_json(&body)?;
                return Ok(EXIT_OK);
            }
            let pairs = [
                ("ref", reference(&body)),
                ("runner", str_field(&body, "runner_type")),
                ("description", str_field(&body, "description")),
                ("entry point", str_field(&body, "entry_point")),
            ];
            console.print(&format::fields(&pairs))?;
            let params = body.get("parameters").unwrap_or(&Value::Null);
            let mut t = Table::new(&[
                "name",
                "type",
                "required",
                "default",
                "secret",
                "description",
            ]);
            for (name, p) in parameter_rows(params) {
                let flag = |k: &str| {
                    if p.get(k).and_then(Value::as_bool).unwrap_or(false) {
                        "yes".to_string()
                    } else {
                        "no".to_string()
                    }
                };
                t.row(vec![
                    name,
                    str_field(p, "type"),
                    flag("required"),
                    value_cell(p.get("default")),
                    flag("secret"),
                    str_field(p, "description"),
                ]);
            }
            if t.is_empty() {
                console.print("parameters: none\n")?;
            } else {
                console.print("parameters:\n")?;
                console.print(&t.render())?;
            }
        }
    }
    Ok(EXIT_OK)
}

/// `aviary trigger-instance ...`.
pub(crate) async fn trigger_instance(
    api: &ApiClient,
    cmd: TriggerInstanceCmd,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    match cmd {
        TriggerInstanceCmd::List { trigger, limit } => {
            let mut q = vec![("limit", limit.to_string())];
            if let Some(t) = trigger {
                q.push(("trigger", t));
            }
            let body = api.get(&["trigger-instances"], &q).await?;
            if console.json {
                console.print_json(&body)?;
                return Ok(EXIT_OK);
            }
            let list: Vec<TriggerInstance> = api.decode(body, "the trigger instance list")?;
            let mut t = Table::new(&["id", "trigger", "occurred", "status"]);
            for ti in &list {
                t.row(vec![
                    ti.id.clone(),
                    ti.trigger.clone(),
                    format::time(&ti.occurrence_time),
                    ti.status.as_str().to_string(),
                ]);
            }
            print_table(console, &t, "no trigger instances")?;
        }
        TriggerInstanceCmd::Get { id } => {
            let body = api.get(&["trigger-instances", &id], &[]).await?;
            if console.json {
                console.print_json(&body)?;
                return Ok(EXIT_OK);
            }
            #[derive(Deserialize)]
            struct WithEnforcements {
                trigger_instance: TriggerInstance,
                #[serde(default)]
                enforcements: Vec<Enforcement>,
            }
            let w: WithEnforcements = api.decode(body, "the trigger instance")?;
            let ti = &w.trigger_instance;
            let pairs = [
                ("id", ti.id.clone()),
                ("trigger", ti.trigger.clone()),
                ("occurred", format::time(&ti.occurrence_time)),
                ("status", ti.status.as_str().to_string()),
                (
                    "dedup key",
                    ti.dedup_key.clone().unwrap_or_else(|| "-".into()),
                ),
                ("payload", format::pretty(&ti.payload, 2)),
            ];
            console.print(&format::fields(&pairs))?;
            if w.enforcements.is_empty() {
                console.print("enforcements: none (no rule matched)\n")?;
            } else {
                let mut t = Table::new(&["id", "rule", "execution", "enforced", "failure"]);
                for e in &w.enforcements {
                    t.row(vec![
                        e.id.clone(),
                        e.rule.clone(),
                        e.execution_id.clone().unwrap_or_else(|| "-".into()),
                        format::time(&e.enforced_at),
                        e.failure_reason.clone().unwrap_or_else(|| "-".into()),
                    ]);
                }
                console.print("enforcements:\n")?;
                console.print(&t.render())?;
            }
        }
    }
    Ok(EXIT_OK)
}

fn key_row(k: &KeyValue) -> Vec<String> {
    vec![
        k.scope.as_str().to_string(),
        k.name.clone(),
        k.value.clone(),
        if k.secret { "yes" } else { "no" }.to_string(),
        format::opt_time(k.expire_at.as_ref()),
    ]
}

const KEY_HEADER: [&str; 5] = ["scope", "name", "value", "secret", "expires"];

/// `aviary key ...`.
pub(crate) async fn key(
    api: &ApiClient,
    cmd: KeyCmd,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    match cmd {
        KeyCmd::Set {
            name,
            value,
            encrypt,
            ttl,
            scope,
        } => {
            let mut body = json!({"value": value, "secret": encrypt});
            if let Some(t) = ttl {
                body["ttl"] = json!(t);
            }
            let resp = api
                .call(
                    Method::PUT,
                    &["keys", scope.as_str(), &name],
                    &[],
                    Some(&body),
                )
                .await?;
            if console.json {
                console.print_json(&resp)?;
                return Ok(EXIT_OK);
            }
            let k: KeyValue = api.decode(resp, "the key")?;
            let mut t = Table::new(&KEY_HEADER);
            t.row(key_row(&k));
            console.print(&t.render())?;
        }
        KeyCmd::Get {
            name,
            decrypt,
            scope,
        } => {
            let q = decrypt_query(decrypt);
            let resp = api.get(&["keys", scope.as_str(), &name], &q).await?;
            if console.json {
                console.print_json(&resp)?;
                return Ok(EXIT_OK);
            }
            let k: KeyValue = api.decode(resp, "the key")?;
            let pairs = [
                ("scope", k.scope.as_str().to_string()),
                ("name", k.name.clone()),
                ("value", k.value.clone()),
                ("secret", if k.secret { "yes" } else { "no" }.to_string()),
                ("expires", format::opt_time(k.expire_at.as_ref())),
                ("updated", format::time(&k.updated_at)),
            ];
            console.print(&format::fields(&pairs))?;
        }
        KeyCmd::List {
            prefix,
            decrypt,
            scope,
        } => {
            let mut q = decrypt_query(decrypt);
            if let Some(s) = scope {
                q.push(("scope", s.as_str().to_string()));
            }
            if let Some(p) = prefix {
                q.push(("prefix", p));
            }
            let resp = api.get(&["keys"], &q).await?;
            if console.json {
                console.print_json(&resp)?;
                return Ok(EXIT_OK);
            }
            let list: Vec<KeyValue> = api.decode(resp, "the key list")?;
            let mut t = Table::new(&KEY_HEADER);
            for k in &list {
                t.row(key_row(k));
            }
            print_table(console, &t, "no keys")?;
        }
        KeyCmd::Delete { name, scope } => {
            api.call(Method::DELETE, &["keys", scope.as_str(), &name], &[], None)
                .await?;
            if console.json {
                console
                    .print_json(&json!({"deleted": true, "scope": scope.as_str(), "name": name}))?;
            } else {
                console.print(&format!("deleted key {}/{name}\n", scope.as_str()))?;
            }
        }
    }
    Ok(EXIT_OK)
}

fn decrypt_query(decrypt: bool) -> Vec<(&'static str, String)> {
    if decrypt {
        vec![("decrypt", "true".to_string())]
    } else {
        Vec::new()
    }
}

/// An API token as listed (the server never sends hashes).
#[derive(Debug, Deserialize)]
struct TokenView {
    id: String,
    name: String,
    #[serde(default)]
    role: String,
    created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    revoked_at: Option<DateTime<Utc>>,
    #[serde(default)]
    last_used_at: Option<DateTime<Utc>>,
}

/// `aviary token ...`.
pub(crate) async fn token(
    api: &ApiClient,
    cmd: TokenCmd,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    match cmd {
        TokenCmd::Create { name, role } => {
            let mut body = json!({"name": name});
            if let Some(r) = role {
                body["role"] = json!(r);
            }
            let resp = api
                .call(Method::POST, &["tokens"], &[], Some(&body))
                .await?;
            if console.json {
                console.print_json(&resp)?;
                return Ok(EXIT_OK);
            }
            let secret =
                resp.get("token")
                    .and_then(Value::as_str)
                    .ok_or_else(|| CliError::Protocol {
                        url: api.endpoint().url.clone(),
                        cause: "the created token has no `token` field".into(),
                    })?;
            let view: TokenView = api.decode(resp.clone(), "the created token")?;
            let pairs = [
                ("id", view.id.clone()),
                ("name", view.name.clone()),
                ("role", view.role.clone()),
                ("token", secret.to_string()),
            ];
            console.print(&format::fields(&pairs))?;
            console.eprint(
                "the token is shown only this once: store it now (e.g. export AVIARY_TOKEN=<token>)\n",
            )?;
        }
        TokenCmd::List => {
            let resp = api.get(&["tokens"], &[]).await?;
            if console.json {
                console.print_json(&resp)?;
                return Ok(EXIT_OK);
            }
            let list: Vec<TokenView> = api.decode(resp, "the token list")?;
            let mut t = Table::new(&["id", "name", "role", "created", "last used", "revoked"]);
            for tok in &list {
                t.row(vec![
                    tok.id.clone(),
                    tok.name.clone(),
                    tok.role.clone(),
                    format::opt_time(tok.created_at.as_ref()),
                    format::opt_time(tok.last_used_at.as_ref()),
                    format::opt_time(tok.revoked_at.as_ref()),
                ]);
            }
            print_table(console, &t, "no tokens")?;
        }
        TokenCmd::Revoke { id_or_name } => {
            api.call(Method::DELETE, &["tokens", &id_or_name], &[], None)
                .await?;
            if console.json {
                console.print_json(&json!({"revoked": id_or_name}))?;
            } else {
                console.print(&format!("revoked token {id_or_name}\n"))?;
            }
        }
    }
    Ok(EXIT_OK)
}

fn pack_table(packs: &[Value]) -> Table {
    let mut t = Table::new(&["name", "version", "actions", "rules", "description", "path"]);
    for p in packs {
        t.row(vec![
            str_field(p, "name"),
            str_field(p, "version"),
            str_field(p, "actions"),
            str_field(p, "rules"),
            str_field(p, "description"),
            str_field(p, "path"),
        ]);
    }
    t
}

/// `aviary pack ...`.
pub(crate) async fn pack(
    api: &ApiClient,
    cmd: PackCmd,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    match cmd {
        PackCmd::List => {
            let resp = api.get(&["packs"], &[]).await?;
            if console.json {
                console.print_json(&resp)?;
                return Ok(EXIT_OK);
            }
            print_table(console, &pack_table(list_of(&resp, "packs")), "no packs")?;
        }
        PackCmd::Reload => {
            let resp = api
                .send(Method::POST, &["packs", "reload"], &[], None)
                .await?;
            if resp.status == 422 {
                if console.json {
                    console.print_json(&resp.body)?;
                }
                let message = resp
                    .body
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("the packs are invalid");
                let mut text = format!(
                    "pack reload failed: {message}; the running packs are unchanged. Fix these and reload again:\n"
                );
                for d in list_of(&resp.body, "details") {
                    text.push_str(&format!("  - {}\n", describe_detail(d)));
                }
                console.eprint(&text)?;
                return Ok(EXIT_FAILED);
            }
            let resp = api.check(resp)?;
            if console.json {
                console.print_json(&resp.body)?;
                return Ok(EXIT_OK);
            }
            let packs = list_of(&resp.body, "packs");
            console.print(&format!("reloaded {} pack(s)\n", packs.len()))?;
            if !packs.is_empty() {
                console.print(&pack_table(packs).render())?;
            }
        }
    }
    Ok(EXIT_OK)
}

/// `aviary audit`.
pub(crate) async fn audit(
    api: &ApiClient,
    args: AuditArgs,
    console: &mut Console<'_>,
) -> Result<i32, CliError> {
    let resp = api
        .get(&["audit"], &[("limit", args.limit.to_string())])
        .await?;
    if console.json {
        console.print_json(&resp)?;
        return Ok(EXIT_OK);
    }
    let list: Vec<AuditRecord> = api.decode(resp, "the audit trail")?;
    let mut t = Table::new(&["at", "actor", "action", "target", "details"]);
    for r in &list {
        t.row(vec![
            format::time(&r.at),
            r.actor.clone(),
            r.action.clone(),
            r.target.clone(),
            value_cell(Some(&r.details)),
        ]);
    }
    print_table(console, &t, "no audit records")?;
    Ok(EXIT_OK)
}
