// Batch REST through ably-js: batchPublish (RSC22) publishes to every channel it names
// and reports each channel's outcome; batchPresence (RSC24) reads several channels'
// members; a REST message with a realtime connection's key is published on its behalf
// (TM2h). In a cluster, batch presence reads each channel where it is kept.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { LIMITED_KEY, connected, options, ternSuite, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, startRegions } from '../lib/regions.mjs';

const suite = ternSuite();

test('batchPublish: each channel succeeds or fails on its own, and what succeeded is stored', async () => {
  // Proves per-channel capability checks, the BatchResult shape, and durability.
  const rest = new Ably.Rest(options(suite.port, { key: LIMITED_KEY }));
  const results = await rest.batchPublish([
    { channels: ['allowed:b1', 'readonly:b1'], messages: [{ data: 'm1' }, { data: 'm2' }] },
    { channels: ['allowed:b2'], messages: { data: 'm3' } },
  ]);
  assert.equal(results.length, 2);
  assert.equal(results[0].successCount, 1);
  assert.equal(results[0].failureCount, 1);
  assert.equal(results[0].results[0].channel, 'allowed:b1');
  assert.ok(results[0].results[0].messageId);
  assert.equal(results[0].results[1].error.code, 40160);
  assert.equal(results[0].results[1].error.statusCode, 401);
  assert.ok(!('messageId' in results[0].results[1]));
  assert.equal(results[1].successCount, 1);
  const single = await rest.batchPublish({ channels: ['allowed:b3'], messages: [{ data: 'm4' }] });
  assert.equal(single.successCount, 1);
  const root = new Ably.Rest(options(suite.port));
  const history = async (name) => (await root.channels.get(name).history()).items.map((m) => m.data).sort();
  assert.deepEqual(await history('allowed:b1'), ['m1', 'm2']);
  assert.deepEqual(await history('allowed:b2'), ['m3']);
  assert.deepEqual(await history('readonly:b1'), []);
});

test('the older batch API (one spec through rest.request) answers a flat list of outcomes', async () => {
  // Proves POST /messages with a single spec: 201 and one item per channel, or 400/40020
  // with every outcome when some channel failed.
  const rest = new Ably.Rest(options(suite.port, { key: LIMITED_KEY }));
  const ok = await rest.request('POST', '/messages', 2, {}, { channels: ['allowed:o1', 'allowed:o2'], messages: { data: 'x' } }, {});
  assert.equal(ok.statusCode, 201);
  assert.deepEqual(ok.items.map((i) => [i.channel, Boolean(i.messageId), 'error' in i]), [
    ['allowed:o1', true, false],
    ['allowed:o2', true, false],
  ]);
  const partial = await rest.request('POST', '/messages', 2, {}, { channels: ['allowed:o3', 'readonly:o3'], messages: { data: 'x' } }, {});
  assert.equal(partial.statusCode, 400);
  assert.equal(partial.errorCode, 40020);
  assert.equal(partial.items.length, 2);
  assert.equal(partial.items[1].error.code, 40160);
});

test('batchPresence: members per channel, refused channels reported', async () => {
  // Proves the BatchResult of presence reads and the per-channel capability check.
  const member = await connected(suite.realtime({ clientId: 'bp' }));
  await member.channels.get('allowed:p').presence.enter('here');
  const rest = new Ably.Rest(options(suite.port, { key: LIMITED_KEY }));
  const result = await rest.batchPresence(['elsewhere:p', 'allowed:p']);
  assert.equal(result.successCount, 1);
  assert.equal(result.failureCount, 1);
  assert.equal(result.results[0].error.statusCode, 401);
  assert.deepEqual(result.results[1].presence.map((p) => [p.clientId, p.data]), [['bp', 'here']]);
});

test('a REST message with a connection key is published on behalf of that connection', async () => {
  // Proves TM2h: the message carries the realtime connection's id; a bad key is 40006.
  const realtime = await connected(suite.realtime());
  const channel = realtime.channels.get('behalf');
  const received = new Promise((resolve) => channel.subscribe(resolve));
  const rest = new Ably.Rest(options(suite.port));
  await rest.channels.get('behalf').publish({ name: 'n', data: 'd', connectionKey: realtime.connection.key });
  assert.equal((await received).connectionId, realtime.connection.id);
  await assert.rejects(
    rest.channels.get('behalf').publish({ name: 'n', data: 'd', connectionKey: 'abcdef-abcdefghijkl!wrong' }),
    (err) => err.code === 40006,
  );
});

test('in a cluster, batch publish replicates and batch presence reads each channel at its home', async () => {
  // Proves the batch APIs are cluster-correct: any node answers for every channel.
  const cluster = await startRegions({ nodesPerRegion: 2 });
  const clients = [];
  try {
    const hosts = cluster.nodes.map((n) => n.host);
    const rest = (host) => new Ably.Rest(options(cluster.port, { key: DEV_KEY, endpoint: host }));
    const realtime = (host, extra = {}) => {
      const c = new Ably.Realtime(options(cluster.port, { key: DEV_KEY, endpoint: host, ...extra }));
      clients.push(c);
      return c;
    };
    for (const host of hosts) {
      await waitUntil(async () => {
        const body = await (await fetch(`http://${host}:${cluster.adminPort}/regions`)).json();
        return body.regions.reduce((sum, r) => sum + r.nodes.length, 0) === 6;
      }, 20000, `membership on ${host}`);
    }
    const names = Array.from({ length: 8 }, (_, i) => `cb-${i}`);
    const member = await connected(realtime(hosts[0], { clientId: 'everywhere' }));
    for (const name of names) await member.channels.get(name).presence.enter(name);
    const subscriber = await connected(realtime(hosts[4]));
    const got = [];
    for (const name of names) await subscriber.channels.get(name).subscribe((m) => got.push(`${name}:${m.data}`));
    const result = await rest(hosts[3]).batchPublish({ channels: names, messages: [{ data: 'x' }] });
    assert.equal(result.successCount, names.length);
    await waitUntil(() => got.length === names.length, 15000, 'batch messages replicated');
    for (const host of hosts) {
      await waitUntil(async () => {
        const presence = await rest(host).batchPresence(names);
        return presence.successCount === names.length &&
          presence.results.every((r) => r.presence.length === 1 && r.presence[0].data === r.channel);
      }, 15000, `batch presence on ${host}`);
    }
  } finally {
    for (const c of clients) c.close();
    await cluster.stop();
  }
});
