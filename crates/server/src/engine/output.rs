//! Live output: chunks from a running action go to subscribers at once (a
//! broadcast channel per execution) and to the store in small batches, so
//! `tail` works while it runs and after it ended.
//!
//! Chunks not yet in the store stay in the hub until their write completes;
//! a new subscriber gets them as a backlog together with its receiver, so
//! store + backlog + live events never miss a chunk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aviary_core::model::ExecutionStatus;
use aviary_runners::{OutputEvent, Stream};
use aviary_store::{OutputChunk, Store};
use chrono::Utc;
use tokio::sync::{broadcast, mpsc};

/// How often buffered output is written to the store.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Buffered bytes that force a write.
const FLUSH_BYTES: usize = 64 * 1024;

/// What subscribers of a running execution receive.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// A chunk of output.
    Output(OutputChunk),
    /// The status changed.
    Status(ExecutionStatus),
    /// It reached a terminal state; nothing more will come.
    End,
}

struct Channel {
    tx: broadcast::Sender<LiveEvent>,
    unflushed: Vec<OutputChunk>,
}

/// Broadcast channels of executions running on this server.
#[derive(Default)]
pub struct OutputHub {
    channels: Mutex<HashMap<String, Channel>>,
}

/// A subscription: chunks not yet stored, then live events.
pub struct Subscription {
    /// Chunks sent before subscribing that may not be in the store yet.
    pub backlog: Vec<OutputChunk>,
    /// Everything after.
    pub live: broadcast::Receiver<LiveEvent>,
}

impl OutputHub {
    /// Opens the channel of an execution that starts.
    pub fn open(&self, id: &str) {
        let (tx, _) = broadcast::channel(1024);
        if let Ok(mut map) = self.channels.lock() {
            map.insert(
                id.to_string(),
                Channel {
                    tx,
                    unflushed: Vec::new(),
                },
            );
        }
    }

    /// Subscribes to a running execution, if it runs here.
    pub fn subscribe(&self, id: &str) -> Option<Subscription> {
        let map = self.channels.lock().ok()?;
        let ch = map.get(id)?;
        Some(Subscription {
            backlog: ch.unflushed.clone(),
            live: ch.tx.subscribe(),
        })
    }

    /// Sends an event to subscribers.
    pub fn send(&self, id: &str, event: LiveEvent) {
        if let Ok(mut map) = self.channels.lock()
            && let Some(ch) = map.get_mut(id)
        {
            if let LiveEvent::Output(chunk) = &event {
                ch.unflushed.push(chunk.clone());
            }
            let _ = ch.tx.send(event);
        }
    }

    /// Forgets chunks up to `seq`: they are in the store now.
    fn flushed(&self, id: &str, seq: i64) {
        if let Ok(mut map) = self.channels.lock()
            && let Some(ch) = map.get_mut(id)
        {
            ch.unflushed.retain(|c| c.seq > seq);
        }
    }

    /// Closes the channel of an execution that ended.
    pub fn close(&self, id: &str) {
        if let Ok(mut map) = self.channels.lock()
            && let Some(ch) = map.remove(id)
        {
            let _ = ch.tx.send(LiveEvent::End);
        }
    }
}

/// Moves runner output into the hub and the store until the runner drops
/// its sender; returns when everything is flushed.
pub async fn pump(
    store: Arc<dyn Store>,
    hub: Arc<OutputHub>,
    execution_id: String,
    mut rx: mpsc::UnboundedReceiver<OutputEvent>,
) {
    let mut seq: i64 = 0;
    let mut pending: Vec<OutputChunk> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                seq += 1;
                let chunk = OutputChunk {
                    execution_id: execution_id.clone(),
                    seq,
                    stream: match ev.stream { Stream::Stdout => "stdout", Stream::Stderr => "stderr" }.to_string(),
                    data: ev.data,
                    at: Utc::now(),
                };
                pending_bytes += chunk.data.len();
                hub.send(&execution_id, LiveEvent::Output(chunk.clone()));
                pending.push(chunk);
                if pending_bytes >= FLUSH_BYTES {
                    flush(&store, &hub, &execution_id, &mut pending).await;
                    pending_bytes = 0;
                }
            }
            _ = tick.tick() => {
                if !pending.is_empty() {
                    flush(&store, &hub, &execution_id, &mut pending).await;
                    pending_bytes = 0;
                }
            }
        }
    }
    flush(&store, &hub, &execution_id, &mut pending).await;
}

async fn flush(store: &Arc<dyn Store>, hub: &OutputHub, id: &str, pending: &mut Vec<OutputChunk>) {
    let Some(last) = pending.last().map(|c| c.seq) else {
        return;
    };
    let chunks = std::mem::take(pending);
    match store.append_output(chunks).await {
        Ok(()) => hub.flushed(id, last),
        Err(e) => tracing::warn!(error = %e, "could not store execution output"),
    }
}
