// ably-js REST against tern: time, publish, presence, channel status, error shape.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, options, ternSuite, waitUntil } from '../lib/tern.mjs';

const suite = ternSuite();

for (const binary of [false, true]) {
  const label = binary ? 'msgpack' : 'json';

  test(`[${label}] rest.time() is near the local clock`, async () => {
    // Proves GET /time in both formats.
    const rest = new Ably.Rest(options(suite.port, { binary }));
    assert.ok(Math.abs((await rest.time()) - Date.now()) < 60000);
  });

  test(`[${label}] a REST publish reaches a realtime subscriber; REST presence lists realtime members`, async () => {
    // Proves POST /channels/{ch}/messages and GET /channels/{ch}/presence.
    const rest = new Ably.Rest(options(suite.port, { binary }));
    const rt = await connected(suite.realtime({ clientId: 'rt-user' }));
    const channel = rt.channels.get(`rest-${label}`);
    const got = [];
    await channel.subscribe((m) => got.push(m));
    await channel.presence.enter('present');
    await rest.channels.get(`rest-${label}`).publish('from-rest', { via: 'rest' });
    await waitUntil(() => got.length === 1, 10000, 'REST message');
    assert.deepEqual(got[0].data, { via: 'rest' });
    const members = await rest.channels.get(`rest-${label}`).presence.get();
    assert.deepEqual(members.items.map((m) => [m.clientId, m.data]), [['rt-user', 'present']]);
  });
}

test('REST errors reach the SDK with their Ably code', async () => {
  // Proves the error body + headers ably-js parses (wrong secret → 40101).
  const rest = new Ably.Rest(options(suite.port, { key: 'test.root:wrong' }));
  await assert.rejects(rest.channels.get('x').publish('n', 'd'), (err) => err.code === 40101 && err.statusCode === 401);
});

test('GET /channels/{ch} reports occupancy', async () => {
  // Proves channel status through the SDK's generic request().
  const rt = await connected(suite.realtime());
  await rt.channels.get('occupied').attach();
  const rest = new Ably.Rest(options(suite.port));
  const response = await rest.request('get', '/channels/occupied', 2);
  assert.equal(response.statusCode, 200);
  assert.equal(response.items[0].status.occupancy.metrics.subscribers, 1);
});
