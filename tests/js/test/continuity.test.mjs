// ably-js continuity against tern: history paging, untilAttach, rewind, resume through a
// dropped transport, resume after the state TTL, recover, idempotent REST publish.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, once, options, ternSuite, testConfig, waitUntil } from '../lib/tern.mjs';
import { startProxy } from '../lib/proxy.mjs';

const suite = ternSuite(testConfig({ connection: 'connection_state_ttl_ms = 3000\npresence_leave_grace_ms = 3000' }));
const realtime = (extra, port) => suite.realtime(extra, port);

for (const binary of [false, true]) {
  const label = binary ? 'msgpack' : 'json';

  test(`[${label}] history pages backwards and forwards through every message once`, async () => {
    // Proves GET /channels/{ch}/messages with limit, direction and Link paging.
    const rest = new Ably.Rest(options(suite.port, { binary }));
    const channel = rest.channels.get(`history-${label}`);
    const sent = [];
    for (let i = 0; i < 7; i++) {
      sent.push(`m${i}`);
      await channel.publish('n', `m${i}`);
    }
    for (const [direction, expected] of [['backwards', [...sent].reverse()], ['forwards', sent]]) {
      let page = await channel.history({ limit: 3, direction });
      const seen = page.items.map((m) => m.data);
      while (page.hasNext()) {
        page = await page.next();
        seen.push(...page.items.map((m) => m.data));
      }
      assert.deepEqual(seen, expected, direction);
    }
    const one = (await channel.history({ limit: 1 })).items[0];
    assert.ok(one.id && one.timestamp && one.serial);
  });

  test(`[${label}] history({untilAttach}) ends at the point of attachment`, async () => {
    // Proves from_serial: the attachSerial maps to a history position.
    const client = await connected(realtime({ binary }));
    const publisher = new Ably.Rest(options(suite.port, { binary }));
    const name = `until-${label}`;
    await publisher.channels.get(name).publish('n', 'before-1');
    await publisher.channels.get(name).publish('n', 'before-2');
    const channel = client.channels.get(name);
    await channel.attach();
    await publisher.channels.get(name).publish('n', 'after');
    const page = await channel.history({ untilAttach: true });
    assert.deepEqual(page.items.map((m) => m.data), ['before-2', 'before-1']);
  });
}

test('presence history lists enter, update and leave', async () => {
  // Proves GET /channels/{ch}/presence/history.
  const client = await connected(realtime({ clientId: 'historian' }));
  const channel = client.channels.get('presence-history');
  await channel.presence.enter('a');
  await channel.presence.update('b');
  await channel.presence.leave();
  const rest = new Ably.Rest(options(suite.port));
  const page = await rest.channels.get('presence-history').presence.history({ direction: 'forwards' });
  assert.deepEqual(page.items.map((m) => [m.action, m.clientId, m.data]), [
    ['enter', 'historian', 'a'], ['update', 'historian', 'b'], ['leave', 'historian', undefined],
  ]);
});

for (const binary of [false, true]) {
  const label = binary ? 'msgpack' : 'json';

  test(`[${label}] rewind by count and by time replays before live traffic, once, in order`, async () => {
    // Proves the rewind param and the [?rewind=N] qualifier with HAS_BACKLOG.
    const rest = new Ably.Rest(options(suite.port, { binary }));
    for (let i = 0; i < 5; i++) await rest.channels.get(`rewind-${label}`).publish('n', `r${i}`);
    const client = await connected(realtime({ binary }));
    const byCount = client.channels.get(`rewind-${label}`, { params: { rewind: '3' } });
    const got = [];
    await byCount.subscribe((m) => got.push(m.data));
    await rest.channels.get(`rewind-${label}`).publish('n', 'live');
    await waitUntil(() => got.length === 4, 10000, 'rewind backlog + live');
    assert.deepEqual(got, ['r2', 'r3', 'r4', 'live']);

    const other = await connected(realtime({ binary }));
    const byTime = other.channels.get(`[?rewind=1m]rewind-${label}`);
    const timed = [];
    await byTime.subscribe((m) => timed.push(m.data));
    await waitUntil(() => timed.length === 6, 10000, 'rewind by time');
    assert.deepEqual(timed, ['r0', 'r1', 'r2', 'r3', 'r4', 'live']);
  });

  test(`[${label}] a transport dropped mid-stream resumes: every message exactly once, resumed true`, async () => {
    // Proves resume=<connectionKey> + re-ATTACH with channelSerial → RESUMED + backlog.
    const proxy = await startProxy(suite.port);
    try {
      const subscriber = await connected(realtime({ binary, disconnectedRetryTimeout: 200 }, proxy.port));
      const publisher = await connected(realtime({ binary }));
      const channel = subscriber.channels.get(`resume-${label}`);
      const got = [];
      const changes = [];
      channel.on((change) => changes.push(change));
      await channel.subscribe((m) => got.push(m.data));
      const idBefore = subscriber.connection.id;
      const sent = [];
      for (let i = 0; i < 60; i++) {
        sent.push(`m${i}`);
        await publisher.channels.get(`resume-${label}`).publish('n', `m${i}`);
        if (i === 20) proxy.dropAll();
      }
      await waitUntil(() => got.length >= 60, 20000, 'all 60 messages');
      await new Promise((r) => setTimeout(r, 200));
      assert.deepEqual(got, sent);
      assert.equal(subscriber.connection.id, idBefore);
      const reattached = changes.filter((c) => c.current === 'attached').at(-1);
      assert.equal(reattached.resumed, true);
    } finally {
      proxy.close();
    }
  });
}

test('resuming after the connection state TTL gets a new connection and resumed false', async () => {
  // Proves expired state → 80008 and re-attach without RESUMED (TTL is 3 s here).
  const proxy = await startProxy(suite.port);
  try {
    const subscriber = await connected(realtime({ disconnectedRetryTimeout: 500, suspendedRetryTimeout: 500 }, proxy.port));
    const channel = subscriber.channels.get('expire');
    const changes = [];
    channel.on((change) => changes.push(change));
    await channel.attach();
    const idBefore = subscriber.connection.id;
    proxy.pause(true);
    proxy.dropAll();
    await once(subscriber.connection, 'disconnected');
    await new Promise((r) => setTimeout(r, 4500));
    proxy.pause(false);
    const change = await once(subscriber.connection, 'connected', 20000);
    assert.notEqual(subscriber.connection.id, idBefore);
    assert.equal(change.reason?.code, 80008);
    await waitUntil(() => changes.some((c) => c.current === 'attached' && c !== changes[0]), 10000, 're-attach');
    const reattached = changes.filter((c) => c.current === 'attached').at(-1);
    assert.equal(reattached.resumed, false);
  } finally {
    proxy.close();
  }
});

test('recover with createRecoveryKey() in a new client continues the connection and channel', async () => {
  // Proves recover=<key> and re-attach with the recovered channelSerial.
  const first = await connected(realtime());
  const channel = first.channels.get('recover');
  await channel.attach();
  const recoveryKey = first.connection.createRecoveryKey();
  const idBefore = first.connection.id;
  first.connection.connectionManager.disconnectAllTransports();
  await once(first.connection, 'disconnected');
  first.close();
  const rest = new Ably.Rest(options(suite.port));
  await rest.channels.get('recover').publish('n', 'missed-1');
  await rest.channels.get('recover').publish('n', 'missed-2');
  const second = await connected(realtime({ recover: recoveryKey }));
  assert.equal(second.connection.id, idBefore);
  const recovered = second.channels.get('recover');
  const got = [];
  await recovered.subscribe((m) => got.push(m.data));
  await waitUntil(() => got.length === 2, 10000, 'missed messages');
  assert.deepEqual(got, ['missed-1', 'missed-2']);
});

test('idempotent REST publishing: a retried publish is delivered once with the same serial', async () => {
  // Proves de-duplication by client-supplied message id.
  const client = await connected(realtime());
  const got = [];
  await client.channels.get('idem').subscribe((m) => got.push(m.data));
  const rest = new Ably.Rest(options(suite.port, { idempotentRestPublishing: true }));
  const message = { id: 'abcdefghijkl:0', name: 'n', data: 'once' };
  await rest.channels.get('idem').publish([message]);
  await rest.channels.get('idem').publish([message]);
  await rest.channels.get('idem').publish('n', 'twice-is-fine');
  await waitUntil(() => got.length === 2, 10000, 'two deliveries');
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(got, ['once', 'twice-is-fine']);
});
