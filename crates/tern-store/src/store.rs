//! [`Store`]: the [`HistoryStore`] over either engine. Appends go through the writer
//! thread; queries and trims run on the caller's thread.

use std::sync::Arc;

use crate::backend::{Backend, Row};
use crate::error::StoreError;
use crate::item::{channel_of_prefix, ChannelRef, StoredItem};
use crate::query::{HistoryPage, HistoryQuery, Pager};
use crate::retention::{rule_for, RetentionRule, TrimPlan};
use crate::writer::{spawn_writer, Writer};
use crate::{AppendDone, HistoryStore, StoreConfig};

pub(crate) struct Store {
    /// Declared first so it drops (drains and joins the writer) before the rest.
    writer: Writer,
    backend: Arc<dyn Backend>,
    retention: Vec<RetentionRule>,
    /// Rows per trim commit and channels per trim page.
    batch_max: usize,
    /// Rows one query may scan.
    scan_max: usize,
    /// Appends of items refused so far (see `HistoryStore::refused_appends`).
    refused: std::sync::atomic::AtomicU64,
}

impl Store {
    pub(crate) fn start(
        backend: Arc<dyn Backend>,
        config: &StoreConfig,
    ) -> Result<Store, StoreError> {
        let batch_max = config.batch_max.max(1);
        Ok(Store {
            writer: spawn_writer(backend.clone(), config.queue_max, batch_max)?,
            backend,
            retention: config.retention.clone(),
            batch_max,
            scan_max: config.scan_max.max(1),
            refused: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Deletes what `plan` dooms in one channel, `batch_max` rows per commit so the
    /// writer is never held up for long.
    fn trim_channel(&self, prefix: &[u8], plan: TrimPlan) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let chunk = self.backend.trim(prefix, plan, self.batch_max)?;
            deleted += chunk;
            if chunk < self.batch_max as u64 {
                return Ok(deleted);
            }
        }
    }
}

/// Encodes each item's channel once per run of items in the same channel.
fn rows(items: Vec<(ChannelRef, StoredItem)>) -> Result<Vec<Row>, StoreError> {
    let mut rows = Vec::with_capacity(items.len());
    let mut last: Option<(ChannelRef, Arc<[u8]>)> = None;
    for (channel, item) in items {
        let prefix = match &last {
            Some((last_channel, prefix)) if *last_channel == channel => prefix.clone(),
            _ => {
                let prefix: Arc<[u8]> = channel.key_prefix()?.into();
                last = Some((channel, prefix.clone()));
                prefix
            }
        };
        rows.push(Row {
            prefix,
            position: item.position(),
            payload: item.payload,
        });
    }
    Ok(rows)
}

impl HistoryStore for Store {
    fn append(
        &self,
        items: Vec<(ChannelRef, StoredItem)>,
        done: AppendDone,
    ) -> Result<(), StoreError> {
        let has_items = !items.is_empty();
        let result = rows(items).and_then(|rows| self.writer.append(rows, done));
        if result.is_err() && has_items {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        result
    }

    fn refused_appends(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn query(&self, query: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        let prefix = query.channel.key_prefix()?;
        let Some((low, high)) = query.range() else {
            return Ok(HistoryPage::default());
        };
        let mut pager = Pager::new(query, self.scan_max);
        self.backend.scan(
            &prefix,
            low,
            high,
            query.direction,
            &mut |position, payload| pager.offer(position, payload),
        )?;
        Ok(pager.finish())
    }

    fn trim(&self, now_ms: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        // A damaged channel is reported after the others are trimmed, not instead.
        let mut first_error = None;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let channels = self.backend.channels(after.as_deref(), self.batch_max)?;
            for prefix in &channels {
                let Some(channel) = channel_of_prefix(prefix) else {
                    first_error.get_or_insert(StoreError::Corrupt(format!(
                        "malformed channel prefix of {} bytes",
                        prefix.len()
                    )));
                    continue;
                };
                let Some(rule) = rule_for(&self.retention, channel) else {
                    continue;
                };
                match self.trim_channel(prefix, TrimPlan::new(rule, now_ms)) {
                    Ok(n) => deleted += n,
                    Err(err) => {
                        first_error.get_or_insert(err);
                    }
                }
            }
            if channels.len() < self.batch_max {
                break;
            }
            after = channels.last().cloned();
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(deleted),
        }
    }

    fn flush(&self) {
        self.writer.flush();
    }

    fn cursor(&self, app: &str, channel: &str) -> Result<Vec<(u64, u64)>, StoreError> {
        let prefix = ChannelRef::new(app, channel, crate::item::EventKind::Message).key_prefix()?;
        Ok(self
            .backend
            .cursor(crate::backend::cursor_key(&prefix))?
            .into_iter()
            .collect())
    }
}
