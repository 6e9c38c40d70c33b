//! Live output: chunks from a running action go to subscribers at once (a
//! broadcast channel per execution) and to the store in small batches, so
//! `tail` works while it runs and after it ended.

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

/// Broadcast channels of executions running on this server.
#[derive(Default)]
pub struct OutputHub {
    channels: Mutex<HashMap<String, broadcast::Sender<LiveEvent>>>,
}

impl OutputHub {
    /// Opens the channel of an execution that starts.
    pub fn open(&self, id: &str) -> broadcast::Sender<LiveEvent> {
        let (tx, _) = broadcast::channel(1024);
        if let Ok(mut map) = self.channels.lock() {
            map.insert(id.to_string(), tx.clone());
        }
        tx
    }

    /// Subscribes to a running execution, if it runs here.
    pub fn subscribe(&self, id: &str) -> Option<broadcast::Receiver<LiveEvent>> {
        self.channels
            .lock()
            .ok()
            .and_then(|m| m.get(id).map(|tx| tx.subscribe()))
    }

    /// Closes the channel of an execution that ended.
    pub fn close(&self, id: &str) {
        if let Ok(mut map) = self.channels.lock() {
            if let Some(tx) = map.remove(id) {
                let _ = tx.send(LiveEvent::End);
            }
        }
    }
}

/// Moves runner output into the broadcast channel and the store until the
/// runner drops its sender; returns when everything is flushed.
pub async fn pump(
    store: Arc<dyn Store>,
    execution_id: String,
    mut rx: mpsc::UnboundedReceiver<OutputEvent>,
    live: broadcast::Sender<LiveEvent>,
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
                let _ = live.send(LiveEvent::Output(chunk.clone()));
                pending.push(chunk);
                if pending_bytes >= FLUSH_BYTES {
                    flush(&store, &mut pending).await;
                    pending_bytes = 0;
                }
            }
            _ = tick.tick() => {
                if !pending.is_empty() {
                    flush(&store, &mut pending).await;
                    pending_bytes = 0;
                }
            }
        }
    }
    flush(&store, &mut pending).await;
}

async fn flush(store: &Arc<dyn Store>, pending: &mut Vec<OutputChunk>) {
    if pending.is_empty() {
        return;
    }
    let chunks = std::mem::take(pending);
    if let Err(e) = store.append_output(chunks).await {
        tracing::warn!(error = %e, "could not store execution output");
    }
}
