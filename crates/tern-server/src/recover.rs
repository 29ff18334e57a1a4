//! At start, with the disk store in a cluster: this node's earlier incarnations' recent
//! events back into its hub (`tern_replication::recover` says why and how far). The
//! origins a node ran under are kept in a small file beside its store, since each start
//! picks a new one at random.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use tern_core::{ChannelKey, Hub, OriginId, RemoteEvent};
use tern_replication::recover;
use tern_store::{ChannelRef, Direction, EventKind, HistoryQuery, HistoryStore};

/// Channels of the store listed per read.
const CHANNELS_PAGE: usize = 1_000;

/// The file beside the store that lists the origins this node ran under.
fn origins_file(store_path: &Path) -> PathBuf {
    let mut name = store_path.as_os_str().to_owned();
    name.push(".origins");
    PathBuf::from(name)
}

/// The origins this node ran under before (at most `recover::ORIGINS_KEPT`, from the
/// file beside its store at `store_path`), after recording `origin` there as the newest.
/// A file that cannot be read counts as none; one that cannot be written is logged (the
/// next start then recovers less).
pub fn earlier_origins(store_path: &Path, origin: OriginId) -> Vec<u64> {
    let path = origins_file(store_path);
    let mut earlier: Vec<u64> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| u64::from_str_radix(line.trim(), 16).ok())
        .filter(|o| *o != origin.0)
        .collect();
    if earlier.len() > recover::ORIGINS_KEPT {
        earlier.drain(..earlier.len() - recover::ORIGINS_KEPT);
    }
    // The file keeps the newest `ORIGINS_KEPT`, this start's included.
    let text: String = earlier
        .iter()
        .skip(earlier.len().saturating_sub(recover::ORIGINS_KEPT - 1))
        .chain(std::iter::once(&origin.0))
        .map(|o| format!("{o:016x}\n"))
        .collect();
    let written = std::fs::write(&path, text).and_then(|()| {
        std::fs::File::open(&path)?.sync_all()?;
        Ok(())
    });
    if let Err(err) = written {
        tracing::warn!(path = %path.display(), error = %err, "recording this node's origin failed");
    }
    earlier
}

/// What [`run`] took back.
#[derive(Debug, Default)]
pub struct Recovered {
    pub channels: usize,
    pub events: usize,
    /// The earlier origins some of whose events went back into the hub.
    pub origins: BTreeSet<u64>,
}

/// Takes the recent stored events of the `earlier` origins back into `hub`, channel by
/// channel (webhook outboxes are this node's own, never offered). Blocking: store reads.
pub fn run(store: &dyn HistoryStore, hub: &Hub, earlier: &[u64], now_ms: i64) -> Recovered {
    let mut recovered = Recovered::default();
    if earlier.is_empty() {
        return recovered;
    }
    let since = recover::since_ms(hub, now_ms);
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = match store.message_channels(after.as_deref(), CHANNELS_PAGE) {
            Ok(page) => page,
            Err(err) => {
                tracing::warn!(error = %err, "listing the stored channels to recover failed");
                break;
            }
        };
        for (app, channel) in page.channels {
            if !crate::cluster::copied_between_nodes(&app) {
                continue;
            }
            let cursor = store.cursor(&app, &channel).unwrap_or_default();
            let origins = recover::earlier_in(&cursor, earlier);
            if origins.is_empty() {
                continue;
            }
            let key = ChannelKey::new(&app, &channel);
            let mut by_origin: HashMap<u64, Vec<RemoteEvent>> = HashMap::new();
            for presence in [false, true] {
                let rows = recent_rows(store, hub, &key, presence, &origins, since);
                for event in tern_edge::history::stored_events(&channel, presence, rows) {
                    by_origin.entry(event.origin.0).or_default().push(event);
                }
            }
            let mut took = 0;
            for (origin, list) in by_origin {
                match recover::adopt(hub, &key, list, now_ms) {
                    Ok(0) => {}
                    Ok(applied) => {
                        took += applied;
                        recovered.origins.insert(origin);
                    }
                    Err(err) => {
                        tracing::warn!(%channel, error = %err, "recovering stored events failed")
                    }
                }
            }
            if took > 0 {
                recovered.channels += 1;
                recovered.events += took;
            }
        }
        after = page.next;
        if after.is_none() {
            break;
        }
    }
    recovered
}

/// The channel's rows of one kind from `origins` stored since `since`, newest first, at
/// most what the channel log holds.
fn recent_rows(
    store: &dyn HistoryStore,
    hub: &Hub,
    key: &ChannelKey,
    presence: bool,
    origins: &[u64],
    since: i64,
) -> Vec<tern_store::StoredItem> {
    let until = origins.iter().map(|&o| (o, u64::MAX)).collect();
    let wanted = hub.limits().log.events_max;
    stored_rows(
        store,
        (&key.app, &key.name),
        presence,
        until,
        (Some(since), 0),
        wanted,
    )
    .0
}

/// Reads of stored rows per call: a publish may have several rows, so a few pages.
const PAGES_MAX: usize = 4;

/// The channel's rows of one kind whose origin is in `until` with a sequence at most its
/// value there, stored since `since`, newest first: about `wanted` of them, read in up
/// to [`PAGES_MAX`] pages (each bounded by the store's scan limit), and no page after
/// one that reached a sequence below `stop_below` (an origin's sequences grow with
/// time, so older pages hold only lower ones). Also whether the read reached the end:
/// the oldest row, or one below `stop_below`. Blocking.
pub(crate) fn stored_rows(
    store: &dyn HistoryStore,
    (app, channel): (&str, &str),
    presence: bool,
    until: BTreeMap<u64, u64>,
    (since, stop_below): (Option<i64>, u64),
    wanted: usize,
) -> (Vec<tern_store::StoredItem>, bool) {
    let kind = if presence {
        EventKind::Presence
    } else {
        EventKind::Message
    };
    let mut query = HistoryQuery::new(ChannelRef::new(app, channel, kind));
    query.direction = Direction::Backwards;
    query.start_ms = since;
    query.limit = wanted.clamp(1, tern_store::LIMIT_MAX);
    query.until = Some(until);
    let mut rows = Vec::new();
    for _ in 0..PAGES_MAX {
        match store.query(&query) {
            Ok(page) => {
                let below = page.items.iter().any(|row| row.seq < stop_below);
                rows.extend(page.items);
                match page.next {
                    None => return (rows, true),
                    _ if below => return (rows, true),
                    Some(next) if rows.len() < wanted => query.after = Some(next),
                    Some(_) => break,
                }
            }
            Err(err) => {
                tracing::warn!(%channel, error = %err, "reading stored events failed");
                break;
            }
        }
    }
    (rows, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_remembers_its_last_origins() {
        let dir = std::env::temp_dir().join(format!("tern-origins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = dir.join("history.redb");
        assert!(earlier_origins(&store, OriginId(1)).is_empty());
        assert_eq!(earlier_origins(&store, OriginId(2)), vec![1]);
        for o in 3..40 {
            earlier_origins(&store, OriginId(o));
        }
        let kept = earlier_origins(&store, OriginId(40));
        assert_eq!(kept.len(), recover::ORIGINS_KEPT);
        assert_eq!(kept.last(), Some(&39));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
