// Synchronous functions (docs/functions.md): before-publish functions and the
// $connect / $disconnect connection hooks, against a real function server started here
// that verifies X-Ably-Signature as Ably's docs tell receivers to, and real ably-js.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import WebSocket from 'ws';
import mqtt from 'mqtt';
import { createServer as createNetServer } from 'node:net';
import { connected, once, options, startTern, testConfig, waitUntil } from '../lib/tern.mjs';
import { startHookFunction } from '../lib/hook-function.mjs';

const KEY_NAME = 'test.root';
const KEY_SECRET = 'rootsecret';

function withFunctions(text, connection = '') {
  // Tables after the config's `[[apps.keys]]` belong to its one app.
  return testConfig({ connection }) + text;
}

/// The moderation logic of the before-publish tests: 'bad…' is rejected with a reason,
/// 'shout' comes back as 'SHOUT', 'slow' is answered after 400 ms, the rest accepted.
function moderate(path, body) {
  const data = body.messages?.[0]?.data;
  if (typeof data === 'string' && data.startsWith('bad')) {
    return { body: { action: 'reject', rejectionReason: 'no bad words here' } };
  }
  if (data === 'shout') {
    return { body: { action: 'accept', messages: [{ name: 'loud', data: 'SHOUT' }] } };
  }
  if (data === 'slow') return { body: { action: 'accept' }, delayMs: 400 };
  return { body: { action: 'accept' } };
}

test('before-publish: a rejection is a NACK with 42213 and the reason; accept and modify publish; order holds', async () => {
  // Proves: a rejected realtime publish rejects ably-js's channel.publish with the
  // function's reason and Ably's code; a modified message reaches subscribers modified;
  // publishes sent back to back arrive (and are ACKed) in order although the first
  // waits longest for its function; a channel the filter excludes calls nothing; REST
  // and batch publishes go through the same function; every request is signed.
  const fn = await startHookFunction({ keyName: KEY_NAME, keySecret: KEY_SECRET, decide: moderate });
  const tern = await startTern(withFunctions(`
[[apps.before_publish]]
id = "moderate"
channel_filter = "^chat:"
url = "http://127.0.0.1:${fn.port}/moderate"
sign_with_key = "root"
timeout_ms = 3000
`));
  const publisher = new Ably.Realtime(options(tern.port, { clientId: 'alice' }));
  const subscriber = new Ably.Realtime(options(tern.port));
  const rest = new Ably.Rest(options(tern.port));
  try {
    await connected(publisher);
    await connected(subscriber);
    const received = [];
    const sub = subscriber.channels.get('chat:room');
    await sub.subscribe((m) => received.push(m));
    const channel = publisher.channels.get('chat:room');

    await channel.publish('greeting', 'hello');
    await assert.rejects(channel.publish('insult', 'bad thing'), (err) => {
      assert.equal(err.code, 42213);
      assert.equal(err.statusCode, 422);
      assert.match(err.message, /no bad words here/);
      return true;
    });
    await channel.publish('quiet', 'shout');
    // Back to back: 'slow' waits 400 ms for its function, the others none; all are
    // applied and ACKed in the order sent.
    const acked = [];
    await Promise.all(['slow', 'after-1', 'after-2'].map((data, i) =>
      channel.publish(`seq${i}`, data).then(() => acked.push(data))));
    assert.deepEqual(acked, ['slow', 'after-1', 'after-2'], 'ACKs in msgSerial order');
    await publisher.channels.get('other').publish('x', 'bad but unfiltered');

    await waitUntil(() => received.length >= 5, 10000, 'messages');
    assert.deepEqual(received.map((m) => m.data), ['hello', 'SHOUT', 'slow', 'after-1', 'after-2']);
    const loud = received[1];
    assert.equal(loud.name, 'loud', 'name changed by the function');
    assert.equal(loud.clientId, 'alice', 'identity kept');
    assert.equal(loud.connectionId, publisher.connection.id);

    // The function saw each realtime message once, signed, Ably-shaped.
    assert.equal(fn.badSignatures, 0);
    assert.equal(fn.unsigned, 0);
    const realtimeCalls = fn.requests.filter((r) => r.json.connectionId === publisher.connection.id);
    assert.equal(realtimeCalls.length, 6, 'hello, bad, shout, slow, after-1, after-2');
    const first = realtimeCalls[0].json;
    assert.equal(first.source, 'channel.message');
    assert.equal(first.appId, 'test');
    assert.equal(first.channel, 'chat:room');
    assert.equal(first.ruleId, 'moderate');
    assert.equal(first.site, 'tern');
    assert.equal(first.messages[0].clientId, 'alice');
    assert.equal(first.messages[0].name, 'greeting');
    assert.ok(!fn.requests.some((r) => r.json.channel === 'other'), 'filtered out');

    // REST: the same function, the same error.
    const restChannel = rest.channels.get('chat:rest');
    await assert.rejects(restChannel.publish('n', 'bad rest'), (err) => {
      assert.equal(err.code, 42213);
      assert.equal(err.statusCode, 422);
      assert.match(err.message, /no bad words here/);
      return true;
    });
    await restChannel.publish('n', 'shout');
    const history = await restChannel.history();
    assert.deepEqual(history.items.map((m) => m.data), ['SHOUT']);

    // An edit is a publish too: it cannot carry what the function refuses.
    const { serials: [serial] } = await restChannel.publish('n', 'fine');
    await assert.rejects(restChannel.updateMessage({ serial, data: 'bad edit' }), (err) => {
      assert.equal(err.code, 42213);
      return true;
    });
    await restChannel.updateMessage({ serial, data: 'shout' });
    const edited = await restChannel.getMessage(serial);
    assert.equal(edited.data, 'SHOUT');
    const editCall = fn.requests.at(-1).json.messages[0];
    assert.equal(editCall.serial, serial);

    // Batch publish: each channel on its own; the rejected one carries the error.
    const response = await fetch(`http://127.0.0.1:${tern.port}/messages`, {
      method: 'POST',
      headers: {
        authorization: `Basic ${Buffer.from(`${KEY_NAME}:${KEY_SECRET}`).toString('base64')}`,
        'content-type': 'application/json',
      },
      body: JSON.stringify([
        { channels: ['chat:b1'], messages: [{ data: 'fine' }] },
        { channels: ['chat:b2'], messages: [{ data: 'bad batch' }] },
      ]),
    });
    const batch = JSON.stringify(await response.json());
    assert.match(batch, /42213/, batch);
    const b1 = await rest.channels.get('chat:b1').history();
    const b2 = await rest.channels.get('chat:b2').history();
    assert.deepEqual(b1.items.map((m) => m.data), ['fine']);
    assert.equal(b2.items.length, 0, 'rejected: nothing published');
  } finally {
    publisher.close();
    subscriber.close();
    await tern.stop();
    await fn.stop();
  }
});

test('before-publish: a function that is down or too slow fails open or closed as configured', async () => {
  // Proves the failure policy: with the function stopped, "accept" publishes and
  // "reject" NACKs with 50000; with a function slower than timeout_ms, "reject" NACKs
  // with 50003 and "accept" publishes; the connection stays usable throughout.
  const fn = await startHookFunction({
    keyName: KEY_NAME,
    keySecret: KEY_SECRET,
    decide: () => ({ body: { action: 'reject', rejectionReason: 'never' }, delayMs: 1500 }),
  });
  const tern = await startTern(withFunctions(`
[[apps.before_publish]]
id = "open"
channel_filter = "^open:"
url = "http://127.0.0.1:${fn.port}/fn"
timeout_ms = 300
on_failure = "accept"

[[apps.before_publish]]
id = "closed"
channel_filter = "^closed:"
url = "http://127.0.0.1:${fn.port}/fn"
timeout_ms = 300
on_failure = "reject"
`));
  const client = new Ably.Realtime(options(tern.port));
  const rest = new Ably.Rest(options(tern.port));
  try {
    await connected(client);
    // Too slow.
    await client.channels.get('open:a').publish('n', 'through');
    await assert.rejects(client.channels.get('closed:a').publish('n', 'held'), (err) => {
      assert.equal(err.code, 50003);
      assert.match(err.message, /did not answer within 300 ms/);
      return true;
    });
    // Down.
    await fn.stop();
    await client.channels.get('open:b').publish('n', 'through');
    await assert.rejects(client.channels.get('closed:b').publish('n', 'held'), (err) => {
      assert.equal(err.code, 50000);
      assert.match(err.message, /function 'closed' failed/);
      return true;
    });
    await assert.rejects(rest.channels.get('closed:c').publish('n', 'held'), (err) => {
      assert.equal(err.code, 50000);
      return true;
    });
    await rest.channels.get('open:c').publish('n', 'through');
    for (const name of ['open:a', 'open:b', 'open:c']) {
      const page = await rest.channels.get(name).history();
      assert.deepEqual(page.items.map((m) => m.data), ['through'], name);
    }
    for (const name of ['closed:a', 'closed:b', 'closed:c']) {
      const page = await rest.channels.get(name).history();
      assert.equal(page.items.length, 0, name);
    }
    assert.equal(client.connection.state, 'connected');
  } finally {
    client.close();
    await tern.stop();
    await fn.stop().catch(() => {});
  }
});

test('$connect: a refusal fails the ably-js connection with the code; an attached clientId and capability hold', async () => {
  // Proves: the function is told who connects (key, clientId, transport, address,
  // connection id); a refusal reaches connection.once('failed') as 40300 with the
  // function's reason; a clientId it attaches is the connection's (connection.clientId
  // via auth.clientId, and message.clientId at a subscriber); a capability it gives
  // narrows what the connection may do (40160).
  const fn = await startHookFunction({
    keyName: KEY_NAME,
    keySecret: KEY_SECRET,
    decide: (path, body) => {
      if (body.clientId === 'mallory') return { body: { action: 'reject', rejectionReason: 'banned user' } };
      if (body.clientId === 'reader') return { body: { action: 'accept', capability: { 'chat:*': ['subscribe'] } } };
      if (!body.clientId) return { body: { action: 'accept', clientId: 'assigned-by-function' } };
      return { body: { action: 'accept' } };
    },
  });
  const tern = await startTern(withFunctions(`
[apps.on_connect]
id = "gate"
url = "http://127.0.0.1:${fn.port}/connect"
sign_with_key = "root"
`));
  const clients = [];
  const client = (extra) => {
    const c = new Ably.Realtime(options(tern.port, extra));
    clients.push(c);
    return c;
  };
  try {
    const refused = client({ clientId: 'mallory' });
    const failure = await once(refused.connection, 'failed');
    assert.equal(failure.reason.code, 40300);
    assert.match(failure.reason.message, /banned user/);
    assert.equal(refused.connection.errorReason.code, 40300);

    const anonymous = client({});
    await connected(anonymous);
    assert.equal(anonymous.auth.clientId, 'assigned-by-function');
    const watcher = client({ clientId: 'watcher' });
    await connected(watcher);
    const seen = [];
    await watcher.channels.get('chat:x').subscribe((m) => seen.push(m));
    await anonymous.channels.get('chat:x').publish('n', 'hi');
    await waitUntil(() => seen.length === 1, 5000, 'the message');
    assert.equal(seen[0].clientId, 'assigned-by-function');

    const reader = client({ clientId: 'reader' });
    await connected(reader);
    await assert.rejects(reader.channels.get('chat:x').publish('n', 'nope'), (err) => {
      assert.equal(err.code, 40160);
      return true;
    });

    assert.equal(fn.badSignatures, 0);
    assert.equal(fn.unsigned, 0);
    const call = fn.requests.find((r) => r.json.clientId === 'watcher').json;
    assert.equal(call.source, 'connection.connect');
    assert.equal(call.appId, 'test');
    assert.equal(call.keyName, KEY_NAME);
    assert.equal(call.transport, 'web_socket');
    assert.match(call.remoteAddress, /^127\.0\.0\.1:\d+$/);
    assert.equal(call.connectionId, watcher.connection.id);
  } finally {
    for (const c of clients) c.close();
    await tern.stop();
    await fn.stop();
  }
});

test('$disconnect: one connection.disconnected per connection, on close and after an abrupt drop, none for a resume', async () => {
  // Proves: a clean close sends one event (reason "closed"); a transport cut without a
  // resume sends one (reason "expired") once connectionStateTtl has passed; a connection
  // that dropped and resumed sends nothing until it closes, then one. Events are signed
  // webhooks with a stable id (serial), each received once.
  const fn = await startHookFunction({ keyName: KEY_NAME, keySecret: KEY_SECRET, decide: () => ({}) });
  const tern = await startTern(withFunctions(`
[[apps.rules]]
id = "conns"
events = ["connection.disconnected"]
url = "http://127.0.0.1:${fn.port}/hook"
batch_window_ms = 20
sign_with_key = "root"
`, 'connection_state_ttl_ms = 1500'));
  const events = () => fn.requests.filter((r) => r.path === '/hook').flatMap((r) => r.json.items);
  const eventsOf = (id) => events().filter((e) => e.data.connectionId === id);
  try {
    // Clean close.
    const closing = new Ably.Realtime(options(tern.port, { clientId: 'closer' }));
    await connected(closing);
    const closingId = closing.connection.id;
    closing.close();
    await once(closing.connection, 'closed');
    await waitUntil(() => eventsOf(closingId).length >= 1, 5000, 'the close event');

    // Abrupt drop: a raw WebSocket whose socket is destroyed, never resumed.
    const ws = new WebSocket(`ws://127.0.0.1:${tern.port}/?key=${KEY_NAME}:${KEY_SECRET}&format=json&v=2`);
    const droppedId = await new Promise((resolve, reject) => {
      ws.on('message', (data) => {
        const frame = JSON.parse(data.toString());
        if (frame.action === 4) resolve(frame.connectionId);
      });
      ws.on('error', reject);
    });
    const droppedAt = Date.now();
    ws._socket.destroy();

    // A drop that resumes: the same connection goes on, so no event yet.
    const resuming = new Ably.Realtime(options(tern.port, { clientId: 'resumer' }));
    await connected(resuming);
    const resumingId = resuming.connection.id;
    resuming.connection.connectionManager.disconnectAllTransports();
    await once(resuming.connection, 'connected');
    assert.equal(resuming.connection.id, resumingId, 'resumed');

    await waitUntil(() => eventsOf(droppedId).length >= 1, 8000, 'the expiry event');
    assert.ok(Date.now() - droppedAt >= 1400, 'not before connectionStateTtl');
    // Past the resumed connection's old TTL as well: it must not have expired.
    await new Promise((r) => setTimeout(r, 2500));
    assert.equal(eventsOf(resumingId).length, 0, 'a resumed connection did not end');
    resuming.close();
    await once(resuming.connection, 'closed');
    await waitUntil(() => eventsOf(resumingId).length >= 1, 5000, 'the resumed close event');
    await new Promise((r) => setTimeout(r, 500));

    assert.equal(fn.badSignatures, 0);
    assert.equal(fn.unsigned, 0);
    const [closed] = eventsOf(closingId);
    assert.equal(eventsOf(closingId).length, 1);
    assert.equal(closed.source, 'connection.disconnected');
    assert.equal(closed.name, 'connection.disconnected');
    assert.equal(closed.webhookId, 'conns');
    assert.equal(closed.serial, `${closingId}:disconnected`);
    assert.equal(closed.data.reason, 'closed');
    assert.equal(closed.data.clientId, 'closer');
    assert.equal(closed.data.appId, 'test');
    assert.equal(closed.data.transport, 'web_socket');
    assert.equal(closed.data.site, 'tern');
    assert.ok(closed.data.connectedAt <= closed.data.disconnectedAt);
    const [expired] = eventsOf(droppedId);
    assert.equal(eventsOf(droppedId).length, 1);
    assert.equal(expired.data.reason, 'expired');
    assert.equal(expired.data.clientId, null);
    assert.equal(eventsOf(resumingId).length, 1);
    assert.equal(eventsOf(resumingId)[0].data.reason, 'closed');
    const serials = events().map((e) => e.serial);
    assert.equal(new Set(serials).size, serials.length, 'each event once');
  } finally {
    await tern.stop();
    await fn.stop();
  }
});

test('before-publish: transports cut while publishes wait for the function lose and duplicate nothing', async () => {
  // Proves the held publishes of a dropped transport are neither applied nor answered,
  // and that ably-js's re-sends after the resume are applied once: with a function that
  // takes 100-300 ms, 60 messages published without waiting while the transport is cut
  // three times all resolve, and a subscriber and history see each exactly once, in
  // publish order.
  let call = 0;
  const fn = await startHookFunction({
    keyName: KEY_NAME,
    keySecret: KEY_SECRET,
    decide: () => ({ body: { action: 'accept' }, delayMs: 100 + ((call++ * 37) % 200) }),
  });
  const tern = await startTern(withFunctions(`
[[apps.before_publish]]
id = "slowish"
channel_filter = "^cut:"
url = "http://127.0.0.1:${fn.port}/fn"
timeout_ms = 5000
`));
  const publisher = new Ably.Realtime(options(tern.port, { clientId: 'p' }));
  const subscriber = new Ably.Realtime(options(tern.port));
  try {
    await connected(publisher);
    await connected(subscriber);
    const seen = [];
    await subscriber.channels.get('cut:x').subscribe((m) => seen.push(m.data));
    const channel = publisher.channels.get('cut:x');
    await channel.attach();
    const publishes = [];
    for (let i = 0; i < 60; i++) {
      publishes.push(channel.publish('n', `m${i}`));
      if (i % 20 === 10) {
        await new Promise((r) => setTimeout(r, 150));
        publisher.connection.connectionManager.disconnectAllTransports();
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    const outcomes = await Promise.allSettled(publishes);
    assert.deepEqual(outcomes.filter((o) => o.status === 'rejected'), [], 'every publish ACKed');
    const expected = Array.from({ length: 60 }, (_, i) => `m${i}`);
    await waitUntil(() => seen.length >= 60, 15000, 'every message');
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(seen, expected, 'each once, in order (subscriber)');
    const rest = new Ably.Rest(options(tern.port));
    const page = await rest.channels.get('cut:x').history({ direction: 'forwards', limit: 1000 });
    assert.deepEqual(page.items.map((m) => m.data), expected, 'each once, in order (history)');
    // More calls than messages: publishes held when a transport was cut were asked
    // again after the resume (so the cuts did catch held publishes).
    assert.ok(fn.requests.length > 60, `cuts caught held publishes (${fn.requests.length} calls)`);
  } finally {
    publisher.close();
    subscriber.close();
    await tern.stop();
    await fn.stop();
  }
});

test('$connect over comet: refused and accepted as over WebSocket', async () => {
  // Proves the comet transport goes through the same function (transport "comet").
  const fn = await startHookFunction({
    keyName: KEY_NAME,
    keySecret: KEY_SECRET,
    decide: (path, body) => (body.clientId === 'mallory'
      ? { body: { action: 'reject', rejectionReason: 'banned user' } }
      : { body: { action: 'accept', clientId: body.clientId ? undefined : 'comet-assigned' } }),
  });
  const tern = await startTern(withFunctions(`
[apps.on_connect]
id = "gate"
url = "http://127.0.0.1:${fn.port}/connect"
sign_with_key = "root"
`));
  const refused = new Ably.Realtime(options(tern.port, { clientId: 'mallory', transports: ['comet'] }));
  const accepted = new Ably.Realtime(options(tern.port, { transports: ['comet'] }));
  try {
    const failure = await once(refused.connection, 'failed');
    assert.equal(failure.reason.code, 40300);
    assert.match(failure.reason.message, /banned user/);
    await connected(accepted);
    assert.equal(accepted.auth.clientId, 'comet-assigned');
    assert.ok(fn.requests.every((r) => r.json.transport === 'comet'));
    assert.equal(fn.badSignatures, 0);
  } finally {
    refused.close();
    accepted.close();
    await tern.stop();
    await fn.stop();
  }
});

test('$connect over SSE and MQTT: every stream and every CONNECT goes through the function', async () => {
  // Proves the SSE and MQTT listeners call the same function (transport "sse" / "mqtt",
  // the client's address, the connection id): a refusal is an HTTP 403 with 40300 and
  // the reason for SSE, CONNACK 5 (not authorised) for MQTT; a narrowed capability holds
  // on the stream (40160 for a channel it no longer allows).
  let calls = 0;
  const fn = await startHookFunction({
    keyName: KEY_NAME,
    keySecret: KEY_SECRET,
    decide: () => {
      calls += 1;
      // The first SSE request and the first CONNECT are refused; the rest may only
      // subscribe to chat:*.
      if (calls === 1 || calls === 4) return { body: { action: 'reject', rejectionReason: 'banned device' } };
      return { body: { action: 'accept', capability: { 'chat:*': ['subscribe'] } } };
    },
  });
  const mqttPort = await freePort();
  const tern = await startTern(withFunctions(`
[apps.on_connect]
id = "gate"
url = "http://127.0.0.1:${fn.port}/connect"
sign_with_key = "root"
`).replace('[history]', `[mqtt]\nenabled = true\nport = ${mqttPort}\n\n[history]`));
  const auth = { authorization: `Basic ${Buffer.from(`${KEY_NAME}:${KEY_SECRET}`).toString('base64')}` };
  const sse = (channel, signal) => fetch(`http://127.0.0.1:${tern.port}/sse?v=1.2&enveloped=false&channels=${channel}`, { headers: auth, signal });
  const abort = new AbortController();
  const devices = [];
  try {
    const refused = await sse('chat:x');
    assert.equal(refused.status, 403);
    const body = await refused.json();
    assert.equal(body.error.code, 40300);
    assert.match(body.error.message, /banned device/);

    const stream = await sse('chat:x', abort.signal);
    assert.equal(stream.status, 200);
    const outside = await sse('news');
    assert.equal(outside.status, 401);
    assert.equal((await outside.json()).error.code, 40160);
    const rest = new Ably.Rest(options(tern.port));
    await rest.channels.get('chat:x').publish('n', 'through the gate');
    const reader = stream.body.getReader();
    let text = '';
    await waitUntil(async () => {
      const { value } = await reader.read();
      text += Buffer.from(value || []).toString();
      return text.includes('through the gate');
    }, 5000, 'the message on the stream');

    const connectMqtt = (clientId) => {
      const device = mqtt.connect(`mqtt://127.0.0.1:${mqttPort}`, {
        username: KEY_NAME, password: KEY_SECRET, clientId, reconnectPeriod: 0, protocolVersion: 4,
      });
      devices.push(device);
      return new Promise((resolve) => {
        device.once('connect', () => resolve('connected'));
        device.once('error', (err) => resolve(err));
      });
    };
    const denied = await connectMqtt('device-banned');
    assert.ok(denied instanceof Error, `refused: ${denied}`);
    assert.equal(denied.code, 5);
    assert.equal(await connectMqtt('device-ok'), 'connected');

    assert.equal(fn.badSignatures, 0);
    const transports = fn.requests.map((r) => r.json.transport);
    assert.deepEqual(transports, ['sse', 'sse', 'sse', 'mqtt', 'mqtt']);
    for (const { json } of fn.requests) {
      assert.equal(json.source, 'connection.connect');
      assert.equal(json.keyName, KEY_NAME);
      assert.match(json.remoteAddress, /^127\.0\.0\.1:\d+$/);
      assert.match(json.connectionId, json.transport === 'sse' ? /^sse-/ : /^mqtt-/);
    }
  } finally {
    abort.abort();
    for (const device of devices) device.end(true);
    await tern.stop();
    await fn.stop();
  }
});

test('$disconnect over SSE and MQTT: one connection.disconnected when a stream or an MQTT connection ends', async () => {
  // Proves each SSE stream and each MQTT connection is reported once when it ends,
  // with its transport, the clientId its credentials give and a stable serial.
  const fn = await startHookFunction({ keyName: KEY_NAME, keySecret: KEY_SECRET, decide: () => ({}) });
  const mqttPort = await freePort();
  const tern = await startTern(withFunctions(`
[[apps.rules]]
id = "conns"
events = ["connection.disconnected"]
url = "http://127.0.0.1:${fn.port}/hook"
batch_window_ms = 20
sign_with_key = "root"
`).replace('[history]', `[mqtt]\nenabled = true\nport = ${mqttPort}\n\n[history]`));
  const events = () => fn.requests.filter((r) => r.path === '/hook').flatMap((r) => r.json.items);
  try {
    const abort = new AbortController();
    const auth = { authorization: `Basic ${Buffer.from(`${KEY_NAME}:${KEY_SECRET}`).toString('base64')}` };
    const stream = await fetch(`http://127.0.0.1:${tern.port}/sse?v=1.2&channels=watch`, { headers: auth, signal: abort.signal });
    assert.equal(stream.status, 200);
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(events().length, 0, 'nothing while the stream is open');
    abort.abort();
    await waitUntil(() => events().some((e) => e.data.transport === 'sse'), 5000, 'the stream\'s event');

    const device = mqtt.connect(`mqtt://127.0.0.1:${mqttPort}`, {
      username: KEY_NAME, password: KEY_SECRET, clientId: 'device-1', reconnectPeriod: 0, protocolVersion: 4,
    });
    await new Promise((resolve, reject) => { device.once('connect', resolve); device.once('error', reject); });
    await device.endAsync();
    await waitUntil(() => events().some((e) => e.data.transport === 'mqtt'), 5000, 'the MQTT connection\'s event');
    await new Promise((r) => setTimeout(r, 300));

    assert.equal(fn.badSignatures, 0);
    const [sse] = events().filter((e) => e.data.transport === 'sse');
    const [device1] = events().filter((e) => e.data.transport === 'mqtt');
    assert.equal(events().length, 2, JSON.stringify(events()));
    for (const [event, prefix] of [[sse, /^sse-/], [device1, /^mqtt-/]]) {
      assert.equal(event.source, 'connection.disconnected');
      assert.match(event.data.connectionId, prefix);
      assert.equal(event.serial, `${event.data.connectionId}:disconnected`);
      assert.equal(event.data.reason, 'closed');
      assert.equal(event.data.appId, 'test');
      assert.ok(event.data.connectedAt <= event.data.disconnectedAt);
    }
  } finally {
    await tern.stop();
    await fn.stop();
  }
});

/// A free TCP port on 127.0.0.1 (for the MQTT listener, whose port the helper does not read).
function freePort() {
  return new Promise((resolve) => {
    const server = createNetServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

test('before-publish on MQTT: a changed payload reaches ably-js; a rejected PUBLISH closes the connection, nothing published', async () => {
  // Proves MQTT PUBLISHes go through the same function (binary payloads arrive base64,
  // as Ably's JSON carries binary data); MQTT 3.1.1 cannot refuse a PUBLISH, so a
  // rejection closes the connection and the message is not published.
  const fn = await startHookFunction({
    keyName: KEY_NAME,
    keySecret: KEY_SECRET,
    decide: (path, body) => {
      const [message] = body.messages;
      const text = message.encoding === 'base64'
        ? Buffer.from(message.data, 'base64').toString('utf8') : message.data;
      if (text.startsWith('bad')) return { body: { action: 'reject', rejectionReason: 'no bad words here' } };
      return { body: { action: 'accept', messages: [{ data: text.toUpperCase() }] } };
    },
  });
  const mqttPort = await freePort();
  const tern = await startTern(withFunctions(`
[[apps.before_publish]]
id = "moderate"
channel_filter = "^chat:"
url = "http://127.0.0.1:${fn.port}/moderate"
sign_with_key = "root"
`).replace('[history]', `[mqtt]\nenabled = true\nport = ${mqttPort}\n\n[history]`));
  const subscriber = new Ably.Realtime(options(tern.port));
  let device;
  try {
    await connected(subscriber);
    const seen = [];
    await subscriber.channels.get('chat:mqtt').subscribe((m) => seen.push(m.data));
    device = mqtt.connect(`mqtt://127.0.0.1:${mqttPort}`, {
      username: KEY_NAME, password: KEY_SECRET, clientId: 'device-1', reconnectPeriod: 0, protocolVersion: 4,
    });
    await new Promise((resolve, reject) => { device.once('connect', resolve); device.once('error', reject); });
    await device.publishAsync('chat:mqtt', 'hello', { qos: 1 });
    await waitUntil(() => seen.length === 1, 5000, 'the changed message');
    assert.equal(seen[0], 'HELLO');
    const closed = new Promise((resolve) => device.once('close', resolve));
    device.publish('chat:mqtt', 'bad words', { qos: 1 });
    await closed;
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(seen, ['HELLO'], 'the rejected PUBLISH was not published');
    assert.equal(fn.badSignatures, 0);
    assert.equal(fn.requests.length, 2);
  } finally {
    device?.end(true);
    subscriber.close();
    await tern.stop();
    await fn.stop();
  }
});

test('before-publish: a slow function holds only the publishes behind it, not attaches or other connections', async () => {
  // Proves the session keeps serving non-publish frames while a publish waits: an
  // ATTACH sent after a publish whose function takes 1.5 s is answered at once, and
  // another connection's publish on an unfiltered channel is not delayed either.
  const fn = await startHookFunction({
    keyName: KEY_NAME,
    keySecret: KEY_SECRET,
    decide: () => ({ body: { action: 'accept' }, delayMs: 1500 }),
  });
  const tern = await startTern(withFunctions(`
[[apps.before_publish]]
id = "slow"
channel_filter = "^slow:"
url = "http://127.0.0.1:${fn.port}/fn"
timeout_ms = 5000
`));
  const client = new Ably.Realtime(options(tern.port));
  const other = new Ably.Realtime(options(tern.port));
  try {
    await connected(client);
    await connected(other);
    await client.channels.get('slow:x').attach();
    const started = Date.now();
    const held = client.channels.get('slow:x').publish('n', 'waits');
    await client.channels.get('elsewhere').attach();
    const attachMs = Date.now() - started;
    await other.channels.get('free').publish('n', 'not held');
    const otherMs = Date.now() - started;
    await held;
    const heldMs = Date.now() - started;
    assert.ok(attachMs < 700, `ATTACH answered in ${attachMs} ms`);
    assert.ok(otherMs < 700, `another connection published in ${otherMs} ms`);
    assert.ok(heldMs >= 1400, `the held publish took ${heldMs} ms`);
  } finally {
    client.close();
    other.close();
    await tern.stop();
    await fn.stop();
  }
});
