// Channel deltas (`params: {delta: 'vcdiff'}`) through ably-js and Ably's own VCDIFF
// decoder: after the first message a delta subscriber gets each message as a delta
// against the one before, decodes it to exactly what was published (JSON and msgpack,
// objects, text and binary), and never needs the decode-failure recovery; subscribers
// without deltas get full messages; and it holds across regions.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import vcdiff from '@ably/vcdiff-decoder';
import { connected, options, startTern, ternSuite, waitUntil } from '../lib/tern.mjs';

const suite = ternSuite();

/// A decoder that counts its calls, as ably-js's own delta tests do.
function countingDecoder() {
  return {
    calls: 0,
    decode(delta, base) {
      this.calls++;
      return vcdiff.decode(delta, base);
    },
  };
}

const payloads = (n) =>
  Array.from({ length: n }, (_, i) =>
    i % 3 === 2 ? `plain text number ${i} with a long shared tail ..........................` :
      { kind: 'score', home: i, away: 2, status: i % 2 ? 'live' : 'half-time', note: 'x'.repeat(200) });

/// Attaches a delta subscriber and collects what it receives, failing on any
/// decode-failure re-attach (which would mean a delta against the wrong base).
async function deltaSubscriber(client, name, decoder) {
  const channel = client.channels.get(name, { params: { delta: 'vcdiff' } });
  const got = [];
  const reattaches = [];
  await channel.subscribe((m) => got.push(m.data));
  channel.on('attaching', (change) => reattaches.push(change.reason?.code));
  assert.deepEqual(channel.params, { delta: 'vcdiff' });
  return { got, reattaches, decoder };
}

for (const binary of [false, true]) {
  test(`a delta subscriber decodes every message exactly (${binary ? 'msgpack' : 'json'})`, async () => {
    // Proves messages after the first arrive as vcdiff deltas and decode to what was sent.
    const decoder = countingDecoder();
    const sub = await connected(suite.realtime({ useBinaryProtocol: binary, plugins: { vcdiff: decoder } }));
    const plain = await connected(suite.realtime({ useBinaryProtocol: binary }));
    const pub = await connected(suite.realtime());
    const name = `delta-${binary}`;
    const d = await deltaSubscriber(sub, name, decoder);
    const full = [];
    await plain.channels.get(name).subscribe((m) => full.push(m.data));
    const sent = payloads(12);
    sent.push(Buffer.from([1, 2, 3, 4, 5, 6, 7, 8]), Buffer.from([1, 2, 3, 4, 5, 6, 7, 9]));
    for (const data of sent) await pub.channels.get(name).publish('n', data);
    await waitUntil(() => d.got.length === sent.length && full.length === sent.length, 10000, 'all delivered');
    const norm = (x) => (Buffer.isBuffer(x) || x instanceof ArrayBuffer ? [...Buffer.from(x)] : x);
    assert.deepEqual(d.got.map(norm), sent.map(norm));
    assert.deepEqual(full.map(norm), sent.map(norm));
    assert.equal(decoder.calls, sent.length - 1, 'every message after the first was a delta');
    assert.deepEqual(d.reattaches, [], 'no decode failure');
  });
}

test('a delta subscriber that does not get its own messages (echo off) gets the next one in full', async () => {
  // Proves a subscriber is sent a delta only against a message it actually received.
  const decoder = countingDecoder();
  const sub = await connected(suite.realtime({ echoMessages: false, plugins: { vcdiff: decoder } }));
  const pub = await connected(suite.realtime());
  const d = await deltaSubscriber(sub, 'delta-echo', decoder);
  const ours = sub.channels.get('delta-echo');
  const theirs = pub.channels.get('delta-echo');
  await theirs.publish('n', { v: 1, pad: 'p'.repeat(100) });
  await theirs.publish('n', { v: 2, pad: 'p'.repeat(100) });
  await ours.publish('n', { v: 3, pad: 'p'.repeat(100) }); // not delivered back to `sub`
  await theirs.publish('n', { v: 4, pad: 'p'.repeat(100) });
  await theirs.publish('n', { v: 5, pad: 'p'.repeat(100) });
  await waitUntil(() => d.got.length === 4, 10000, 'four delivered');
  assert.deepEqual(d.got.map((x) => x.v), [1, 2, 4, 5]);
  assert.equal(decoder.calls, 2, 'v2 and v5 as deltas; v1 and v4 in full');
  assert.deepEqual(d.reattaches, []);
});

test('a delta subscriber in another region decodes messages published elsewhere', async () => {
  // Proves deltas are built where the subscriber is, from the replicated message order.
  const tern = await startTern('', { args: ['dev', '--port', '0'], listening: 3 });
  const clients = [];
  try {
    const [east, west] = tern.ports;
    const make = (port, extra) => {
      const c = new Ably.Realtime(options(port, { key: 'dev.root:dev-secret-change-me', ...extra }));
      clients.push(c);
      return c;
    };
    const decoder = countingDecoder();
    const sub = await connected(make(west, { plugins: { vcdiff: decoder } }));
    const pub = await connected(make(east));
    const d = await deltaSubscriber(sub, 'delta-regions', decoder);
    const sent = payloads(10);
    for (const data of sent) await pub.channels.get('delta-regions').publish('n', data);
    await waitUntil(() => d.got.length === sent.length, 15000, 'cross-region delivery');
    assert.deepEqual(d.got, sent);
    assert.equal(decoder.calls, sent.length - 1);
    assert.deepEqual(d.reattaches, []);
  } finally {
    for (const c of clients) c.close();
    await tern.stop();
  }
});
