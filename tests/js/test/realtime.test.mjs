// ably-js 2.x against tern: connect, pub/sub, echo, capabilities, limits, detach, close.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import WebSocket from 'ws';
import { createHmac } from 'node:crypto';
import { LIMITED_KEY, ROOT_KEY, connected, once, options, ternSuite, waitUntil } from '../lib/tern.mjs';

const suite = ternSuite();
const realtime = (extra, port) => suite.realtime(extra, port);

test('connects with a key: connection id without ":" and a connection key', async () => {
  // Proves basic key auth and the CONNECTED details ably-js requires.
  const client = await connected(realtime());
  assert.ok(client.connection.id);
  assert.ok(!client.connection.id.includes(':'));
  assert.ok(client.connection.key);
});

test('connects with a token from authCallback + createTokenRequest and uses it', async () => {
  // Proves POST /keys/{keyName}/requestToken and token auth on the WebSocket.
  const rest = new Ably.Rest(options(suite.port));
  const client = realtime({
    key: undefined,
    authCallback: (_params, callback) => {
      rest.auth.createTokenRequest({ clientId: 'tok-user' }).then((tr) => callback(null, tr), (e) => callback(e, null));
    },
  });
  await connected(client);
  assert.equal(client.auth.clientId, 'tok-user');
  const channel = client.channels.get('token-chan');
  const got = new Promise((r) => channel.subscribe((m) => r(m)));
  await channel.attach();
  await channel.publish('hello', 'via-token');
  const message = await got;
  assert.equal(message.data, 'via-token');
  assert.equal(message.clientId, 'tok-user');
});

test('connects with an HS256 JWT carrying x-ably-capability and x-ably-clientId', async () => {
  // Proves JWT auth: signed with the key secret, kid = key name, claims honoured.
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const head = b64({ alg: 'HS256', typ: 'JWT', kid: 'test.root' });
  const body = b64({ iat: now, exp: now + 600, 'x-ably-capability': '{"jwt:*":["*"]}', 'x-ably-clientId': 'jwt-user' });
  const signature = createHmac('sha256', 'rootsecret').update(`${head}.${body}`).digest('base64url');
  const client = await connected(realtime({ key: undefined, token: `${head}.${body}.${signature}` }));
  assert.equal(client.auth.clientId, 'jwt-user');
  await client.channels.get('jwt:room').attach();
  await assert.rejects(client.channels.get('other').attach(), (err) => err.code === 40160);
});

test('two clients pub/sub: 20 messages in order with name, data, ids and timestamps', async () => {
  // Proves fan-out, ACKs, and the fields ably-js fills from the frame.
  const a = await connected(realtime({ clientId: 'alice' }));
  const b = await connected(realtime({ clientId: 'bob' }));
  const sub = b.channels.get('pubsub');
  const received = [];
  await sub.subscribe((m) => received.push(m));
  const pub = a.channels.get('pubsub');
  const payloads = [];
  for (let i = 0; i < 20; i++) {
    const data = i % 5 === 3 ? { n: i, nested: { ok: true } } : i % 5 === 4 ? Buffer.from([i, 0, 255]) : `text-${i}`;
    payloads.push(data);
    const result = await pub.publish(`name-${i}`, data);
    assert.equal(result.serials.length, 1);
  }
  await waitUntil(() => received.length === 20, 10000, '20 messages');
  received.forEach((m, i) => {
    assert.equal(m.name, `name-${i}`);
    assert.deepEqual(Buffer.isBuffer(payloads[i]) ? Buffer.from(m.data) : m.data, payloads[i]);
    assert.equal(m.clientId, 'alice');
    assert.equal(m.connectionId, a.connection.id);
    assert.ok(m.id);
    assert.ok(Math.abs(m.timestamp - Date.now()) < 60000);
  });
  assert.equal(new Set(received.map((m) => m.id)).size, 20);
});

test('echoMessages:false: the publisher does not get its own message, others do', async () => {
  // Proves the echo=false connect param.
  const a = await connected(realtime({ echoMessages: false }));
  const b = await connected(realtime());
  const own = [];
  const other = [];
  await a.channels.get('echo').subscribe((m) => own.push(m));
  await b.channels.get('echo').subscribe((m) => other.push(m));
  await a.channels.get('echo').publish('x', 'y');
  await b.channels.get('echo').publish('from-b', 'z');
  await waitUntil(() => other.length === 2 && own.length === 1, 10000, 'deliveries');
  assert.deepEqual(own.map((m) => m.name), ['from-b']);
});

test('capability denial surfaces as 40160 for publish and for attach', async () => {
  // Proves granted modes follow the capability and denials carry the Ably code.
  const client = await connected(realtime({ key: LIMITED_KEY }));
  const readonly = client.channels.get('readonly:news');
  await readonly.attach();
  assert.ok(readonly.modes.includes('subscribe'));
  await assert.rejects(readonly.publish('x', 'y'), (err) => err.code === 40160);
  const secret = client.channels.get('secret:x');
  await assert.rejects(secret.attach(), (err) => err.code === 40160);
  assert.equal(secret.state, 'failed');
  const allowed = client.channels.get('allowed:room');
  await allowed.attach();
  await allowed.publish('ok', 'fine');
});

test('an oversized publish is refused with 40009, client-side and by the server', async () => {
  // Proves maxMessageSize reaches the SDK and the server enforces it too.
  const client = await connected(realtime());
  await assert.rejects(client.channels.get('big').publish('x', 'a'.repeat(70000)), (err) => err.code === 40009);

  const ws = new WebSocket(`ws://127.0.0.1:${suite.port}/?key=${encodeURIComponent(ROOT_KEY)}&format=json&v=6`);
  const frames = [];
  ws.on('message', (d) => frames.push(JSON.parse(d.toString())));
  await waitUntil(() => frames.some((f) => f.action === 4), 10000, 'CONNECTED');
  ws.send(JSON.stringify({ action: 15, channel: 'big', msgSerial: 0, messages: [{ data: 'a'.repeat(70000) }] }));
  await waitUntil(() => frames.some((f) => f.action === 2), 10000, 'NACK');
  const nack = frames.find((f) => f.action === 2);
  assert.equal(nack.msgSerial, 0);
  assert.equal(nack.error.code, 40009);
  ws.send(JSON.stringify({ action: 0, id: 'still-alive' }));
  await waitUntil(() => frames.some((f) => f.action === 0 && f.id === 'still-alive'), 10000, 'heartbeat echo');
  ws.close();
});

test('channel.detach() resolves and stops deliveries', async () => {
  // Proves DETACH → DETACHED and that a detached subscriber gets nothing.
  const a = await connected(realtime());
  const b = await connected(realtime());
  const channel = b.channels.get('detach-me');
  const got = [];
  await channel.subscribe((m) => got.push(m.data));
  await a.channels.get('detach-me').publish('n', 'before');
  await waitUntil(() => got.length === 1, 10000, 'first message');
  await channel.detach();
  assert.equal(channel.state, 'detached');
  await a.channels.get('detach-me').publish('n', 'after');
  // A control subscriber proves 'after' was delivered to whoever was attached.
  const control = [];
  const c = await connected(realtime());
  await c.channels.get('detach-me').subscribe((m) => control.push(m.data));
  await a.channels.get('detach-me').publish('n', 'later');
  await waitUntil(() => control.includes('later'), 10000, 'control delivery');
  assert.deepEqual(got, ['before']);
});

test('close() moves the connection to closed', async () => {
  // Proves CLOSE → CLOSED.
  const client = await connected(realtime());
  client.close();
  await once(client.connection, 'closed');
  assert.equal(client.connection.state, 'closed');
});

test('msgpack (the Node default): binary stays binary, and a JSON subscriber gets it too', async () => {
  // Proves the msgpack codec and msgpack → JSON transcoding with base64.
  const pub = await connected(realtime({ binary: true }));
  const subBinary = await connected(realtime({ binary: true }));
  const subJson = await connected(realtime());
  const gotBinary = [];
  const gotJson = [];
  await subBinary.channels.get('mp').subscribe((m) => gotBinary.push(m));
  await subJson.channels.get('mp').subscribe((m) => gotJson.push(m));
  const bytes = Buffer.from([0, 1, 2, 250, 251, 252]);
  await pub.channels.get('mp').publish('s', 'a string');
  await pub.channels.get('mp').publish('b', bytes);
  await waitUntil(() => gotBinary.length === 2 && gotJson.length === 2, 10000, 'msgpack deliveries');
  for (const got of [gotBinary, gotJson]) {
    assert.equal(got[0].data, 'a string');
    assert.deepEqual(Buffer.from(got[1].data), bytes);
  }
});
