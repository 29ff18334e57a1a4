// A channel that sits idle on the node where it is published is dropped from that
// node's memory after `connection_state_ttl_ms`, while a subscriber in another region
// keeps the channel (and its cursor) alive there. Publishing again on the idle node
// must continue the channel where it left off: a sequence that restarted at 1 would be
// taken for duplicates by every node that still holds the channel, and lost.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, options, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, REGIONS, startRegions } from '../lib/regions.mjs';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

test('a publisher node that dropped an idle channel continues its sequence; remote subscribers get everything', async () => {
  const cluster = await startRegions({ extra: '[connection]\nconnection_state_ttl_ms = 1500\n' });
  const [east, west] = REGIONS.map((r) => r.host);
  const subscriber = new Ably.Realtime(options(cluster.port, { key: DEV_KEY, endpoint: west }));
  try {
    await connected(subscriber);
    const got = [];
    await subscriber.channels.get('idle').subscribe((m) => got.push(m.data));
    const rest = new Ably.Rest(options(cluster.port, { key: DEV_KEY, endpoint: east }));
    const channel = rest.channels.get('idle');
    await channel.publish('n', 'before');
    await waitUntil(() => got.length >= 1, 10000, 'first message in eu-west');
    // us-east holds no attachment on the channel: after the TTL (plus a sweep) it is gone
    // from us-east's memory, while eu-west keeps it for its subscriber.
    await sleep(4000);
    await channel.publish('n', 'after');
    await waitUntil(() => got.length >= 2, 10000, 'message published after the idle period');
    await sleep(300);
    assert.deepEqual(got, ['before', 'after']);
    const history = await new Ably.Rest(options(cluster.port, { key: DEV_KEY, endpoint: west }))
      .channels.get('idle').history({ direction: 'forwards' });
    assert.deepEqual(history.items.map((m) => m.data), ['before', 'after']);
  } finally {
    subscriber.close();
    await cluster.stop();
  }
});
