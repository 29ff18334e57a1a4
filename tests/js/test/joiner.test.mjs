// A node joins a running cluster with one seed and becomes the home (the storage
// replica in its region) of channels that already have history. Reads of those channels
// in its region go to it, so it must hold their whole history: it copies what its store
// lacks from the channels' home in another region, not just the recent events peers keep
// in memory (the channel log is cut to 3 events here). The second test does the same
// for channels idle on every node, so held in no node's memory: the old home hands them
// over from its store.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { options, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, startRegions } from '../lib/regions.mjs';

// The replicator's rendezvous score (FNV-1a over app, 0xfe, channel, 0xff, node id,
// then a splitmix step): which node is a channel's home in its region.
function score(app, channel, node) {
  const M = (1n << 64n) - 1n;
  let h = 0xcbf29ce484222325n;
  const bytes = [...Buffer.from(app), 0xfe, ...Buffer.from(channel), 0xff, ...Buffer.from(node)];
  for (const b of bytes) {
    h ^= BigInt(b);
    h = (h * 0x100000001b3n) & M;
  }
  h ^= h >> 30n;
  h = (h * 0xbf58476d1ce4e5b9n) & M;
  h ^= h >> 27n;
  return h;
}

// Three regions; 10 messages on each of 5 channels, 3 of which the joiner (eu-west-2)
// will be home of; `beforeJoin(cluster)` runs once history is stored in eu-west; then
// eu-west-2 joins, and history read in eu-west (its own and the old home's) has every
// message, then an 11th published after the join, once.
async function joinScenario({ extra, prefix, beforeJoin = async () => {} }) {
  const cluster = await startRegions({ extra });
  const rest = (host) => new Ably.Rest(options(cluster.port, { key: DEV_KEY, endpoint: host }));
  try {
    const names = Array.from({ length: 40 }, (_, i) => `${prefix}-${i}`);
    const joinerHome = names.filter((n) => score('dev', n, 'eu-west-2') > score('dev', n, 'eu-west-1')).slice(0, 3);
    const staysHome = names.filter((n) => !joinerHome.includes(n)).slice(0, 2);
    const channels = [...joinerHome, ...staysHome];
    const sent = Array.from({ length: 10 }, (_, i) => `${prefix}${i}`);
    for (const name of channels) {
      for (const data of sent) await rest('127.0.0.1').channels.get(name).publish('n', data);
    }
    const history = async (host, name) =>
      (await rest(host).channels.get(name).history({ direction: 'forwards' })).items.map((m) => m.data);
    for (const name of channels) {
      await waitUntil(async () => (await history('127.0.0.2', name)).length === 10, 10000, `${name} in eu-west`);
    }
    await beforeJoin(cluster);

    await cluster.addNode(1, 1); // eu-west-2 on 127.1.0.2
    const nodes = async (host) => {
      const body = await (await fetch(`http://${host}:${cluster.adminPort}/regions`)).json();
      return body.regions.reduce((sum, r) => sum + r.nodes.length, 0);
    };
    for (const host of ['127.0.0.1', '127.0.0.2', '127.0.0.3', '127.1.0.2']) {
      await waitUntil(async () => (await nodes(host)) === 4, 20000, `membership on ${host}`);
    }
    for (const name of channels) {
      for (const host of ['127.0.0.2', '127.1.0.2']) {
        let got = [];
        await waitUntil(async () => {
          got = await history(host, name);
          return got.length >= 10;
        }, 15000, `${name} history on ${host} (has ${got.length})`);
        assert.deepEqual(got, sent, `${name} on ${host}`);
      }
    }
    // And the channels go on: a new message is there too, once.
    for (const name of joinerHome) await rest('127.0.0.3').channels.get(name).publish('n', 'after');
    for (const name of joinerHome) {
      await waitUntil(async () => (await history('127.0.0.2', name)).length === 11, 10000, `${name} after join`);
      assert.deepEqual(await history('127.1.0.2', name), [...sent, 'after']);
      assert.deepEqual(await history('127.0.0.2', name), [...sent, 'after']);
    }
  } finally {
    await cluster.stop();
  }
}

test('a joining node that becomes a channel\'s home copies its whole history', () =>
  joinScenario({ extra: '[limits]\nchannel_log_events_max = 3\n', prefix: 'hist' }));

// The metric `tern_channels` (channels held in memory) of the node at `host`.
async function channelsHeld(host, adminPort) {
  const text = await (await fetch(`http://${host}:${adminPort}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith('tern_channels '));
  return line === undefined ? 0 : Number(line.split(' ')[1]);
}

test('a joining node is handed the history of channels idle on every node', () =>
  joinScenario({
    // Idle channels leave memory 2 s after their last event (the connection state TTL).
    extra: '[limits]\nchannel_log_events_max = 3\n[connection]\nconnection_state_ttl_ms = 2000\n',
    prefix: 'idle',
    // No node holds any of them in memory any more.
    beforeJoin: async (cluster) => {
      for (const host of ['127.0.0.1', '127.0.0.2', '127.0.0.3']) {
        await waitUntil(async () => (await channelsHeld(host, cluster.adminPort)) === 0, 20000, `channels dropped on ${host}`);
      }
    },
  }));
