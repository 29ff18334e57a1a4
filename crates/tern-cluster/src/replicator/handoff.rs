//! Driving the handoff (`tern_replication::handoff`): after a membership change, page
//! through this node's store off the async runtime and send each channel's new home a
//! `Heads` entry with the stored cursor.

use tern_replication::handoff::{Member, HANDOFF_PAGE};
use tern_replication::heads::HEADS_PER_FRAME;

use super::*;
use crate::wire::HeadV1;

impl Replicator {
    /// The membership as the rendezvous sees it: the live peers and this node.
    pub(super) fn members(&self, out: &Out) -> Vec<Member> {
        self.nodes(out).map(Member::from).collect()
    }

    /// This node, restarted with its store, took its earlier incarnations' stored events
    /// back into its hub under `origins` (`recover`): a pass names those channels to
    /// every home (`Handoff::on_adopted`).
    pub fn on_adopted(&self, origins: &[u64]) {
        let members = self.members(&lock(&self.out));
        lock(&self.handoff).on_adopted(origins, &members, self.now());
        self.tick_wake.notify_one();
    }

    /// Reads the next page of a handoff pass if one is due (one read at a time, on a
    /// blocking thread), sends its entries, and goes on with the next page at once.
    pub(super) fn handoff_step(self: &Arc<Self>) {
        let Some(history) = self.history.get().cloned() else {
            return;
        };
        let Some(read) = lock(&self.handoff).next_read(self.now()) else {
            return;
        };
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let (channels, next) = history.channels(read.after, HANDOFF_PAGE);
            let sends = lock(&me.handoff).on_page(read.pass, channels, next, &me.config.node_id);
            let mut per_home: HashMap<String, Vec<HeadV1>> = HashMap::new();
            for (home, (key, origins)) in sends {
                per_home.entry(home).or_default().push(HeadV1 {
                    app: key.app.to_string(),
                    channel: key.name.to_string(),
                    origins,
                });
            }
            for (home, heads) in per_home {
                metrics::counter!("tern_replication_handoff_channels_total")
                    .increment(heads.len() as u64);
                for chunk in heads.chunks(HEADS_PER_FRAME) {
                    let frame = FrameV1::Heads {
                        channels: chunk.to_vec(),
                    };
                    me.send_control(&home, frame);
                }
            }
            me.handoff_step();
        });
    }
}
