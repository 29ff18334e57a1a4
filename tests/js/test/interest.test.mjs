// Two nodes per region as separate processes. A channel reaches a node only while it has
// subscribers there or is the channel's home in that region; whichever node an ably-js
// client lands on, it sees the whole channel: live messages once and in order, presence
// members, and full REST history and presence (served by the channel's home when the
// node it lands on does not keep the channel).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, options, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, startRegions } from '../lib/regions.mjs';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

test('every node serves the whole channel, whether or not it receives it', async () => {
  const cluster = await startRegions({ nodesPerRegion: 2 });
  const clients = [];
  const realtime = (host, extra = {}) => {
    const c = new Ably.Realtime(options(cluster.port, { key: DEV_KEY, endpoint: host, ...extra }));
    clients.push(c);
    return c;
  };
  const rest = (host) => new Ably.Rest(options(cluster.port, { key: DEV_KEY, endpoint: host }));
  try {
    const hosts = cluster.nodes.map((n) => n.host);
    const nodeCount = async (host) => {
      const body = await (await fetch(`http://${host}:${cluster.adminPort}/regions`)).json();
      return body.regions.reduce((sum, r) => sum + r.nodes.length, 0);
    };
    for (const host of hosts) {
      await waitUntil(async () => (await nodeCount(host)) === 6, 20000, `membership on ${host}`);
    }
    const [east1, , , east2, west2] = hosts;
    const member = await connected(realtime(east1, { clientId: 'alice' }));
    await member.channels.get('shared').presence.enter('here');

    const subscribers = [await connected(realtime(east2)), await connected(realtime(west2, { binary: true }))];
    const got = subscribers.map(() => []);
    for (const [i, s] of subscribers.entries()) {
      const channel = s.channels.get('shared');
      await channel.subscribe((m) => got[i].push(m.data));
      const members = await channel.presence.get();
      assert.deepEqual(members.map((m) => m.clientId), ['alice'], `presence on attach at ${i}`);
    }
    const sent = [];
    for (let i = 0; i < 5; i++) {
      sent.push(`s${i}`);
      await rest(east1).channels.get('shared').publish('n', `s${i}`);
    }
    await waitUntil(() => got.every((g) => g.length >= 5), 15000, 'delivery to both subscribers');
    await sleep(300);
    for (const g of got) assert.deepEqual(g, sent);

    for (const host of hosts) {
      const channel = rest(host).channels.get('shared');
      let items = [];
      await waitUntil(async () => {
        items = (await channel.history({ direction: 'forwards' })).items.map((m) => m.data);
        return items.length >= 5;
      }, 10000, `history on ${host}`);
      assert.deepEqual(items, sent, `history on ${host}`);
      const members = (await channel.presence.get()).items;
      assert.deepEqual(members.map((m) => m.clientId), ['alice'], `presence on ${host}`);
    }
  } finally {
    for (const c of clients) c.close();
    await cluster.stop();
  }
});
