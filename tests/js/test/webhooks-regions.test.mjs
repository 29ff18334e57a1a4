// Outbound webhooks over three regions (separate `tern serve` processes): the same rule
// on every node, yet each event reaches the function once, from the node that
// accepted it (docs/functions.md, "Who delivers").
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, REGIONS, startRegions } from '../lib/regions.mjs';
import { items, startFunction } from '../lib/function.mjs';

function clientOptions(host, port, extra = {}) {
  return {
    key: DEV_KEY,
    endpoint: host,
    port,
    tls: false,
    disableConnectivityCheck: true,
    fallbackHosts: [],
    useBinaryProtocol: false,
    logLevel: 0,
    ...extra,
  };
}

test('each region publishes; every message reaches the function once, not once per node', async () => {
  // Proves the delivery rule: only an event's origin records it in an outbox, so a
  // rule configured on every node still invokes the function once per event, with the
  // origin's region as `site`.
  const fn = await startFunction({ keyName: 'dev.root', keySecret: 'dev-secret-change-me' });
  const cluster = await startRegions({
    appExtra: `
[[apps.rules]]
id = "everywhere"
events = ["channel.message", "channel.presence"]
url = "http://127.0.0.1:${fn.port}/hook"
batch_window_ms = 20
sign_with_key = "root"
`,
  });
  const clients = [];
  try {
    // A subscriber in every region, so every node holds the channel and its events.
    for (const region of REGIONS) {
      const client = new Ably.Realtime(clientOptions(region.host, cluster.port, { clientId: region.name }));
      clients.push(client);
      await connected(client);
      await client.channels.get('shared').attach();
    }
    const perRegion = 10;
    for (const [r, client] of clients.entries()) {
      const channel = client.channels.get('shared');
      for (let i = 0; i < perRegion; i++) await channel.publish('n', `${REGIONS[r].name}-${i}`);
    }
    await clients[1].channels.get('shared').presence.enter('hi');
    const total = perRegion * REGIONS.length;
    const messageItems = () => items(fn).filter((i) => i.source === 'channel.message');
    await waitUntil(() => messageItems().length >= total
      && items(fn).some((i) => i.source === 'channel.presence'), 20000, `${total} webhooks`);
    // Copies from other nodes would arrive within a batch window or two: wait for them.
    await new Promise((r) => setTimeout(r, 1000));

    assert.equal(fn.badSignatures, 0);
    assert.equal(messageItems().length, total, 'once per message, not once per node');
    const bySite = {};
    for (const item of messageItems()) {
      const [message] = await Ably.Realtime.Message.fromEncodedArray(item.data.messages);
      assert.ok(message.data.startsWith(`${item.data.site}-`), `${message.data} delivered from ${item.data.site}`);
      bySite[item.data.site] = (bySite[item.data.site] || 0) + 1;
    }
    assert.deepEqual(bySite, { 'us-east': perRegion, 'eu-west': perRegion, 'ap-south': perRegion });
    const presence = items(fn).filter((i) => i.source === 'channel.presence');
    assert.equal(presence.length, 1);
    assert.equal(presence[0].data.site, 'eu-west');
  } finally {
    for (const client of clients) client.close();
    await cluster.stop();
    fn.server.close();
  }
});
