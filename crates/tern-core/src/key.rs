//! A channel's identity, and which node is its home in each region.

use std::sync::Arc;

/// A channel's identity: app and channel name (without any `[...]` qualifier).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelKey {
    pub app: Arc<str>,
    pub name: Arc<str>,
}

impl ChannelKey {
    pub fn new(app: &str, name: &str) -> Self {
        ChannelKey {
            app: app.into(),
            name: name.into(),
        }
    }

    /// Rendezvous (highest random weight) score of `node` for this channel: FNV-1a over
    /// the app, 0xfe, the channel name, 0xff and the node id, finished with a splitmix
    /// step (FNV's low bits mix poorly for short inputs). Every node computes the same
    /// one, so they agree on each channel's home node per region.
    pub fn home_score(&self, node: &str) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let bytes = self
            .app
            .bytes()
            .chain([0xfe])
            .chain(self.name.bytes())
            .chain([0xff])
            .chain(node.bytes());
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= h >> 30;
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 27;
        h
    }
}
