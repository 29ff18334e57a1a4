// Bad-input catalogue, gossip datagrams: each row is one UDP datagram sent to a node's
// gossip port and the exact outcome: dropped before chitchat parses it and counted under
// its reason in `tern_gossip_rejected_total{reason}`; after each row the cluster still
// holds all three regions and replicates a message from us-east to eu-west.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac, randomBytes } from 'node:crypto';
import { createSocket } from 'node:dgram';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import Ably from 'ably';
import { connected, options, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, startRegions } from '../lib/regions.mjs';
import { sample, scrape } from '../lib/metrics.mjs';

let cluster;
let target;
let key;
const clients = [];
const crossed = new Set();
let publisher;
let round = 0;

before(async () => {
  cluster = await startRegions();
  [target] = cluster.nodes;
  key = Buffer.from(readFileSync(join(cluster.dir, 'gossip.key'), 'utf8').trim(), 'hex');
  const realtime = (host) => {
    const c = new Ably.Realtime(options(cluster.port, { key: DEV_KEY, endpoint: host }));
    clients.push(c);
    return c;
  };
  for (const node of cluster.nodes) {
    await waitUntil(async () => (await regionCount(node.host)) === 3, 20000, `membership on ${node.host}`);
  }
  const subscriber = await connected(realtime(cluster.nodes[1].host));
  await subscriber.channels.get('witness').subscribe((m) => crossed.add(m.data));
  publisher = await connected(realtime(target.host));
});
after(async () => {
  for (const c of clients) c.close();
  await cluster.stop();
});

async function regionCount(host) {
  const body = await (await fetch(`http://${host}:${cluster.adminPort}/regions`)).json();
  return body.regions.length;
}

async function rejected(reason) {
  const text = await scrape(target.host, cluster.adminPort);
  return sample(text, 'tern_gossip_rejected_total', { reason }) ?? 0;
}

/// Version 1 datagram: version, send time (ms, big-endian u64), body, HMAC-SHA256 tag.
function seal(body, { version = 1, sentAt = Date.now(), with: secret = key } = {}) {
  const head = Buffer.alloc(9);
  head[0] = version;
  head.writeBigUInt64BE(BigInt(sentAt), 1);
  const signed = Buffer.concat([head, body]);
  return Buffer.concat([signed, createHmac('sha256', secret).update(signed).digest()]);
}

async function send(datagram) {
  const socket = createSocket('udp4');
  await new Promise((resolve, reject) => socket.send(datagram, target.gossip, target.host, (e) => (e ? reject(e) : resolve())));
  socket.close();
}

const ROWS = [
  ['an empty datagram', () => Buffer.alloc(0), 'short'],
  ['40 bytes (shorter than header and tag)', () => Buffer.alloc(40), 'short'],
  ['random bytes', () => randomBytes(600), 'tag'],
  ['the largest UDP payload of random bytes', () => randomBytes(65_507), 'tag'],
  ['sealed with another cluster\'s key', () => seal(Buffer.from('hello'), { with: randomBytes(32) }), 'tag'],
  ['a valid tag over a truncated datagram', () => seal(Buffer.from('hello world')).subarray(0, 50), 'tag'],
  ['authentic but sent 2 minutes ago (a replay)', () => seal(Buffer.from('x'), { sentAt: Date.now() - 120_000 }), 'stale'],
  ['authentic but from 2 minutes in the future', () => seal(Buffer.from('x'), { sentAt: Date.now() + 120_000 }), 'stale'],
  ['authentic with an unknown layout version', () => seal(Buffer.from('x'), { version: 2 }), 'version'],
  ['authentic and fresh, but not a chitchat message', () => seal(randomBytes(200)), 'decode'],
];

for (const [name, datagram, reason] of ROWS) {
  test(`gossip row: ${name} → dropped, counted as "${reason}"`, async () => {
    // Proves the exact rejection reason, and that membership and replication survive it.
    const before = await rejected(reason);
    await send(datagram());
    await waitUntil(async () => (await rejected(reason)) === before + 1, 5000, `${reason} counted once`);
    for (const node of cluster.nodes) assert.equal(await regionCount(node.host), 3, `membership on ${node.host}`);
    round += 1;
    await publisher.channels.get('witness').publish('w', `ok-${round}`);
    await waitUntil(() => crossed.has(`ok-${round}`), 10000, `after ${name}: cross-region delivery`);
  });
}
