//! The store: one writer thread owning all appends (bounded queue, group commit,
//! callbacks in append order), queries and retention on the caller's thread.

use std::collections::BTreeSet;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;

use crate::backend::{Backend, Batch};
use crate::error::StoreError;
use crate::item::{ChannelRef, Position, StoredItem, POSITION_BYTES};
use crate::query::{Direction, HistoryPage, HistoryQuery};
use crate::retention::rule_for;
use crate::{AppendDone, HistoryStore, StoreConfig};

enum Request {
    Append(Vec<(ChannelRef, StoredItem)>, AppendDone),
    Flush(mpsc::Sender<()>),
}

pub(crate) struct Store {
    backend: Arc<dyn Backend>,
    config: StoreConfig,
    queue: Mutex<Option<SyncSender<Request>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Store {
    pub(crate) fn start(backend: Arc<dyn Backend>, config: StoreConfig) -> Store {
        let (tx, rx) = mpsc::sync_channel(config.queue_max.max(1));
        let writer_backend = backend.clone();
        let batch_max = config.batch_max.max(1);
        let writer = std::thread::Builder::new()
            .name("tern-history-writer".into())
            .spawn(move || write_loop(writer_backend.as_ref(), rx, batch_max))
            .expect("spawning the history writer thread");
        Store {
            backend,
            config,
            queue: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        }
    }

    fn sender(&self) -> Option<SyncSender<Request>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Closing the queue lets the writer drain what is queued and exit.
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(writer) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = writer.join();
        }
    }
}

fn write_loop(backend: &dyn Backend, rx: Receiver<Request>, batch_max: usize) {
    while let Ok(first) = rx.recv() {
        let mut requests = vec![first];
        let mut items = 0;
        while items < batch_max {
            match rx.try_recv() {
                Ok(request) => {
                    if let Request::Append(batch, _) = &request {
                        items += batch.len();
                    }
                    requests.push(request);
                }
                Err(_) => break,
            }
        }
        let mut batch = Batch {
            puts: Vec::new(),
            channels: BTreeSet::new(),
        };
        for request in &requests {
            if let Request::Append(appends, _) = request {
                for (channel, item) in appends {
                    batch.channels.insert(channel.prefix());
                    batch
                        .puts
                        .push((channel.key(item.position()), item.payload.clone()));
                }
            }
        }
        let result = if batch.puts.is_empty() {
            Ok(())
        } else {
            backend.write(&batch)
        };
        for request in requests {
            match request {
                Request::Append(_, done) => done(result.clone()),
                Request::Flush(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    }
}

impl HistoryStore for Store {
    fn append(
        &self,
        items: Vec<(ChannelRef, StoredItem)>,
        done: AppendDone,
    ) -> Result<(), StoreError> {
        let sender = self.sender().ok_or(StoreError::Closed)?;
        match sender.try_send(Request::Append(items, done)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(StoreError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(StoreError::Closed),
        }
    }

    fn query(&self, query: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        let limit = query.limit.clamp(1, 1000);
        let Some((low, high)) = query.bounds() else {
            return Ok(HistoryPage::default());
        };
        let (low, high) = (query.channel.key(low), query.channel.key(high));
        let prefix_len = low.len() - POSITION_BYTES;
        let mut page = HistoryPage::default();
        let mut scanned = 0usize;
        let mut last: Option<Position> = None;
        let reverse = query.direction == Direction::Backwards;
        self.backend.scan(&low, &high, reverse, &mut |key, value| {
            let Some(position) = Position::from_bytes(&key[prefix_len..]) else {
                return true;
            };
            if page.items.len() == limit {
                // One more exists beyond the page.
                page.next = last;
                return false;
            }
            scanned += 1;
            last = Some(position);
            let item = StoredItem {
                timestamp_ms: position.timestamp_ms,
                origin: position.origin,
                seq: position.seq,
                index: position.index,
                payload: Bytes::copy_from_slice(value),
            };
            if query.keeps(&item) {
                page.items.push(item);
            }
            if scanned >= self.config.scan_max {
                page.next = last;
                return false;
            }
            true
        })?;
        Ok(page)
    }

    fn trim(&self, now_ms: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for prefix in self.backend.channels()? {
            let Some(channel) = ChannelRef::from_prefix(&prefix) else {
                continue;
            };
            let Some(rule) = rule_for(&self.config.retention, &channel.channel) else {
                continue;
            };
            let mut keys: Vec<Vec<u8>> = Vec::new();
            let cutoff = now_ms.saturating_sub(rule.max_age_ms);
            self.backend.scan(
                &channel.key(Position::MIN),
                &channel.key(Position::MAX),
                true,
                &mut |key, _| {
                    keys.push(key.to_vec());
                    true
                },
            )?;
            // `keys` is newest first: keep the first max_count that are young enough.
            let prefix_len = prefix.len();
            let doomed: Vec<Vec<u8>> = keys
                .into_iter()
                .enumerate()
                .filter(|(n, key)| {
                    let old = Position::from_bytes(&key[prefix_len..])
                        .is_none_or(|p| p.timestamp_ms < cutoff);
                    *n as u64 >= rule.max_count || old
                })
                .map(|(_, key)| key)
                .collect();
            deleted += doomed.len() as u64;
            for chunk in doomed.chunks(10_000) {
                self.backend.delete(chunk)?;
            }
        }
        Ok(deleted)
    }

    fn flush(&self) {
        let Some(sender) = self.sender() else { return };
        let (tx, rx) = mpsc::channel();
        if sender.send(Request::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}
