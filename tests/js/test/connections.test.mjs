// Per-connection push (API Gateway's `@connections`) over `tern dev`'s three regions:
// a backend POSTs to /connections/{id}/messages on any region and the one connection
// receives it on its own channel `[connection]<id>` with unchanged ably-js; GET shows
// its state, DELETE closes it; only the owner may attach its channel; a message pushed
// while the transport is cut arrives once after the resume. Plus inbound webhooks:
// `?enveloped=false` publishes any body (JSON, text, binary) as one message.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, once, options, startTern, waitUntil } from '../lib/tern.mjs';
import { startProxy } from '../lib/proxy.mjs';

const DEV_KEY = 'dev.root:dev-secret-change-me';
const AUTH = `Basic ${Buffer.from(DEV_KEY).toString('base64')}`;
let tern;
const clients = [];
const client = (port, extra = {}) => {
  const c = new Ably.Realtime(options(port, { key: DEV_KEY, ...extra }));
  clients.push(c);
  return c;
};

before(async () => { tern = await startTern('', { args: ['dev', '--port', '0'], listening: 3 }); });
after(async () => {
  for (const c of clients) c.close();
  await tern.stop();
});

/// One REST call to region `port`: `{ status, body }` (body parsed when JSON).
async function call(port, method, path, { body, headers = {}, auth = AUTH } = {}) {
  const response = await fetch(`http://127.0.0.1:${port}${path}`, {
    method,
    headers: { ...(auth ? { authorization: auth } : {}), ...(body !== undefined && !headers['content-type'] ? { 'content-type': 'application/json' } : {}), ...headers },
    body: body === undefined ? undefined : (typeof body === 'string' || body instanceof Uint8Array ? body : JSON.stringify(body)),
  });
  const text = await response.text();
  let parsed = text;
  try { parsed = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  return { status: response.status, body: parsed, headers: response.headers };
}

/// Subscribes `realtime` to its own channel (the one line an app writes); resolves with
/// the list the messages land in.
async function ownChannel(realtime) {
  const got = [];
  await realtime.channels.get(`[connection]${realtime.connection.id}`).subscribe((m) => got.push(m));
  return got;
}

test('a connection in one region receives a message POSTed to another region, once', async () => {
  // Proves cross-region routing by connection id: region C forwards to the node that
  // holds the connection in region A, which publishes on the connection's channel.
  const [east, , south] = tern.ports;
  const realtime = await connected(client(east));
  const got = await ownChannel(realtime);
  const id = realtime.connection.id;
  const sent = await call(south, 'POST', `/connections/${id}/messages`, { body: { name: 'greet', data: { hello: 'you' } } });
  assert.equal(sent.status, 201, JSON.stringify(sent.body));
  assert.equal(sent.body.channel, `[connection]${id}`);
  const batch = await call(south, 'POST', `/connections/${id}/messages`, { body: [{ name: 'a', data: '1' }, { name: 'b', data: '2' }] });
  assert.equal(batch.status, 201);
  // A retry (after a 504, say) with the same message id is applied once.
  for (let i = 0; i < 2; i++) {
    assert.equal((await call(south, 'POST', `/connections/${id}/messages`, { body: { id: 'retry-1:0', name: 'r', data: 'once' } })).status, 201);
  }
  await waitUntil(() => got.length >= 4, 10000, 'pushed messages');
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(got.map((m) => [m.name, m.data]), [['greet', { hello: 'you' }], ['a', '1'], ['b', '2'], ['r', 'once']]);
});

test('GET shows a connection\'s state from any region; unknown ids are 404/80022', async () => {
  // Proves state reads are routed to the holder and report what it holds.
  const [east, west, south] = tern.ports;
  const realtime = await connected(client(west, { clientId: 'alice' }));
  const id = realtime.connection.id;
  for (const port of [east, west, south]) {
    const got = await call(port, 'GET', `/connections/${id}`);
    assert.equal(got.status, 200, JSON.stringify(got.body));
    assert.equal(got.body.connectionId, id);
    assert.equal(got.body.state, 'connected');
    assert.equal(got.body.clientId, 'alice');
    assert.equal(got.body.transport, 'web_socket');
    assert.ok(got.body.nodeId);
    assert.ok(got.body.region);
    assert.ok(Math.abs(got.body.connectedAt - Date.now()) < 60000);
  }
  // A well-formed id of this node that names nothing, an id of a node that is not in
  // the cluster, and a malformed id.
  const tag = id.split('-')[0];
  for (const [port, unknown] of [[east, `${tag}-AAAAAAAAAAAA`], [south, 'zzzzzz-AAAAAAAAAAAA']]) {
    for (const [method, body] of [['GET'], ['DELETE'], ['POST', { data: 'x' }]]) {
      const path = method === 'POST' ? `/connections/${unknown}/messages` : `/connections/${unknown}`;
      const answer = await call(port, method, path, { body });
      assert.equal(answer.status, 404, `${method} ${path}`);
      assert.equal(answer.body.error.code, 80022);
    }
  }
  const bad = await call(east, 'GET', '/connections/not-an-id');
  assert.equal(bad.status, 400);
  assert.equal(bad.body.error.code, 80018);
  const anonymous = await call(south, 'GET', `/connections/${id}`, { auth: 'Basic ' + Buffer.from('dev.root:wrong').toString('base64') });
  assert.equal(anonymous.status, 401);
});

test('only the owner may attach a connection\'s channel, and nobody may publish there', async () => {
  // Proves the channel is private to its connection whatever the capability grants.
  const [east, west] = tern.ports;
  const owner = await connected(client(east));
  const other = await connected(client(west));
  const name = `[connection]${owner.connection.id}`;
  await assert.rejects(other.channels.get(name).attach(), (err) => err.code === 40160);
  const own = owner.channels.get(name);
  await own.attach();
  await assert.rejects(own.publish('x', 'y'), (err) => err.code === 40010 || err.code === 40160);
  const rest = new Ably.Rest(options(east, { key: DEV_KEY }));
  await assert.rejects(rest.channels.get(name).publish('x', 'y'), (err) => err.code === 40010);
  await assert.rejects(rest.channels.get(name).history(), (err) => err.code === 40010);
});

test('DELETE closes a connection from another region: ably-js goes FAILED with 80017', async () => {
  // Proves DELETE reaches the holder and ends the connection for good.
  const [east, west] = tern.ports;
  const realtime = await connected(client(east));
  const id = realtime.connection.id;
  const failed = once(realtime.connection, 'failed');
  const answer = await call(west, 'DELETE', `/connections/${id}`);
  assert.equal(answer.status, 204);
  const change = await failed;
  assert.equal(change.reason.code, 80017);
  const after = await call(west, 'GET', `/connections/${id}`);
  assert.equal(after.status, 404);
});

test('a message pushed while the transport is cut arrives once after the resume', async () => {
  // Proves the resume path: 201 while the connection is parked, then the resumed
  // connection (same id) re-attaches its channel from its channelSerial and gets
  // exactly the messages it missed, none twice.
  const [east, , south] = tern.ports;
  const proxy = await startProxy(east);
  try {
    const realtime = await connected(client(proxy.port, { disconnectedRetryTimeout: 200 }));
    const id = realtime.connection.id;
    const got = await ownChannel(realtime);
    assert.equal((await call(south, 'POST', `/connections/${id}/messages`, { body: { data: 'before' } })).status, 201);
    await waitUntil(() => got.length === 1, 10000, 'first message');
    proxy.pause(true);
    const disconnected = once(realtime.connection, 'disconnected');
    proxy.dropAll();
    await disconnected;
    await waitUntil(async () => (await call(south, 'GET', `/connections/${id}`)).body?.state === 'disconnected', 10000, 'parked');
    for (let i = 0; i < 5; i++) {
      const sent = await call(south, 'POST', `/connections/${id}/messages`, { body: { data: `while-cut-${i}` } });
      assert.equal(sent.status, 201);
    }
    proxy.pause(false);
    await once(realtime.connection, 'connected', 15000);
    assert.equal(realtime.connection.id, id, 'resumed the same connection');
    await waitUntil(() => got.length >= 6, 10000, 'messages pushed while cut');
    assert.equal((await call(south, 'POST', `/connections/${id}/messages`, { body: { data: 'after' } })).status, 201);
    await waitUntil(() => got.length >= 7, 10000, 'message after resume');
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(got.map((m) => m.data), ['before', ...[0, 1, 2, 3, 4].map((i) => `while-cut-${i}`), 'after']);
  } finally {
    proxy.close();
  }
});

test('a connection resumed on another region keeps its channel: pushes to the old id arrive once', async () => {
  // Proves the cross-node handover: the client's transport to region A is cut and it
  // resumes on region B (a new connection id there, as for any cross-region resume).
  // B claims the old connection from A with the client's resume key, so the new
  // connection owns the old id's channel: ably-js's re-attach resumes it from its
  // channelSerial with exactly the messages pushed while it was away, and messages
  // still POSTed to the old id reach it; GET of the old id says where it went, and
  // DELETE of the old id closes the new connection.
  const [east, west, south] = tern.ports;
  const proxy = await startProxy(east);
  try {
    const realtime = await connected(client(proxy.port, { disconnectedRetryTimeout: 200 }));
    const oldId = realtime.connection.id;
    const got = await ownChannel(realtime);
    assert.equal((await call(south, 'POST', `/connections/${oldId}/messages`, { body: { data: 'before' } })).status, 201);
    await waitUntil(() => got.length === 1, 10000, 'first message');
    proxy.pause(true);
    const disconnected = once(realtime.connection, 'disconnected');
    proxy.dropAll();
    await disconnected;
    await waitUntil(async () => (await call(south, 'GET', `/connections/${oldId}`)).body?.state === 'disconnected', 10000, 'parked');
    for (let i = 0; i < 3; i++) {
      assert.equal((await call(south, 'POST', `/connections/${oldId}/messages`, { body: { data: `away-${i}` } })).status, 201);
    }
    proxy.retarget(west);
    proxy.pause(false);
    await once(realtime.connection, 'connected', 15000);
    const newId = realtime.connection.id;
    assert.notEqual(newId, oldId, 'a new connection in the other region');
    await waitUntil(() => got.length >= 4, 10000, 'messages pushed while away');
    const moved = await call(east, 'GET', `/connections/${oldId}`);
    assert.deepEqual(moved.body, { connectionId: oldId, state: 'moved', movedTo: newId });
    const current = await call(south, 'GET', `/connections/${newId}`);
    assert.equal(current.body.state, 'connected');
    assert.deepEqual(current.body.resumedFrom, [oldId]);
    assert.equal((await call(south, 'POST', `/connections/${oldId}/messages`, { body: { data: 'to-old-id' } })).status, 201);
    await waitUntil(() => got.length >= 5, 10000, 'message to the old id after the move');
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(got.map((m) => m.data), ['before', 'away-0', 'away-1', 'away-2', 'to-old-id']);
    const failed = once(realtime.connection, 'failed');
    assert.equal((await call(south, 'DELETE', `/connections/${oldId}`)).status, 204);
    assert.equal((await failed).reason.code, 80017);
  } finally {
    proxy.close();
  }
});

test('a cross-region resume whose CONNECTED is lost, then retried with the same key, still owns the old channel', async () => {
  // Proves a repeated claim: the first new connection's CONNECTED is cut, so ably-js
  // resumes again with the old key, which the old node has already handed over; the
  // old id is re-pointed at the newest connection, which owns the old channel and gets
  // every push once.
  const [east, west, south] = tern.ports;
  const proxy = await startProxy(east);
  try {
    const realtime = await connected(client(proxy.port, { disconnectedRetryTimeout: 200 }));
    const oldId = realtime.connection.id;
    const got = await ownChannel(realtime);
    proxy.pause(true);
    const disconnected = once(realtime.connection, 'disconnected');
    proxy.dropAll();
    await disconnected;
    await waitUntil(async () => (await call(south, 'GET', `/connections/${oldId}`)).body?.state === 'disconnected', 10000, 'parked');
    assert.equal((await call(south, 'POST', `/connections/${oldId}/messages`, { body: { data: 'away' } })).status, 201);
    proxy.retarget(west);
    let cut = false;
    proxy.armCut('rst', { onCut: () => { cut = true; } });
    proxy.pause(false);
    await waitUntil(() => cut, 15000, 'the first CONNECTED from the other region cut');
    await waitUntil(() => realtime.connection.state === 'connected' && realtime.connection.id !== oldId, 15000, 'resumed again');
    const newId = realtime.connection.id;
    await waitUntil(() => got.length >= 1, 10000, 'the push made while away');
    const moved = await call(east, 'GET', `/connections/${oldId}`);
    assert.deepEqual(moved.body, { connectionId: oldId, state: 'moved', movedTo: newId });
    assert.equal((await call(south, 'POST', `/connections/${oldId}/messages`, { body: { data: 'later' } })).status, 201);
    await waitUntil(() => got.length >= 2, 10000, 'a push to the old id after the second resume');
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(got.map((m) => m.data), ['away', 'later']);
  } finally {
    proxy.close();
  }
});

test('push latency: POST → delivery, from the holder\'s region and from another (printed)', async () => {
  // Measures what a backend sees: 100 sequential pushes to one connection, each timed
  // from the POST to the subscriber's callback; every one arrives once, in order.
  const [east, west] = tern.ports;
  const realtime = await connected(client(east));
  const id = realtime.connection.id;
  const arrived = new Map();
  await realtime.channels.get(`[connection]${id}`).subscribe((m) => arrived.set(m.data, performance.now()));
  const percentile = (values, p) => values.slice().sort((a, b) => a - b)[Math.min(values.length - 1, Math.floor(values.length * p))];
  for (const [label, port] of [['same region', east], ['cross region', west]]) {
    const took = [];
    for (let i = 0; i < 100; i++) {
      const data = `${label}-${i}`;
      const start = performance.now();
      assert.equal((await call(port, 'POST', `/connections/${id}/messages`, { body: { data } })).status, 201);
      await waitUntil(() => arrived.has(data), 10000, data);
      took.push(arrived.get(data) - start);
    }
    console.log(`push ${label}: p50 ${percentile(took, 0.5).toFixed(1)} ms, p99 ${percentile(took, 0.99).toFixed(1)} ms (100 sequential, debug build)`);
  }
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(arrived.size, 200);
});

test('inbound webhooks: ?enveloped=false publishes JSON, text and binary bodies as one message', async () => {
  // Proves Ably's unenveloped publish: the body is the data, typed by Content-Type.
  const [east, west] = tern.ports;
  const realtime = await connected(client(east));
  const got = [];
  await realtime.channels.get('hooks').subscribe((m) => got.push(m));
  const path = '/channels/hooks/messages?enveloped=false';
  // The credential in the URL, as Ably's webhook URLs carry it.
  const json = await call(west, 'POST', `${path}&name=order&key=${encodeURIComponent(DEV_KEY)}`, { body: '{"some":"json"}', auth: null });
  assert.equal(json.status, 201, JSON.stringify(json.body));
  assert.equal(json.body.channel, 'hooks');
  assert.ok(json.body.messageId);
  assert.equal((await call(west, 'POST', path, { body: 'plain text', headers: { 'content-type': 'text/plain', 'x-ably-name': 'note' } })).status, 201);
  const bytes = new Uint8Array([0, 1, 2, 255]);
  assert.equal((await call(west, 'POST', path, { body: bytes, headers: { 'content-type': 'application/octet-stream' } })).status, 201);
  await waitUntil(() => got.length >= 3, 10000, 'webhook messages');
  assert.deepEqual([got[0].name, got[0].data], ['order', { some: 'json' }]);
  assert.deepEqual([got[1].name, got[1].data], ['note', 'plain text']);
  assert.deepEqual([...new Uint8Array(got[2].data)], [0, 1, 2, 255]);
  // The same body enveloped is a Message: unenveloped is only on request.
  const bad = await call(west, 'POST', path, { body: '{not json' });
  assert.equal(bad.status, 400);
  assert.equal(bad.body.error.code, 40013);
  // Over max_message_size (64 KiB by default) but within the frame: 413/40009.
  const big = await call(west, 'POST', path, { body: 'x'.repeat(70 * 1024), headers: { 'content-type': 'text/plain' } });
  assert.equal(big.status, 413);
  assert.equal(big.body.error.code, 40009);
  // Past max_frame_size the router refuses it before it is read: 413/40009 too.
  const huge = await call(west, 'POST', path, { body: 'x'.repeat(2 * 1024 * 1024), headers: { 'content-type': 'text/plain' } });
  assert.equal(huge.status, 413);
  assert.equal(huge.body.error.code, 40009);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(got.length, 3);
});
