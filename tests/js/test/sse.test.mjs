// Ably's SSE endpoint (`GET /sse`) and plain event stream (`GET /event-stream`), read by
// a real HTTP client (fetch, streaming) while ably-js publishes: enveloped and raw
// data, presence events, keepalives, resume from `Last-Event-ID` with exactly the missed
// messages (after a cut between events and in the middle of a multi-message frame), a
// resume in another region, and the Ably error codes for bad requests.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { sseBlocks } from '../lib/sse.mjs';
import { ROOT_KEY, connected, options, startTern, testConfig, ternSuite, waitUntil } from '../lib/tern.mjs';

const suite = ternSuite(testConfig({ connection: 'max_idle_interval_ms = 1000' }));

/// Opens a stream and parses its events as they arrive. `events` fills with
/// `{id, event, data}`; `comments` counts keepalive comments; `close()` cuts it.
async function openStream(port, query, { headers = {}, key = ROOT_KEY, path = '/sse' } = {}) {
  const controller = new AbortController();
  const url = `http://127.0.0.1:${port}${path}?v=1.2&key=${encodeURIComponent(key)}&${query}`;
  const response = await fetch(url, { headers, signal: controller.signal });
  const stream = { response, events: [], lines: [], comments: 0, status: response.status, closed: false };
  stream.close = () => { controller.abort(); stream.closed = true; };
  if (response.status !== 200) {
    stream.body = await response.json();
    return stream;
  }
  (async () => {
    try {
      if (path === '/event-stream' && !headers.accept) {
        const decoder = new TextDecoder();
        let buffer = '';
        for await (const chunk of response.body) {
          buffer += decoder.decode(chunk, { stream: true });
          let nl;
          while ((nl = buffer.indexOf('\n')) >= 0) {
            stream.lines.push(buffer.slice(0, nl));
            buffer = buffer.slice(nl + 1);
          }
        }
      } else {
        for await (const { comments, ...event } of sseBlocks(response.body)) {
          stream.comments += comments;
          if (event.event) stream.events.push(event);
        }
      }
    } catch { /* aborted */ }
    stream.closed = true;
  })();
  return stream;
}

const messages = (s) => s.events.filter((e) => e.event === 'message');

test('messages published with ably-js arrive as SSE events, enveloped by default', async () => {
  // Proves the SSE framing, the Message envelope (channel, name, data, encoding) and raw data.
  const pub = await connected(suite.realtime());
  const enveloped = await openStream(suite.port, 'channels=sse-a,sse-b');
  const raw = await openStream(suite.port, 'channels=sse-a&enveloped=false');
  await new Promise((r) => setTimeout(r, 200));
  await pub.channels.get('sse-a').publish('greeting', 'hello');
  await pub.channels.get('sse-b').publish('obj', { n: 1 });
  await pub.channels.get('sse-a').publish('bin', Buffer.from([1, 2, 3]));
  await waitUntil(() => messages(enveloped).length === 3 && messages(raw).length === 2, 5000, 'delivered');
  const got = messages(enveloped).map((e) => JSON.parse(e.data));
  assert.deepEqual(got.map((m) => [m.channel, m.name]), [['sse-a', 'greeting'], ['sse-b', 'obj'], ['sse-a', 'bin']]);
  assert.equal(got[0].data, 'hello');
  assert.deepEqual([got[1].encoding, JSON.parse(got[1].data)], ['json', { n: 1 }]);
  assert.deepEqual([got[2].encoding, got[2].data], ['base64', 'AQID']);
  assert.ok(got.every((m) => m.id && m.timestamp));
  assert.deepEqual(messages(raw).map((e) => e.data), ['hello', 'AQID']);
  assert.ok(messages(enveloped).every((e) => e.id), 'every message event has an id');
  enveloped.close();
  raw.close();
});

test('presence events stream too, and an idle stream gets keepalives', async () => {
  // Proves presence reaches SSE subscribers and keepalive comments flow while idle.
  const member = await connected(suite.realtime({ clientId: 'walker' }));
  const stream = await openStream(suite.port, 'channels=sse-presence');
  await new Promise((r) => setTimeout(r, 200));
  await member.channels.get('sse-presence').presence.enter('here');
  await waitUntil(() => stream.events.some((e) => e.event === 'presence'), 5000, 'presence event');
  const p = JSON.parse(stream.events.find((e) => e.event === 'presence').data);
  assert.deepEqual([p.clientId, p.data, p.channel], ['walker', 'here', 'sse-presence']);
  await waitUntil(() => stream.comments >= 1, 5000, 'a keepalive');
  stream.close();
});

test('a cut stream resumes from Last-Event-ID with exactly the missed messages', async () => {
  // Proves resume across a cut between events and inside a multi-message frame: 0 lost, 0 duplicated.
  const rest = new Ably.Rest(options(suite.port));
  const channel = rest.channels.get('sse-resume');
  const first = await openStream(suite.port, 'channels=sse-resume');
  await new Promise((r) => setTimeout(r, 200));
  for (let i = 0; i < 5; i++) await channel.publish('n', `m${i}`);
  await channel.publish([{ name: 'n', data: 'm5' }, { name: 'n', data: 'm6' }, { name: 'n', data: 'm7' }]);
  await waitUntil(() => messages(first).length === 8, 5000, 'first eight');
  first.close();
  // The client saw m0..m5 (stopping inside the m5..m7 frame).
  const seen = messages(first).slice(0, 6);
  const lastId = seen[seen.length - 1].id;
  for (let i = 8; i < 12; i++) await channel.publish('n', `m${i}`);
  const second = await openStream(suite.port, 'channels=sse-resume', { headers: { 'last-event-id': lastId } });
  await waitUntil(() => messages(second).length >= 6, 5000, 'the missed ones');
  await new Promise((r) => setTimeout(r, 300));
  const all = [...seen, ...messages(second)].map((e) => JSON.parse(e.data).data);
  assert.deepEqual(all, Array.from({ length: 12 }, (_, i) => `m${i}`));
  // lastEvent in the query does the same.
  const third = await openStream(suite.port, `channels=sse-resume&lastEvent=${encodeURIComponent(messages(second).at(-1).id)}`);
  await channel.publish('n', 'm12');
  await waitUntil(() => messages(third).length === 1, 5000, 'only the new one');
  assert.equal(JSON.parse(messages(third)[0].data).data, 'm12');
  second.close();
  third.close();
});

test('rewind, the plain JSON event stream, and bad requests get Ably errors', async () => {
  // Proves rewind on a new stream, the /event-stream envelope lines, and 40101/40160/40010/80008.
  const rest = new Ably.Rest(options(suite.port));
  for (let i = 0; i < 3; i++) await rest.channels.get('sse-rewind').publish('n', `r${i}`);
  const rewound = await openStream(suite.port, 'channels=sse-rewind&rewind=2');
  await waitUntil(() => messages(rewound).length === 2, 5000, 'rewound');
  assert.deepEqual(messages(rewound).map((e) => JSON.parse(e.data).data), ['r1', 'r2']);
  rewound.close();

  const plain = await openStream(suite.port, 'channels=sse-rewind&rewind=1', { path: '/event-stream' });
  await waitUntil(() => plain.lines.some((l) => l.startsWith('{')), 5000, 'a JSON line');
  const line = JSON.parse(plain.lines.find((l) => l.startsWith('{')));
  assert.equal(line.event, 'message');
  assert.equal(line.data.data, 'r2');
  assert.ok(line.id);
  plain.close();

  const noKey = await fetch(`http://127.0.0.1:${suite.port}/sse?v=1.2&channels=x`);
  assert.equal(noKey.status, 401);
  assert.equal((await noKey.json()).error.code, 40101);
  const denied = await openStream(suite.port, 'channels=elsewhere', { key: 'test.limited:limitedsecret' });
  assert.deepEqual([denied.status, denied.body.error.code], [401, 40160]);
  const invalid = await openStream(suite.port, `channels=${encodeURIComponent(':bad')}`);
  assert.deepEqual([invalid.status, invalid.body.error.code], [400, 40010]);
  const stale = await openStream(suite.port, 'channels=sse-rewind&lastEvent=nonsense');
  await waitUntil(() => stale.events.some((e) => e.event === 'error'), 5000, 'an error event');
  assert.equal(JSON.parse(stale.events.find((e) => e.event === 'error').data).code, 80008);
  stale.close();
});

test('a stream cut in one region resumes in another with exactly the missed messages', async () => {
  // Proves the event id is the channel cursor, meaningful on every node.
  const tern = await startTern('', { args: ['dev', '--port', '0'], listening: 3 });
  const key = 'dev.root:dev-secret-change-me';
  try {
    const [east, west, south] = tern.ports;
    const rest = new Ably.Rest(options(east, { key }));
    const channel = rest.channels.get('sse-regions');
    const first = await openStream(west, 'channels=sse-regions', { key });
    await new Promise((r) => setTimeout(r, 300));
    for (let i = 0; i < 5; i++) await channel.publish('n', `w${i}`);
    await waitUntil(() => messages(first).length === 5, 10000, 'west got five');
    first.close();
    for (let i = 5; i < 10; i++) await channel.publish('n', `w${i}`);
    const second = await openStream(south, 'channels=sse-regions', { key, headers: { 'last-event-id': messages(first).at(-1).id } });
    await waitUntil(() => messages(second).length >= 5, 10000, 'south resumed');
    await new Promise((r) => setTimeout(r, 300));
    const all = [...messages(first), ...messages(second)].map((e) => JSON.parse(e.data).data);
    assert.deepEqual(all, Array.from({ length: 10 }, (_, i) => `w${i}`));
    second.close();
  } finally {
    await tern.stop();
  }
});

test('a stream that reads too slowly is ended, and resumes from its last id with nothing lost', async () => {
  // Proves the per-stream queue bound: overflow ends the stream instead of dropping events.
  const tern = await startTern(testConfig({ limits: 'outbound_queue_max = 16\nchannel_log_bytes_max = 134217728' }));
  try {
    const rest = new Ably.Rest(options(tern.port));
    const channel = rest.channels.get('sse-slow');
    const url = `http://127.0.0.1:${tern.port}/sse?v=1.2&enveloped=false&channels=sse-slow&key=${encodeURIComponent(ROOT_KEY)}`;
    const response = await fetch(url); // not read while 400 × 60 KB are published
    await new Promise((r) => setTimeout(r, 200));
    const pad = 'p'.repeat(60_000);
    for (let i = 0; i < 400; i++) await channel.publish('n', `${i}:${pad}`);
    const got = [];
    let lastId = null;
    for await (const { id, event, data } of sseBlocks(response.body)) {
      if (event === 'message') { lastId = id; got.push(Number(data.split(':')[0])); }
    }
    assert.ok(got.length < 400, `the stream ended early (got ${got.length})`);
    const resumed = await openStream(tern.port, 'channels=sse-slow&enveloped=false', { headers: { 'last-event-id': lastId } });
    await waitUntil(() => got.length + messages(resumed).length >= 400, 20000, 'the rest');
    await new Promise((r) => setTimeout(r, 300));
    const all = [...got, ...messages(resumed).map((e) => Number(e.data.split(':')[0]))];
    assert.deepEqual(all, Array.from({ length: 400 }, (_, i) => i));
    resumed.close();
  } finally {
    await tern.stop();
  }
});
