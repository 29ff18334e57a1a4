//! Seeds the corpora that SDK traffic cannot reach, from Tern's own code: real gossip
//! between two `Membership` agents (through a recording relay on loopback), `FrameV1`s
//! built from captured SDK frames, JWTs from `sign_jwt`, Tern token claims, cursors and
//! history positions. Run after `seeds/capture.mjs` (it reads that script's frames):
//!
//!   cargo run --manifest-path fuzz/Cargo.toml --no-default-features --example seeds
//!
//! Writes `fuzz/corpus/<target>/gen-*`, replacing earlier ones.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::json;
use tern_auth::{sign_jwt, ApiKey, Capability, KeyRing};
use tern_cluster::framing::{RecordEncoder, ZSTD_LEVEL};
use tern_cluster::gossip_auth::{fuzz_decode_datagram, GossipKey, OVERHEAD_LEN};
use tern_cluster::membership::{Member, Membership, MembershipConfig};
use tern_cluster::wire::{self, EventV1, FrameV1, HeadV1, ItemV1};
use tern_core::{Cursor, OriginId};
use tern_fuzz::auth::{KEY, KEY_CAPABILITY};
use tern_fuzz::cluster::GOSSIP_KEY_HEX;
use tern_fuzz::NOW_MS;
use tern_protocol::{action, Format, ProtocolMessage};
use tern_store::Position;

/// How long the two gossip agents talk through the relay.
const GOSSIP_CAPTURE: Duration = Duration::from_secs(4);
/// Most gossip datagrams kept.
const GOSSIP_SEEDS_MAX: usize = 24;
/// A gossip datagram's version byte and send time, before the chitchat envelope.
const GOSSIP_HEADER_LEN: usize = 1 + 8;

fn main() -> anyhow::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut seeds = Seeds::default();
    cluster_frames(&corpus, &mut seeds)?;
    cluster_records(&mut seeds);
    tokens(&corpus, &mut seeds)?;
    serials(&mut seeds);
    let runtime = tokio::runtime::Runtime::new()?;
    for envelope in runtime.block_on(gossip())? {
        seeds.add("gossip_datagram", envelope);
    }
    seeds.write(&corpus)
}

#[derive(Default)]
struct Seeds(BTreeMap<&'static str, Vec<Vec<u8>>>);

impl Seeds {
    fn add(&mut self, target: &'static str, input: impl Into<Vec<u8>>) {
        let input = input.into();
        let inputs = self.0.entry(target).or_default();
        if !inputs.contains(&input) {
            inputs.push(input);
        }
    }

    fn write(&self, corpus: &Path) -> anyhow::Result<()> {
        for (target, inputs) in &self.0 {
            let folder = corpus.join(target);
            std::fs::create_dir_all(&folder)?;
            for entry in std::fs::read_dir(&folder)? {
                let path = entry?.path();
                if file_name(&path).starts_with("gen-") {
                    std::fs::remove_file(path)?;
                }
            }
            for (index, input) in inputs.iter().enumerate() {
                std::fs::write(folder.join(format!("gen-{index:02}")), input)?;
            }
            println!("{target}: {} inputs", inputs.len());
        }
        Ok(())
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The SDK frames `capture.mjs` saved for a target.
fn captured(corpus: &Path, target: &str) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut inputs = Vec::new();
    for entry in std::fs::read_dir(corpus.join(target))? {
        let path = entry?.path();
        if file_name(&path).starts_with("sdk-") {
            let bytes = std::fs::read(&path)?;
            inputs.push((path, bytes));
        }
    }
    inputs.sort();
    Ok(inputs)
}

/// Wire-v2 links (`cluster_record`): the `cluster_frame` seeds in records of two
/// frames each, plain and compressed, and a v1 record followed by a v2 one.
fn cluster_records(seeds: &mut Seeds) {
    let frames: Vec<FrameV1> = seeds
        .0
        .get("cluster_frame")
        .into_iter()
        .flatten()
        .filter_map(|bytes| wire::decode(bytes).ok())
        .collect();
    let prefixed = |record: &[u8], out: &mut Vec<u8>| {
        out.extend((record.len().min(u16::MAX as usize) as u16).to_be_bytes());
        out.extend(record);
    };
    for level in [None, Some(ZSTD_LEVEL)] {
        let mut encoder = RecordEncoder::new(level);
        let mut input = Vec::new();
        for pair in frames.chunks(2) {
            pair.iter().for_each(|frame| {
                encoder.push(frame);
            });
            prefixed(&encoder.finish(), &mut input);
        }
        seeds.add("cluster_record", input);
    }
    if let [first, second, ..] = &frames[..] {
        let mut input = Vec::new();
        prefixed(&wire::encode(first), &mut input);
        let mut encoder = RecordEncoder::new(None);
        encoder.push(second);
        prefixed(&encoder.finish(), &mut input);
        seeds.add("cluster_record", input);
    }
}

/// Every `FrameV1` variant, carrying captured msgpack frames where frames travel.
fn cluster_frames(corpus: &Path, seeds: &mut Seeds) -> anyhow::Result<()> {
    let frames: Vec<ProtocolMessage> = captured(corpus, "realtime_msgpack")?
        .into_iter()
        .filter_map(|(_, bytes)| tern_protocol::decode(Format::Msgpack, &bytes).ok())
        .collect();
    let (app, channel) = ("fuzz".to_string(), "chat:room".to_string());
    let messages = frames
        .iter()
        .filter(|frame| frame.action == action::MESSAGE)
        .take(6);
    for (seq, frame) in (1..).zip(messages) {
        let event = EventV1 {
            app: app.clone(),
            channel: frame.channel.clone().unwrap_or_else(|| channel.clone()),
            origin: 0x8e01_4e04_875b_47ec,
            seq,
            publisher: frame.connection_id.clone(),
            frame: tern_protocol::encode(Format::Msgpack, frame).to_vec(),
            link_seq: seq + 10,
        };
        seeds.add("cluster_frame", wire::encode(&FrameV1::Event(event)));
    }
    if let Some(presence) = frames.iter().find(|frame| frame.presence.is_some()) {
        let frame = tern_protocol::encode(Format::Msgpack, presence).to_vec();
        let members = FrameV1::SyncMembers {
            app: app.clone(),
            channel: channel.clone(),
            frame,
        };
        seeds.add("cluster_frame", wire::encode(&members));
    }
    let payload = frames
        .iter()
        .find_map(|frame| frame.messages.as_ref()?.first().cloned())
        .map(|message| tern_protocol::encode_value(Format::Msgpack, &message).to_vec())
        .unwrap_or_default();
    let control = [
        FrameV1::Hello {
            node_id: "tern-eu-1".into(),
            incarnation: NOW_MS as u64,
            origin: 0x8e01_4e04_875b_47ec,
            epoch: 3,
            first: 17,
        },
        FrameV1::Repair {
            app: app.clone(),
            channel: channel.clone(),
            origin: 7,
            from: 4,
            to: 9,
        },
        FrameV1::Stored {
            incarnation: NOW_MS as u64,
            epoch: 3,
            upto: 42,
        },
        FrameV1::Heads {
            channels: vec![HeadV1 {
                app: app.clone(),
                channel: channel.clone(),
                origins: vec![(7, 12), (0x8e01_4e04_875b_47ec, 3)],
            }],
        },
        FrameV1::Skip {
            app: app.clone(),
            channel: channel.clone(),
            origin: 7,
            upto: 5,
        },
        FrameV1::Interest {
            channels: vec![(app.clone(), channel.clone()), (app.clone(), "news".into())],
            on: true,
        },
        FrameV1::Sync {
            app: app.clone(),
            channel: channel.clone(),
        },
        FrameV1::Synced {
            app: app.clone(),
            channel: channel.clone(),
            origins: vec![(7, 12)],
        },
        FrameV1::Backfill {
            app: app.clone(),
            channel: channel.clone(),
            presence: false,
            after: Some((NOW_MS, 7, 3, 0)),
        },
        FrameV1::BackfillItems {
            app,
            channel,
            presence: false,
            items: vec![ItemV1 {
                position: (NOW_MS, 7, 4, 0),
                payload,
            }],
            more: true,
        },
    ];
    for frame in &control {
        seeds.add("cluster_frame", wire::encode(frame));
    }
    Ok(())
}

/// Tern tokens (captured, and issued here) as tokens and as their claims; JWTs as
/// tokens, as `header\nclaims` and as claims.
fn tokens(corpus: &Path, seeds: &mut Seeds) -> anyhow::Result<()> {
    let capability = Capability::parse(KEY_CAPABILITY)?;
    let key = ApiKey::from_key_string(KEY, capability.clone())?;
    let ring = KeyRing::new(vec![key.clone()]);
    let narrow = Capability::parse(r#"{"chat:a":["publish"],"news":["subscribe"]}"#)?;
    let mut tokens: Vec<String> = captured(corpus, "tern_token")?
        .into_iter()
        .filter_map(|(_, bytes)| String::from_utf8(bytes).ok())
        .collect();
    for (client_id, capability, ttl_ms) in [
        (None, &capability, 3_600_000),
        (Some("carol"), &narrow, 60_000),
        (Some("*"), &capability, 1),
    ] {
        tokens.push(
            ring.issue_token(&key, client_id, capability, ttl_ms, NOW_MS)
                .token,
        );
    }
    for token in &tokens {
        seeds.add("tern_token", token.as_bytes());
        let claims = token
            .strip_prefix("tn1.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|payload| URL_SAFE_NO_PAD.decode(payload).ok());
        if let Some(claims) = claims {
            seeds.add("tern_token", claims);
        }
    }
    let now_s = NOW_MS / 1000;
    let claims = [
        json!({"iat": now_s, "exp": now_s + 3600, "x-ably-capability": KEY_CAPABILITY}),
        json!({"iat": now_s, "exp": now_s + 60, "x-ably-capability": r#"{"chat:*":["publish"]}"#, "x-ably-clientId": "dave"}),
        json!({"exp": now_s + 60, "nbf": now_s - 5, "x-ably-capability": {"news": ["subscribe"]}}),
        json!({"iat": now_s - 7200, "exp": now_s - 3600}),
        json!({"exp": (now_s + 60) as f64 + 0.5, "x-ably-clientId": null}),
    ];
    for claims in &claims {
        let token = sign_jwt(&key, claims);
        let mut parts = token.split('.');
        let header = parts
            .next()
            .and_then(|part| URL_SAFE_NO_PAD.decode(part).ok());
        let body = parts
            .next()
            .and_then(|part| URL_SAFE_NO_PAD.decode(part).ok());
        seeds.add("jwt", token.as_bytes());
        if let (Some(header), Some(body)) = (header, body) {
            seeds.add("jwt", [&header[..], b"\n", &body[..]].concat());
            seeds.add("jwt", body);
        }
    }
    Ok(())
}

/// Cursors with one and many origins, and history positions at the edges.
fn serials(seeds: &mut Seeds) {
    let mut cursor = Cursor::new();
    seeds.add("channel_serial", cursor.encode());
    for origin in [0x8e01_4e04_875b_47ec, 1, u64::MAX, 0xabc] {
        cursor.advance(OriginId(origin), origin % 1000 + 1);
        seeds.add("channel_serial", cursor.encode());
    }
    let positions = [
        Position::MIN,
        Position::MAX,
        Position {
            timestamp_ms: NOW_MS,
            origin: 0x8e01_4e04_875b_47ec,
            seq: 12,
            index: 3,
        },
        Position {
            timestamp_ms: -1,
            origin: 0,
            seq: 1,
            index: 0,
        },
    ];
    for position in positions {
        seeds.add("page_position", position.encode());
    }
}

/// Real gossip: two agents, the second joining through a relay that keeps what passes
/// (SYN, SYN-ACK, ACK with Tern's node state), unsealed to the chitchat envelope.
async fn gossip() -> anyhow::Result<Vec<Vec<u8>>> {
    let key = GossipKey::from_hex(GOSSIP_KEY_HEX)?;
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let first = start_member("tern-a", "eu-west", free_udp_port()?, vec![], &key).await?;
    let first_gossip = first.me().gossip;
    let second = start_member(
        "tern-b",
        "us-east",
        free_udp_port()?,
        vec![relay.local_addr()?.to_string()],
        &key,
    )
    .await?;
    let second_gossip = second.me().gossip;
    second.set_load(12).await;
    second.set_departed(&["old-node".to_string()]).await;
    let mut kept = Vec::new();
    let mut buffer = vec![0u8; 65_536];
    let deadline = tokio::time::Instant::now() + GOSSIP_CAPTURE;
    while kept.len() < GOSSIP_SEEDS_MAX {
        let received = tokio::time::timeout_at(deadline, relay.recv_from(&mut buffer)).await;
        let Ok(Ok((len, from))) = received else {
            break;
        };
        let datagram = &buffer[..len];
        let to = if from == second_gossip {
            first_gossip
        } else {
            second_gossip
        };
        relay.send_to(datagram, to).await?;
        // Only what opens under the key is a real message; keep its envelope bytes.
        if fuzz_decode_datagram(&key, tern_cluster_now_ms(), datagram).is_ok() {
            let tag_len = OVERHEAD_LEN - GOSSIP_HEADER_LEN;
            kept.push(datagram[GOSSIP_HEADER_LEN..len - tag_len].to_vec());
        }
    }
    first.shutdown().await;
    second.shutdown().await;
    Ok(kept)
}

async fn start_member(
    node_id: &str,
    region: &str,
    port: u16,
    seeds: Vec<String>,
    key: &GossipKey,
) -> anyhow::Result<Membership> {
    let gossip: SocketAddr = ([127, 0, 0, 1], port).into();
    let me = Member {
        node_id: node_id.into(),
        incarnation: NOW_MS as u64,
        region: region.into(),
        client_url: format!("http://127.0.0.1:{}", port + 1),
        quic: ([127, 0, 0, 1], port + 2).into(),
        gossip,
        tag: format!("{node_id}-tag"),
        origin: "8e014e04875b47ec".into(),
        load: 0,
        departed: vec![],
        webhook_marks: String::new(),
    };
    let mut config = MembershipConfig::new(me, gossip, seeds, key.clone());
    config.gossip_interval = Duration::from_millis(100);
    Ok(Membership::start(config).await?)
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn tern_cluster_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}
