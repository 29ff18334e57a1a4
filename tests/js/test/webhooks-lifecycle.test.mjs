// channel.lifecycle and channel.occupancy webhooks (docs/functions.md): opened when the
// first attachment anywhere appears, closed when the last one anywhere goes, occupancy
// on every change, as the cluster sees the channel, from one node.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, options, startTern, testConfig, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, REGIONS, startRegions } from '../lib/regions.mjs';
import { items, startFunction } from '../lib/function.mjs';

const RULE = (port) => `
[[apps.rules]]
id = "meta"
channel_filter = "^room"
events = ["channel.lifecycle", "channel.occupancy"]
url = "http://127.0.0.1:${port}/hook"
batch_window_ms = 20
sign_with_key = "root"
`;

const lifecycle = (fn, channel) => items(fn)
  .filter((i) => i.source === 'channel.lifecycle' && i.data.channelId === channel);
const occupancy = (fn, channel) => items(fn)
  .filter((i) => i.source === 'channel.occupancy' && i.data.channelId === channel);
const lastOccupancy = (fn, channel) => occupancy(fn, channel).at(-1)?.data.status.occupancy.metrics;

test('one node: opened, occupancy on each change, closed; Ably ChannelDetails shapes, signed', async () => {
  // Proves the event shapes and their order on one node: a receiver written against
  // Ably's docs reads channelId, status.isActive and status.occupancy.metrics.
  const fn = await startFunction({ keyName: 'test.root', keySecret: 'rootsecret' });
  const tern = await startTern(testConfig() + RULE(fn.port));
  const a = new Ably.Realtime(options(tern.port, { clientId: 'a' }));
  const b = new Ably.Realtime(options(tern.port, { clientId: 'b' }));
  try {
    await connected(a);
    await connected(b);
    await a.channels.get('room-1').attach();
    await a.channels.get('other').attach(); // the filter leaves it out
    await waitUntil(() => lifecycle(fn, 'room-1').length === 1, 10000, 'channel.opened');
    const [opened] = lifecycle(fn, 'room-1');
    assert.equal(opened.name, 'channel.opened');
    assert.equal(opened.webhookId, 'meta');
    assert.equal(typeof opened.serial, 'string');
    assert.equal(opened.data.status.isActive, true);
    assert.deepEqual(opened.data.status.occupancy.metrics, {
      connections: 1, publishers: 1, subscribers: 1,
      presenceConnections: 0, presenceMembers: 0, presenceSubscribers: 1,
    });

    await b.channels.get('room-1').presence.enter('hi');
    await waitUntil(() => lastOccupancy(fn, 'room-1')?.presenceMembers === 1
      && lastOccupancy(fn, 'room-1')?.connections === 2, 10000, 'occupancy with two connections and a member');
    assert.equal(occupancy(fn, 'room-1').at(-1).name, '[meta]occupancy');

    await a.channels.get('room-1').detach();
    await b.channels.get('room-1').presence.leave();
    await b.channels.get('room-1').detach();
    await waitUntil(() => lifecycle(fn, 'room-1').length === 2, 10000, 'channel.closed');
    const closed = lifecycle(fn, 'room-1')[1];
    assert.equal(closed.name, 'channel.closed');
    assert.equal(closed.data.status.isActive, false);
    assert.equal(closed.data.status.occupancy.metrics.connections, 0);
    assert.equal(items(fn).filter((i) => i.data.channelId === 'other').length, 0);
    assert.equal(new Set(items(fn).map((i) => i.serial)).size, items(fn).length, 'serials are unique');
    assert.equal(fn.badSignatures, 0);
  } finally {
    a.close();
    b.close();
    await tern.stop();
    fn.server.close();
  }
});

function regionOptions(host, port, extra = {}) {
  return {
    key: DEV_KEY, endpoint: host, port, tls: false, disableConnectivityCheck: true,
    fallbackHosts: [], useBinaryProtocol: false, logLevel: 0, ...extra,
  };
}

test('three regions: one channel.opened and one channel.closed for the cluster, occupancy summed', async () => {
  // Proves lifecycle is cluster-wide and delivered once: subscribers in two regions
  // open the channel once (not per node), occupancy counts both, and the channel
  // closes only when the last one anywhere leaves.
  const fn = await startFunction({ keyName: 'dev.root', keySecret: 'dev-secret-change-me' });
  const cluster = await startRegions({ appExtra: RULE(fn.port) });
  const clients = [];
  try {
    for (const region of REGIONS) {
      const client = new Ably.Realtime(regionOptions(region.host, cluster.port, { clientId: region.name }));
      clients.push(client);
      await connected(client);
    }
    // A new cluster's aggregator learns for two report rounds before it emits (what
    // opened meanwhile it takes as announced): wait for it with fresh probe channels.
    for (let probe = 0; ; probe++) {
      assert.ok(probe < 15, 'the aggregator emits within 45 s');
      await clients[0].channels.get(`room-probe-${probe}`).attach();
      const seen = await waitUntil(() => lifecycle(fn, `room-probe-${probe}`).length >= 1, 3000, 'probe')
        .then(() => true, () => false);
      if (seen) break;
    }

    await clients[1].channels.get('room-x').attach();
    await waitUntil(() => lifecycle(fn, 'room-x').length >= 1, 10000, 'channel.opened');
    await clients[2].channels.get('room-x').attach();
    await waitUntil(() => lastOccupancy(fn, 'room-x')?.connections === 2, 10000, 'occupancy from two regions');
    await clients[1].channels.get('room-x').detach();
    await waitUntil(() => lastOccupancy(fn, 'room-x')?.connections === 1, 10000, 'one left');
    assert.equal(lifecycle(fn, 'room-x').length, 1, 'still open while one region has a subscriber');
    await clients[2].channels.get('room-x').detach();
    await waitUntil(() => lifecycle(fn, 'room-x').length >= 2, 10000, 'channel.closed');
    // Copies from other nodes would follow within a report round: wait for them.
    await new Promise((r) => setTimeout(r, 2500));
    assert.deepEqual(lifecycle(fn, 'room-x').map((i) => i.name), ['channel.opened', 'channel.closed']);
    const sites = new Set(items(fn).map((i) => i.data.site));
    assert.equal(sites.size, 1, `one node delivers: ${[...sites]}`);
    assert.equal(fn.badSignatures, 0);
  } finally {
    for (const client of clients) client.close();
    await cluster.stop();
    fn.server.close();
  }
});
