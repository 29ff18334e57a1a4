//! The MQTT listener over real sockets on loopback, with a history store whose writes
//! can be made to fail: a QoS 1 PUBLISH gets its PUBACK only once it is stored; one
//! whose write the store lost gets no PUBACK and its connection closes, so the client
//! sends it again; every PUBACKed message is in history, once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use tern_auth::{ApiKey, Capability, KeyRing};
use tern_core::{CoreLimits, Hub, OriginId};
use tern_edge::{EdgeConfig, EdgeState, MqttConfig};
use tern_store::{
    AppendDone, ChannelRef, Direction, EventKind, HistoryPage, HistoryQuery, HistoryStore,
    StoreError, StoredItem,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(5);

/// A memory store whose appends are refused (a lost write, as a full disk makes them)
/// while `fail` is set.
struct FailingStore {
    inner: Arc<dyn HistoryStore>,
    fail: AtomicBool,
    lost: AtomicU64,
}

impl HistoryStore for FailingStore {
    fn append(
        &self,
        items: Vec<(ChannelRef, StoredItem)>,
        done: AppendDone,
    ) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) && !items.is_empty() {
            self.lost.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Io("disk full (injected)".into()));
        }
        self.inner.append(items, done)
    }

    fn query(&self, query: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        self.inner.query(query)
    }

    fn trim(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.inner.trim(now_ms)
    }

    fn flush(&self) {
        self.inner.flush()
    }

    fn lost_writes(&self) -> u64 {
        self.inner.lost_writes() + self.lost.load(Ordering::SeqCst)
    }

    fn after_committed(&self, since: u64, then: AppendDone) {
        if self.lost_writes() != since {
            then(Err(StoreError::Io("a write was lost (injected)".into())));
            return;
        }
        self.inner.after_committed(self.inner.lost_writes(), then)
    }

    fn failing(&self) -> Option<StoreError> {
        None
    }
}

struct Node {
    mqtt_port: u16,
    store: Arc<FailingStore>,
    _shutdown: watch::Sender<bool>,
}

async fn start() -> Node {
    let store = Arc::new(FailingStore {
        inner: tern_store::open(&tern_store::StoreConfig::default()).unwrap(),
        fail: AtomicBool::new(false),
        lost: AtomicU64::new(0),
    });
    let journal = Arc::new(tern_edge::history::StoreJournal {
        store: store.clone(),
    });
    let hub = Arc::new(Hub::with_journal(
        OriginId(1),
        CoreLimits::default(),
        Some(journal),
    ));
    let keys = KeyRing::new(vec![ApiKey {
        app_id: "app".into(),
        key_id: "root".into(),
        secret: "rootsecret".into(),
        capability: Capability::all(),
    }]);
    let (shutdown, rx) = watch::channel(false);
    let state =
        Arc::new(EdgeState::new(EdgeConfig::default(), hub, keys, rx).with_store(store.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mqtt_port = listener.local_addr().unwrap().port();
    tokio::spawn(tern_edge::mqtt::serve(
        listener,
        state,
        MqttConfig::default(),
    ));
    Node {
        mqtt_port,
        store,
        _shutdown: shutdown,
    }
}

struct Client {
    stream: TcpStream,
    inbound: BytesMut,
}

impl Client {
    async fn connect(node: &Node) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", node.mqtt_port))
            .await
            .unwrap();
        let mut client = Client {
            stream,
            inbound: BytesMut::new(),
        };
        let mut connect = Connect::new("faulty");
        connect.login = Some(Login::new("app.root", "rootsecret"));
        client.send(Packet::Connect(connect)).await;
        match client.next().await {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        client
    }

    async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    async fn publish(&mut self, packet_id: u16, payload: &str) {
        let mut publish = Publish::new("faulty", QoS::AtLeastOnce, payload.as_bytes().to_vec());
        publish.pkid = packet_id;
        self.send(Packet::Publish(publish)).await;
    }

    /// The next packet from the server; `None` once it closed the connection.
    async fn next(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, async {
            loop {
                match Packet::read(&mut self.inbound, 1 << 20) {
                    Ok(packet) => return Some(packet),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(err) => panic!("bad packet from the server: {err}"),
                }
                match self.stream.read_buf(&mut self.inbound).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("the server answers or closes in time")
    }
}

/// The payloads of the test channel's stored messages, oldest first.
fn stored(store: &dyn HistoryStore) -> Vec<String> {
    store.flush();
    let page = store
        .query(&HistoryQuery {
            channel: ChannelRef {
                app: "app".into(),
                channel: "faulty".into(),
                kind: EventKind::Message,
            },
            start_ms: None,
            end_ms: None,
            limit: 100,
            direction: Direction::Forwards,
            after: None,
            until: None,
        })
        .unwrap();
    let mut payloads: Vec<String> = page
        .items
        .iter()
        .map(|item| {
            let message: tern_protocol::Message = rmp_serde::from_slice(&item.payload).unwrap();
            match message.data {
                Some(tern_protocol::Data::Binary(bytes)) => {
                    String::from_utf8(bytes.to_vec()).unwrap()
                }
                other => panic!("binary data expected, got {other:?}"),
            }
        })
        .collect();
    payloads.sort();
    payloads
}

/// A QoS 1 PUBLISH is PUBACKed once stored; while the store loses writes a PUBLISH gets
/// no PUBACK and the connection closes; sent again once the store works, it is PUBACKed.
/// Every PUBACKed message is stored exactly once.
#[tokio::test]
async fn puback_only_for_stored_publishes() {
    let node = start().await;
    let mut client = Client::connect(&node).await;
    client.publish(1, "first").await;
    assert!(matches!(client.next().await, Some(Packet::PubAck(ack)) if ack.pkid == 1));

    node.store.fail.store(true, Ordering::SeqCst);
    client.publish(2, "lost").await;
    assert_eq!(client.next().await, None, "closed without a PUBACK");

    node.store.fail.store(false, Ordering::SeqCst);
    let mut client = Client::connect(&node).await;
    client.publish(2, "lost").await;
    assert!(matches!(client.next().await, Some(Packet::PubAck(ack)) if ack.pkid == 2));
    assert_eq!(stored(node.store.as_ref()), ["first", "lost"]);
}
