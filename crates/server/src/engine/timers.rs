//! Timer triggers (`core.st2.IntervalTimer`, `core.st2.CronTimer`,
//! `core.st2.DateTimer`): each enabled timer rule is planned; when its time
//! comes an event is ingested for that rule alone. The event's dedup key is
//! the rule and the planned time, so two servers sharing a database fire a
//! timer once, and a date timer never fires twice.

use std::collections::HashMap;
use std::sync::Arc;

use aviary_core::model::{CRON_TIMER_TRIGGER, DATE_TIMER_TRIGGER, INTERVAL_TIMER_TRIGGER};
use aviary_core::timer::{TimerSpec, timer_payload};
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::{Engine, Event};

fn is_timer(kind: &str) -> bool {
    matches!(
        kind,
        INTERVAL_TIMER_TRIGGER | CRON_TIMER_TRIGGER | DATE_TIMER_TRIGGER
    )
}

struct Planned {
    spec: TimerSpec,
    next: DateTime<Utc>,
}

fn plan(
    engine: &Engine,
    previous: &HashMap<String, Planned>,
    now: DateTime<Utc>,
) -> HashMap<String, Planned> {
    let registry = engine.registry.load_full();
    let mut out = HashMap::new();
    for rule in registry.rules.iter().filter(|r| is_timer(&r.trigger.kind)) {
        if !engine.rule_enabled(rule) {
            continue;
        }
        let reference = rule.reference();
        let spec = match TimerSpec::from_trigger(&rule.trigger.kind, &rule.trigger.parameters) {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(rule = %reference, error = %e, "timer rule has an invalid schedule");
                continue;
            }
        };
        // Keep the plan of a timer that did not change.
        let next = match previous.get(&reference) {
            Some(p) if format!("{:?}", p.spec) == format!("{spec:?}") => Some(p.next),
            _ => match &spec {
                TimerSpec::Date { at } => Some(*at),
                other => other.next_after(now),
            },
        };
        if let Some(next) = next {
            out.insert(reference, Planned { spec, next });
        }
    }
    out
}

/// Runs timers until `shutdown` fires.
pub async fn run_timers(engine: Arc<Engine>, shutdown: CancellationToken) {
    let mut planned = plan(&engine, &HashMap::new(), Utc::now());
    loop {
        let now = Utc::now();
        let due: Vec<String> = planned
            .iter()
            .filter(|(_, p)| p.next <= now)
            .map(|(r, _)| r.clone())
            .collect();
        for reference in due {
            let Some(p) = planned.get_mut(&reference) else {
                continue;
            };
            let fired_at = p.next;
            let registry = engine.registry.load_full();
            if let Some(rule) = registry.rule(&reference) {
                let event = Event {
                    trigger: rule.trigger.kind.clone(),
                    payload: timer_payload(&rule.trigger.parameters, fired_at),
                    dedup_key: Some(format!("timer:{reference}:{}", fired_at.to_rfc3339())),
                    webhook_url: None,
                    only_rule: Some(reference.clone()),
                };
                if let Err(e) = engine.ingest(event).await {
                    tracing::error!(rule = %reference, error = %e, "timer could not store its event");
                }
            }
            match p.spec.next_after(fired_at.max(now)) {
                Some(next) => p.next = next,
                None => {
                    planned.remove(&reference);
                }
            }
        }
        let sleep_for = planned
            .values()
            .map(|p| p.next)
            .min()
            .map(|next| (next - Utc::now()).to_std().unwrap_or_default())
            .unwrap_or(std::time::Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = engine.registry_changed.notified() => {
                planned = plan(&engine, &planned, Utc::now());
            }
            _ = tokio::time::sleep(sleep_for) => {}
        }
    }
}
