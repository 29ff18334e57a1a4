//! Inter-node frames. A v1 frame on the wire is `version byte ‖ bincode(FrameV1)`;
//! decoding refuses other versions and anything over [`FRAME_BYTES_MAX`]. Wire v2
//! (`framing.rs`, negotiated per connection in `link.rs`) carries the same frames,
//! batched, events in their compact form ([`compact`]) and compressed between regions.
//!
//! Threat model: the peer holds a certificate of the cluster CA (`tls.rs`), so it is a
//! member, but its bytes may still be wrong (a bug, an old or newer version, a member
//! gone bad). Decoding is where shape is checked, once, so nothing behind it does
//! arithmetic on or stores what no node produces: a frame is refused ([`Refusal`], the
//! link is dropped and the refusal counted by its [`Refusal::reason`]) when it has
//! another version, is empty, over [`FRAME_BYTES_MAX`], not bincode of a `FrameV1`, has
//! bytes after it, names an app or channel longer than [`NAME_BYTES_MAX`], carries a
//! sequence number or link position over [`SEQ_MAX`] (so `+ 1` never overflows
//! anywhere), or lists more than [`ITEMS_PER_FRAME_MAX`] channels or items.

use serde::{Deserialize, Serialize};
use tern_core::{ChannelEvent, OriginId, RemoteEvent};
use tern_protocol::{Format, ProtocolMessage};

use crate::ClusterError;

pub mod compact;

pub const VERSION_V1: u8 = 1;
/// Largest frame accepted from a peer.
pub const FRAME_BYTES_MAX: usize = 16 << 20;
/// Longest app or channel name in a frame: the edge refuses channel names over 2,048
/// bytes, so this is slack, and it keeps a peer from making channels with names of
/// megabytes (channels are bounded by count, not by the bytes of their names).
pub const NAME_BYTES_MAX: usize = 4_096;
/// Highest sequence number or link position in a frame. Both count from 1, one per
/// event: at a million a second this is 146,000 years away, and the headroom means
/// `seq + 1` cannot overflow on a receiver.
pub const SEQ_MAX: u64 = 1 << 62;
/// Most channels (`Heads`, `Interest`) or history items (`BackfillItems`) in one frame.
/// Senders put at most 512 in one; each costs the receiver map lookups under its locks,
/// so a frame of millions would hold a runtime thread for seconds.
pub const ITEMS_PER_FRAME_MAX: usize = 4_096;

/// A channel event as it crosses between nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventV1 {
    pub app: String,
    pub channel: String,
    pub origin: u64,
    pub seq: u64,
    pub publisher: Option<String>,
    /// The origin's frame, msgpack-encoded (binary data stays binary).
    pub frame: Vec<u8>,
    /// Position on the sender's outbound link (1, 2, ... per sender incarnation), which
    /// the receiver acknowledges with [`FrameV1::Stored`]; 0 for repair answers.
    pub link_seq: u64,
}

/// Everything one node says to another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FrameV1 {
    Event(EventV1),
    /// "Send me `origin`'s events `from..=to` on this channel" (gap repair).
    Repair {
        app: String,
        channel: String,
        origin: u64,
        from: u64,
        to: u64,
    },
    /// First frame on every link: who is sending (so the receiver can answer on its own
    /// link to us) and from which link position it resends.
    Hello {
        /// Must be the node id the sender's certificate names: the receiver refuses
        /// (closes) a connection whose `Hello` names another node.
        node_id: String,
        incarnation: u64,
        /// The sender's origin id (its own events come over this link, reliably).
        origin: u64,
        /// Which link of this sender incarnation this is: link positions restart at 1
        /// on a new one.
        epoch: u64,
        /// The lowest link position the sender still holds: anything below it that the
        /// receiver lacks is gone from the link (and left to channel gap repair).
        first: u64,
    },
    /// "Every event of yours up to link position `upto` is stored here" (ack_replicas).
    Stored {
        incarnation: u64,
        /// The link (see `Hello::epoch`) whose positions these are.
        epoch: u64,
        upto: u64,
    },
    /// Anti-entropy: the sender's cursor on some of its channels. The receiver asks for
    /// whatever it lacks (from any origin), so survivors converge after a node dies.
    Heads {
        channels: Vec<HeadV1>,
    },
    /// Answer to a repair: `origin`'s events up to `upto` on this channel cannot be
    /// supplied by anyone (trimmed from the log or never logged): move past them.
    Skip {
        app: String,
        channel: String,
        origin: u64,
        upto: u64,
    },
    /// Between nodes of one region: the sender has subscribers on these channels (`on`)
    /// or no longer has (`!on`), so its region's origins and relays send it their events.
    /// Refreshed periodically; an interest not refreshed for a while is forgotten.
    Interest {
        channels: Vec<(String, String)>,
        on: bool,
    },
    /// "Send me this channel's state": its log (as repair answers), its presence
    /// members, then [`FrameV1::Synced`]. Asked before a node's first subscriber
    /// attaches to a channel the node does not receive.
    Sync {
        app: String,
        channel: String,
    },
    /// Part of a `Sync` answer: a msgpack `ProtocolMessage` whose `presence` holds
    /// current members.
    SyncMembers {
        app: String,
        channel: String,
        frame: Vec<u8>,
    },
    /// End of a `Sync` answer: the sender's cursor on the channel.
    Synced {
        app: String,
        channel: String,
        origins: Vec<(u64, u64)>,
    },
    /// "Send me the stored history of this channel after `after`" (a channel's new home
    /// copies what it missed from a home in another region), one page at a time.
    Backfill {
        app: String,
        channel: String,
        presence: bool,
        after: Option<ItemPosV1>,
    },
    /// One page of stored history; `more` when the receiver should ask for the next.
    BackfillItems {
        app: String,
        channel: String,
        presence: bool,
        items: Vec<ItemV1>,
        more: bool,
    },
}

/// Where a stored history item sits in its channel: (timestamp, origin, seq, index).
pub type ItemPosV1 = (i64, u64, u64, u32);

/// A stored history item (a message or presence message, msgpack) being copied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemV1 {
    pub position: ItemPosV1,
    pub payload: Vec<u8>,
}

/// One channel's cursor: `(origin, last sequence)` pairs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadV1 {
    pub app: String,
    pub channel: String,
    pub origins: Vec<(u64, u64)>,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// Room left in a frame for everything but the variable-length bytes an event or an
/// answer carries (varints, tags, the version byte), with a wide margin.
pub const FRAME_OVERHEAD_BYTES_MAX: usize = 1_024;

/// Whether a frame carrying `variable_bytes` of strings and byte arrays (plus scalars)
/// fits the frame limit the peer enforces. An upper bound: a frame that passes always
/// encodes to at most [`FRAME_BYTES_MAX`] bytes.
pub fn fits(variable_bytes: usize) -> bool {
    variable_bytes.saturating_add(FRAME_OVERHEAD_BYTES_MAX) <= FRAME_BYTES_MAX
}

pub fn encode(frame: &FrameV1) -> Vec<u8> {
    let mut out = vec![VERSION_V1];
    // Our own types always encode; the limit only guards decoding.
    out.extend(
        bincode::serde::encode_to_vec(frame, bincode::config::standard()).unwrap_or_default(),
    );
    out
}

/// Why peer bytes were not accepted as a frame. The link they came on is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A frame of zero bytes (no version byte).
    #[error("empty frame")]
    Empty,
    /// A version byte this node does not speak.
    #[error("unsupported version {0}")]
    Version(u8),
    /// A length over [`FRAME_BYTES_MAX`] (announced in the length prefix, or of the body).
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// The stream ended inside a frame (in its length prefix or its body).
    #[error("stream ended inside a frame")]
    Truncated,
    /// The body is not bincode of a `FrameV1` (within the size limit).
    #[error("undecodable frame: {0}")]
    Undecodable(String),
    /// Bytes after the frame, inside its length.
    #[error("trailing bytes after the frame")]
    Trailing,
    /// An app or channel name over [`NAME_BYTES_MAX`] bytes.
    #[error("a name of {0} bytes is over the limit")]
    NameTooLong(usize),
    /// A sequence number or link position over [`SEQ_MAX`].
    #[error("sequence {0} is over the limit")]
    SeqTooHigh(u64),
    /// More than [`ITEMS_PER_FRAME_MAX`] channels or items.
    #[error("{0} channels or items in one frame are over the limit")]
    TooManyItems(usize),
}

impl Refusal {
    /// The `reason` label it is counted under (`tern_cluster_frames_refused_total`).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Empty => "empty",
            Refusal::Version(_) => "version",
            Refusal::TooLarge(_) => "too_large",
            Refusal::Truncated => "truncated",
            Refusal::Undecodable(_) => "undecodable",
            Refusal::Trailing => "trailing",
            Refusal::NameTooLong(_) => "name_too_long",
            Refusal::SeqTooHigh(_) => "seq_too_high",
            Refusal::TooManyItems(_) => "too_many_items",
        }
    }
}

impl From<Refusal> for ClusterError {
    fn from(refusal: Refusal) -> ClusterError {
        ClusterError::Wire(refusal.to_string())
    }
}

pub fn decode(bytes: &[u8]) -> Result<FrameV1, Refusal> {
    match bytes.split_first() {
        Some((&VERSION_V1, body)) if body.len() <= FRAME_BYTES_MAX => {
            let (frame, used) = bincode::serde::decode_from_slice(body, config())
                .map_err(|e| Refusal::Undecodable(e.to_string()))?;
            if used != body.len() {
                return Err(Refusal::Trailing);
            }
            check(&frame)?;
            Ok(frame)
        }
        Some((&VERSION_V1, body)) => Err(Refusal::TooLarge(body.len() + 1)),
        Some((version, _)) => Err(Refusal::Version(*version)),
        None => Err(Refusal::Empty),
    }
}

fn name(name: &str) -> Result<(), Refusal> {
    match name.len() {
        len if len > NAME_BYTES_MAX => Err(Refusal::NameTooLong(len)),
        _ => Ok(()),
    }
}

fn names(app: &str, channel: &str) -> Result<(), Refusal> {
    name(app)?;
    name(channel)
}

fn seq(seq: u64) -> Result<(), Refusal> {
    match seq {
        seq if seq > SEQ_MAX => Err(Refusal::SeqTooHigh(seq)),
        _ => Ok(()),
    }
}

fn items(count: usize) -> Result<(), Refusal> {
    match count {
        count if count > ITEMS_PER_FRAME_MAX => Err(Refusal::TooManyItems(count)),
        _ => Ok(()),
    }
}

fn origins(origins: &[(u64, u64)]) -> Result<(), Refusal> {
    origins.iter().try_for_each(|(_, s)| seq(*s))
}

/// The limits of the module doc on a decoded frame.
pub(crate) fn check(frame: &FrameV1) -> Result<(), Refusal> {
    match frame {
        FrameV1::Event(event) => {
            names(&event.app, &event.channel)?;
            seq(event.seq)?;
            seq(event.link_seq)
        }
        FrameV1::Repair {
            app,
            channel,
            from,
            to,
            ..
        } => {
            names(app, channel)?;
            seq(*from)?;
            seq(*to)
        }
        FrameV1::Hello { first, .. } => seq(*first),
        FrameV1::Stored { upto, .. } => seq(*upto),
        FrameV1::Heads { channels } => {
            items(channels.len())?;
            channels.iter().try_for_each(|head| {
                names(&head.app, &head.channel)?;
                origins(&head.origins)
            })
        }
        FrameV1::Skip {
            app, channel, upto, ..
        } => {
            names(app, channel)?;
            seq(*upto)
        }
        FrameV1::Interest { channels, .. } => {
            items(channels.len())?;
            channels
                .iter()
                .try_for_each(|(app, channel)| names(app, channel))
        }
        FrameV1::Sync { app, channel }
        | FrameV1::SyncMembers { app, channel, .. }
        | FrameV1::Backfill { app, channel, .. } => names(app, channel),
        FrameV1::Synced {
            app,
            channel,
            origins: cursor,
        } => {
            names(app, channel)?;
            origins(cursor)
        }
        FrameV1::BackfillItems {
            app,
            channel,
            items: page,
            ..
        } => {
            names(app, channel)?;
            items(page.len())
        }
    }
}

impl EventV1 {
    /// An event as this node applied it; the frame bytes are the event's own msgpack
    /// encoding (made once, shared with msgpack subscribers), not a new one.
    pub fn from_event(app: &str, channel: &str, event: &ChannelEvent) -> EventV1 {
        EventV1 {
            app: app.into(),
            channel: channel.into(),
            origin: event.origin.0,
            seq: event.seq,
            publisher: event.publisher.as_deref().map(str::to_string),
            frame: event.encoded(Format::Msgpack).to_vec(),
            link_seq: 0,
        }
    }

    /// Whether this event fits one frame (see [`fits`]).
    pub fn fits(&self) -> bool {
        fits(
            self.app.len()
                + self.channel.len()
                + self.publisher.as_ref().map_or(0, String::len)
                + self.frame.len(),
        )
    }

    pub fn to_remote(&self) -> Result<RemoteEvent, ClusterError> {
        let frame: ProtocolMessage = tern_protocol::decode(Format::Msgpack, &self.frame)
            .map_err(|e| ClusterError::Wire(e.to_string()))?;
        Ok(RemoteEvent {
            origin: OriginId(self.origin),
            seq: self.seq,
            publisher: self.publisher.as_deref().map(Into::into),
            frame,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Frames round-trip; other versions and trailing bytes are refused.
    #[test]
    fn round_trip_and_refusals() {
        let frame = FrameV1::Repair {
            app: "a".into(),
            channel: "c".into(),
            origin: 1,
            from: 2,
            to: 3,
        };
        let bytes = encode(&frame);
        assert_eq!(decode(&bytes).unwrap(), frame);
        let mut other = bytes.clone();
        other[0] = 2;
        assert!(decode(&other).is_err());
        let mut trailing = bytes;
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        assert!(decode(&[]).is_err());
    }

    /// `fits` is an upper bound: the largest event it accepts encodes within the limit
    /// the receiver enforces and decodes; one byte more is refused before encoding.
    #[test]
    fn fits_bounds_the_encoded_frame() {
        let event = |frame_len: usize| EventV1 {
            app: "app".into(),
            channel: "channel".into(),
            origin: u64::MAX,
            // The largest a peer accepts; as a varint as long as u64::MAX.
            seq: SEQ_MAX,
            publisher: Some("publisher".into()),
            frame: vec![0xAB; frame_len],
            link_seq: SEQ_MAX,
        };
        let variable = "app".len() + "channel".len() + "publisher".len();
        let largest = FRAME_BYTES_MAX - FRAME_OVERHEAD_BYTES_MAX - variable;
        let fitting = event(largest);
        assert!(fitting.fits());
        let bytes = encode(&FrameV1::Event(fitting.clone()));
        assert!(bytes.len() <= FRAME_BYTES_MAX + 1);
        assert_eq!(decode(&bytes).unwrap(), FrameV1::Event(fitting));
        assert!(!event(largest + 1).fits());
    }

    /// Each limit of the module doc refuses one past it, with its reason, and accepts
    /// the limit itself.
    #[test]
    fn decode_checks_names_sequences_and_counts() {
        let check = |frame: FrameV1, expected: Option<&str>| {
            let got = decode(&encode(&frame)).err().map(|r| r.reason());
            assert_eq!(got, expected, "{frame:?}");
        };
        let event = |channel: usize, seq: u64, link_seq: u64| {
            FrameV1::Event(EventV1 {
                app: "app".into(),
                channel: "c".repeat(channel),
                origin: 1,
                seq,
                publisher: None,
                frame: vec![],
                link_seq,
            })
        };
        check(event(NAME_BYTES_MAX, SEQ_MAX, SEQ_MAX), None);
        check(event(NAME_BYTES_MAX + 1, 1, 1), Some("name_too_long"));
        check(event(1, SEQ_MAX + 1, 1), Some("seq_too_high"));
        check(event(1, 1, u64::MAX), Some("seq_too_high"));
        let repair = |from: u64, to: u64| FrameV1::Repair {
            app: "a".into(),
            channel: "c".into(),
            origin: 1,
            from,
            to,
        };
        check(repair(5, 1), None);
        check(repair(1, u64::MAX), Some("seq_too_high"));
        let skip = FrameV1::Skip {
            app: "a".into(),
            channel: "c".into(),
            origin: 1,
            upto: u64::MAX,
        };
        check(skip, Some("seq_too_high"));
        let heads = |count: usize, seq: u64| FrameV1::Heads {
            channels: vec![
                HeadV1 {
                    app: "a".into(),
                    channel: "c".into(),
                    origins: vec![(1, seq)],
                };
                count
            ],
        };
        check(heads(ITEMS_PER_FRAME_MAX, SEQ_MAX), None);
        check(heads(ITEMS_PER_FRAME_MAX + 1, 1), Some("too_many_items"));
        check(heads(1, u64::MAX), Some("seq_too_high"));
        let interest = |count: usize, name: usize| FrameV1::Interest {
            channels: vec![("a".into(), "c".repeat(name)); count],
            on: true,
        };
        check(interest(ITEMS_PER_FRAME_MAX + 1, 1), Some("too_many_items"));
        check(interest(1, NAME_BYTES_MAX + 1), Some("name_too_long"));
        let synced = FrameV1::Synced {
            app: "a".into(),
            channel: "c".into(),
            origins: vec![(1, 2), (3, u64::MAX)],
        };
        check(synced, Some("seq_too_high"));
        let hello = FrameV1::Hello {
            node_id: "a".into(),
            incarnation: u64::MAX,
            origin: u64::MAX,
            epoch: u64::MAX,
            first: u64::MAX,
        };
        check(hello, Some("seq_too_high"));
        let stored = FrameV1::Stored {
            incarnation: 1,
            epoch: 1,
            upto: u64::MAX,
        };
        check(stored, Some("seq_too_high"));
        let page = |count: usize| FrameV1::BackfillItems {
            app: "a".into(),
            channel: "c".into(),
            presence: false,
            items: vec![
                ItemV1 {
                    position: (0, 0, 0, 0),
                    payload: vec![],
                };
                count
            ],
            more: false,
        };
        check(page(ITEMS_PER_FRAME_MAX), None);
        check(page(ITEMS_PER_FRAME_MAX + 1), Some("too_many_items"));
    }

    proptest! {
        /// Arbitrary peer bytes never panic the decoder.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }
    }
}
