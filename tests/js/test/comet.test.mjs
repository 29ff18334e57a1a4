// The comet transport (ably-js's HTTP fallback when WebSockets are unavailable) against
// tern: ably-js in Node with `transports: ['comet']` (its Node name for the transport
// browsers call `xhr_polling`; Node has no `xhr_polling`) connects, attaches,
// publishes and subscribes with WebSocket clients on the other side, uses presence and
// history, resumes through cut transports and recovers; then raw HTTP rows for what
// the transport must bound or refuse.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { ROOT_KEY, connected, once, options, ternSuite, testConfig, waitUntil } from '../lib/tern.mjs';
import { startProxy } from '../lib/proxy.mjs';

const POLL_TIMEOUT_MS = 2000;
const GRACE_MS = 1000;
const suite = ternSuite(testConfig({
  connection: `connection_state_ttl_ms = 20000\npresence_leave_grace_ms = ${GRACE_MS}\ncomet_poll_timeout_ms = ${POLL_TIMEOUT_MS}`,
}));
/// An ably-js client on the comet transport only.
const comet = (extra = {}, port) => suite.realtime({ transports: ['comet'], ...extra }, port);
/// An ably-js client on WebSocket only.
const websocket = (extra = {}, port) => suite.realtime({ transports: ['web_socket'], ...extra }, port);

const transportOf = (client) => client.connection.connectionManager.activeProtocol?.getTransport().shortName;

test('connects over comet: CONNECTED with an id, a key and the server limits', async () => {
  /// Proves GET /comet/connect authenticates like the WebSocket and answers with CONNECTED.
  const client = await connected(comet({ clientId: 'comet-user' }));
  assert.equal(transportOf(client), 'comet');
  assert.ok(client.connection.id && !client.connection.id.includes(':'));
  assert.ok(client.connection.key);
  assert.equal(client.auth.clientId, 'comet-user');
  const details = client.connection.connectionManager.connectionDetails;
  assert.equal(details.maxIdleInterval, 15000);
  assert.ok(details.maxMessageSize > 0);
});

test('a bad key over comet fails the connection with 40101, as over WebSocket', async () => {
  /// Proves connect errors reach ably-js as an ERROR frame (failed, with the code).
  const client = comet({ key: 'test.root:wrongsecret' });
  const change = await once(client.connection, 'failed');
  assert.equal(change.reason.code, 40101);
});

test('comet and WebSocket clients exchange 30 messages each way, in order, once', async () => {
  /// Proves send (publish + ACK) and receive (fan-out) over comet against WebSocket peers.
  const c = await connected(comet({ clientId: 'c' }));
  const w = await connected(websocket({ clientId: 'w' }));
  const onComet = [];
  const onWs = [];
  await c.channels.get('cross').subscribe((m) => onComet.push(m));
  await w.channels.get('cross').subscribe((m) => onWs.push(m));
  const fromComet = [];
  const fromWs = [];
  for (let i = 0; i < 30; i++) {
    fromComet.push(`c${i}`);
    fromWs.push(`w${i}`);
    const [rc, rw] = await Promise.all([
      c.channels.get('cross').publish('n', `c${i}`),
      w.channels.get('cross').publish('n', i % 3 === 0 ? Buffer.from(`w${i}`) : `w${i}`),
    ]);
    assert.equal(rc.serials.length, 1);
    assert.equal(rw.serials.length, 1);
  }
  await waitUntil(() => onComet.length === 60 && onWs.length === 60, 15000, '60 messages on each side');
  await new Promise((r) => setTimeout(r, 300));
  const text = (m) => (typeof m.data === 'string' ? m.data : Buffer.from(m.data).toString());
  for (const seen of [onComet, onWs]) {
    assert.equal(seen.length, 60);
    assert.deepEqual(seen.filter((m) => m.clientId === 'c').map(text), fromComet);
    assert.deepEqual(seen.filter((m) => m.clientId === 'w').map(text), fromWs);
    assert.equal(new Set(seen.map((m) => m.id)).size, 60);
  }
  assert.ok(onComet.filter((m) => m.clientId === 'w').every((m, i) => i % 3 !== 0 || Buffer.isBuffer(m.data) || m.data instanceof ArrayBuffer || ArrayBuffer.isView(m.data)), 'binary data stays binary over comet (base64 in JSON)');
});

test('presence over comet: enter seen by a WebSocket client, members listed, leave on close', async () => {
  /// Proves PRESENCE frames and SYNC over comet, and that closing a comet connection leaves.
  const w = await connected(websocket({ clientId: 'watcher' }));
  const watched = w.channels.get('comet-presence');
  const events = [];
  await watched.presence.subscribe((m) => events.push(`${m.action}:${m.clientId}`));
  await watched.presence.enter('here');
  const c = await connected(comet({ clientId: 'poller' }));
  const channel = c.channels.get('comet-presence');
  await channel.presence.enter({ via: 'comet' });
  await waitUntil(() => events.includes('enter:poller'), 10000, 'enter seen over WebSocket');
  const members = await channel.presence.get();
  assert.deepEqual(members.map((m) => m.clientId).sort(), ['poller', 'watcher']);
  c.close();
  await once(c.connection, 'closed');
  await waitUntil(() => events.includes('leave:poller'), 5000, 'leave at once on close');
});

test('history and untilAttach from a comet-attached channel', async () => {
  /// Proves ATTACHED's attachSerial over comet serves history up to the attach point.
  const rest = new Ably.Rest(options(suite.port));
  await rest.channels.get('comet-history').publish('n', 'before-1');
  await rest.channels.get('comet-history').publish('n', 'before-2');
  const c = await connected(comet());
  const channel = c.channels.get('comet-history');
  await channel.attach();
  await channel.publish('n', 'after');
  const page = await channel.history({ untilAttach: true });
  assert.deepEqual(page.items.map((m) => m.data), ['before-2', 'before-1']);
  const all = await channel.history();
  assert.deepEqual(all.items.map((m) => m.data), ['after', 'before-2', 'before-1']);
});

test('a cut comet transport (the poll fails) resumes: every message exactly once, resumed true', async () => {
  /// Proves resume=<key> over comet: same connection id, RESUMED, the backlog in order.
  const proxy = await startProxy(suite.port);
  try {
    const subscriber = await connected(comet({ disconnectedRetryTimeout: 200 }, proxy.port));
    const publisher = await connected(websocket());
    const channel = subscriber.channels.get('comet-resume');
    const got = [];
    const changes = [];
    channel.on((change) => changes.push(change));
    await channel.subscribe((m) => got.push(m.data));
    const idBefore = subscriber.connection.id;
    const keyBefore = subscriber.connection.key;
    const sent = [];
    for (let i = 0; i < 60; i++) {
      sent.push(`m${i}`);
      await publisher.channels.get('comet-resume').publish('n', `m${i}`);
      if (i === 20 || i === 40) proxy.dropAll();
    }
    await waitUntil(() => got.length >= 60, 20000, 'all 60 messages');
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(got, sent);
    assert.equal(subscriber.connection.id, idBefore);
    assert.notEqual(subscriber.connection.key, keyBefore, 'a resume issues a new key');
    assert.equal(transportOf(subscriber), 'comet');
    const reattached = changes.filter((c) => c.current === 'attached').at(-1);
    assert.equal(reattached.resumed, true);
  } finally {
    proxy.close();
  }
});

test('a comet publisher whose transport is cut: every ACKed message arrives once, in order', async () => {
  /// Proves the ACK promise over comet: cuts while sends are in flight lose and duplicate nothing.
  const proxy = await startProxy(suite.port);
  try {
    const publisher = await connected(comet({ disconnectedRetryTimeout: 200 }, proxy.port));
    const subscriber = await connected(websocket());
    const got = [];
    await subscriber.channels.get('comet-acks').subscribe((m) => got.push(m.data));
    const channel = publisher.channels.get('comet-acks');
    await channel.attach();
    const idBefore = publisher.connection.id;
    let cuts = 0;
    publisher.connection.on('disconnected', () => { cuts += 1; });
    const acked = [];
    const pending = [];
    for (let i = 0; i < 40; i++) {
      pending.push(channel.publish('n', `p${i}`).then(() => acked.push(`p${i}`)));
      if (i % 10 === 5) {
        await new Promise((r) => setTimeout(r, 30));
        proxy.dropAll();
      }
    }
    await Promise.all(pending);
    assert.equal(acked.length, 40);
    assert.ok(cuts >= 2, `the transport was cut while sending (${cuts} disconnections)`);
    assert.equal(publisher.connection.id, idBefore, 'resumed, not a new connection');
    await waitUntil(() => got.length >= 40, 20000, 'all 40 ACKed messages');
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(got, Array.from({ length: 40 }, (_, i) => `p${i}`));
  } finally {
    proxy.close();
  }
});

test('recover over comet with createRecoveryKey() continues the connection and channel', async () => {
  /// Proves recover=<key> on /comet/connect and re-attach from the recovered channelSerial.
  const first = await connected(comet());
  const channel = first.channels.get('comet-recover');
  await channel.attach();
  const recoveryKey = first.connection.createRecoveryKey();
  const idBefore = first.connection.id;
  first.connection.connectionManager.disconnectAllTransports();
  await once(first.connection, 'disconnected');
  first.close();
  const rest = new Ably.Rest(options(suite.port));
  await rest.channels.get('comet-recover').publish('n', 'missed-1');
  await rest.channels.get('comet-recover').publish('n', 'missed-2');
  const second = await connected(comet({ recover: recoveryKey }));
  assert.equal(second.connection.id, idBefore);
  const got = [];
  await second.channels.get('comet-recover').subscribe((m) => got.push(m.data));
  await waitUntil(() => got.length === 2, 10000, 'missed messages');
  assert.deepEqual(got, ['missed-1', 'missed-2']);
});

test('a connection opened over WebSocket resumes over comet (one session, two transports)', async () => {
  /// Proves the comet transport continues a WebSocket connection's state (and channels).
  const first = await connected(websocket());
  const channel = first.channels.get('ws-to-comet');
  await channel.attach();
  const recoveryKey = first.connection.createRecoveryKey();
  const idBefore = first.connection.id;
  first.connection.connectionManager.disconnectAllTransports();
  await once(first.connection, 'disconnected');
  first.close();
  await new Ably.Rest(options(suite.port)).channels.get('ws-to-comet').publish('n', 'while-away');
  const second = await connected(comet({ recover: recoveryKey }));
  assert.equal(second.connection.id, idBefore);
  const got = [];
  await second.channels.get('ws-to-comet').subscribe((m) => got.push(m.data));
  await waitUntil(() => got.length === 1, 10000, 'the missed message');
  assert.deepEqual(got, ['while-away']);
});

// Raw HTTP: what ably-js never sends, and what the server must still bound.

const base = () => `http://127.0.0.1:${suite.port}/comet`;

async function rawConnect(query = '') {
  const res = await fetch(`${base()}/connect?key=${encodeURIComponent(ROOT_KEY)}&format=json&stream=false&v=3${query}`, {
    signal: AbortSignal.timeout(10000),
  });
  assert.equal(res.status, 200);
  const frames = await res.json();
  const connected = frames.find((f) => f.action === 4);
  assert.ok(connected, `CONNECTED in ${JSON.stringify(frames)}`);
  return connected.connectionDetails.connectionKey;
}

async function rawSend(key, frames, init = {}) {
  return fetch(`${base()}/${key}/send`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: typeof frames === 'string' ? frames : JSON.stringify(frames),
    signal: AbortSignal.timeout(10000),
    ...init,
  });
}

async function rawRecv(key) {
  const res = await fetch(`${base()}/${key}/recv?stream=false`, { signal: AbortSignal.timeout(20000) });
  return { status: res.status, frames: await res.json() };
}

/// Receives until a frame with `action` arrives (heartbeats and others skipped).
async function recvUntil(key, action) {
  for (let i = 0; i < 10; i++) {
    const { frames } = await rawRecv(key);
    const found = frames.find((f) => f.action === action);
    if (found) return found;
  }
  throw new Error(`no frame with action ${action}`);
}

test('raw: a long-poll answers with the frames the send asked for; a newer poll supersedes an older one', async () => {
  /// Proves send → session → recv, and one receive at a time: the older one answers [] at once.
  const key = await rawConnect();
  const older = rawRecv(key);
  await new Promise((r) => setTimeout(r, 200));
  const newer = rawRecv(key);
  const started = Date.now();
  const first = await older;
  assert.equal(first.status, 200);
  assert.deepEqual(first.frames, []);
  assert.ok(Date.now() - started < 2000, 'the older poll answered at once');
  const sent = await rawSend(key, [{ action: 0, id: 'ping-1' }, { action: 0, id: 'ping-2' }]);
  assert.equal(sent.status, 204);
  const second = await newer;
  assert.equal(second.status, 200);
  assert.deepEqual(second.frames.filter((f) => f.action === 0).map((f) => f.id), ['ping-1', 'ping-2']);
});

test('raw: a send body over max_frame_size is 413/40009 and fails the connection', async () => {
  /// Proves request bodies are bounded with the WebSocket's limit and code.
  const key = await rawConnect();
  const res = await rawSend(key, `[{"action":15,"channel":"x","messages":[{"data":"${'x'.repeat(600_000)}"}]}]`);
  assert.equal(res.status, 413);
  assert.equal((await res.json()).error.code, 40009);
  const error = await recvUntil(key, 9);
  assert.equal(error.error.code, 40009);
  const after = await rawRecv(key);
  assert.equal(after.status, 404);
  assert.equal(after.frames[0].action, 6);
});

test('raw: a malformed send body is 400/40000 and fails the connection', async () => {
  /// Proves bad input gets Ably codes, never a panic, and ends only that connection.
  const key = await rawConnect();
  for (const body of ['{"action":0}', '[{"action":"zero"}]']) {
    const k = body === '{"action":0}' ? key : await rawConnect();
    const res = await rawSend(k, body);
    assert.equal(res.status, 400, body);
    assert.equal((await res.json()).error.code, 40000, body);
    const error = await recvUntil(k, 9);
    assert.equal(error.error.code, 40000);
  }
  const still = await connected(comet());
  await still.channels.get('still-fine').attach();
});

test('raw: an unknown connection key is 404 with DISCONNECTED, on recv, send and close', async () => {
  /// Proves requests for no connection get a frame ably-js acts on (resume), not a bare error.
  const key = 'nope-AAAAAAAAAAAA!BBBBBBBBBBBBBBBBBBBB';
  const recv = await rawRecv(key);
  assert.equal(recv.status, 404);
  assert.equal(recv.frames[0].action, 6);
  assert.equal(recv.frames[0].error.code, 80003);
  assert.equal((await rawSend(key, [{ action: 0 }])).status, 404);
  assert.equal((await fetch(`${base()}/${key}/close`)).status, 404);
  const badFormat = await fetch(`${base()}/connect?key=${encodeURIComponent(ROOT_KEY)}&format=xml`);
  assert.equal(badFormat.status, 400);
  assert.equal((await badFormat.json())[0].error.code, 40000);
});

test('raw: a client that stops polling is a dropped transport: its member leaves after the grace period', async () => {
  /// Proves the poll timeout: no recv for comet_poll_timeout_ms → dropped → presence leave.
  const w = await connected(websocket({ clientId: 'observer' }));
  const events = [];
  await w.channels.get('stops-polling').presence.subscribe((m) => events.push({ at: Date.now(), what: `${m.action}:${m.clientId}` }));
  const key = await rawConnect('&clientId=quiet');
  await rawSend(key, [
    { action: 10, channel: 'stops-polling' },
    { action: 14, channel: 'stops-polling', msgSerial: 0, presence: [{ action: 2, clientId: 'quiet', data: 'x' }] },
  ]);
  const ack = await recvUntil(key, 1);
  assert.equal(ack.msgSerial, 0);
  await waitUntil(() => events.some((e) => e.what === 'enter:quiet'), 5000, 'enter');
  const lastPoll = Date.now();
  await waitUntil(() => events.some((e) => e.what === 'leave:quiet'), 15000, 'leave after the client stopped polling');
  const leftAt = events.find((e) => e.what === 'leave:quiet').at;
  assert.ok(leftAt - lastPoll >= POLL_TIMEOUT_MS + GRACE_MS - 200, `left ${leftAt - lastPoll} ms after the last poll`);
  const after = await rawRecv(key);
  assert.equal(after.status, 404, 'the transport is gone');
});

test('raw: a dropped comet transport resumes over a new one with the same connection id', async () => {
  /// Proves /disconnect parks the connection and resume= on /comet/connect takes it back.
  const res = await fetch(`${base()}/connect?key=${encodeURIComponent(ROOT_KEY)}&stream=false`);
  const connectedFrame = (await res.json())[0];
  const key = connectedFrame.connectionDetails.connectionKey;
  assert.equal((await fetch(`${base()}/${key}/disconnect`)).status, 204);
  await waitUntil(async () => (await rawRecv(key)).status === 404, 5000, 'transport ended');
  const again = await fetch(`${base()}/connect?key=${encodeURIComponent(ROOT_KEY)}&stream=false&resume=${encodeURIComponent(key)}`);
  const resumed = (await again.json()).find((f) => f.action === 4);
  assert.equal(resumed.connectionId, connectedFrame.connectionId);
  assert.equal(resumed.error, undefined);
});
