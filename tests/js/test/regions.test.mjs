// `tern dev`: three regions in one process replicating over mutual-TLS QUIC. ably-js
// clients in different regions exchange messages and presence; history is readable in
// every region.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, options, startTern, waitUntil } from '../lib/tern.mjs';
import { startProxy } from '../lib/proxy.mjs';

const DEV_KEY = 'dev.root:dev-secret-change-me';
let tern;
const clients = [];
const client = (port, extra = {}) => {
  const c = new Ably.Realtime(options(port, { key: DEV_KEY, ...extra }));
  clients.push(c);
  return c;
};

before(async () => { tern = await startTern('', { args: ['dev', '--port', '0'], listening: 3 }); });
after(async () => {
  for (const c of clients) c.close();
  await tern.stop();
});

test('messages published in one region reach subscribers in every other, in order, once', async () => {
  // Proves full-mesh replication: per-origin order, no duplicates, both formats.
  const [east, west, south] = tern.ports;
  const publisher = await connected(client(east));
  const subscribers = [await connected(client(west)), await connected(client(south, { binary: true }))];
  const got = [[], []];
  for (const [i, s] of subscribers.entries()) await s.channels.get('global').subscribe((m) => got[i].push(m.data));
  const sent = [];
  for (let i = 0; i < 30; i++) {
    sent.push(`g${i}`);
    await publisher.channels.get('global').publish('n', `g${i}`);
  }
  await waitUntil(() => got.every((g) => g.length >= 30), 15000, 'cross-region delivery');
  await new Promise((r) => setTimeout(r, 200));
  for (const g of got) assert.deepEqual(g, sent);
});

test('presence entered in one region is visible in all; history is readable in any', async () => {
  // Proves presence events and history replicate with the messages.
  const [east, west, south] = tern.ports;
  const member = await connected(client(west, { clientId: 'traveller' }));
  await member.channels.get('lobby').presence.enter('hi');
  await member.channels.get('lobby').publish('n', 'stored');
  for (const port of [east, south]) {
    const watcher = await connected(client(port));
    let members = [];
    const deadline = Date.now() + 10000;
    while (members.length === 0 && Date.now() < deadline) {
      members = await watcher.channels.get('lobby').presence.get();
      if (members.length === 0) await new Promise((r) => setTimeout(r, 100));
    }
    assert.deepEqual(members.map((m) => [m.clientId, m.data]), [['traveller', 'hi']]);
    const rest = new Ably.Rest(options(port, { key: DEV_KEY }));
    const page = await rest.channels.get('lobby').history();
    assert.deepEqual(page.items.map((m) => m.data), ['stored']);
  }
});

test('a client moved to another region mid-stream resumes its channel: every message once', async () => {
  // Proves failover continuity: the connection is new in the other region, but the
  // channelSerial (a cursor valid in every region) resumes the channel with RESUMED and
  // exactly the messages it missed.
  const [east, west] = tern.ports;
  const proxy = await startProxy(east);
  try {
    const subscriber = await connected(client(proxy.port, { disconnectedRetryTimeout: 200 }));
    const publisher = await connected(client(east));
    const channel = subscriber.channels.get('failover');
    const got = [];
    const changes = [];
    channel.on((change) => changes.push(change));
    await channel.subscribe((m) => got.push(m.data));
    const sent = [];
    for (let i = 0; i < 40; i++) {
      sent.push(`f${i}`);
      await publisher.channels.get('failover').publish('n', `f${i}`);
      if (i === 15) {
        proxy.retarget(west);
        proxy.dropAll();
      }
    }
    await waitUntil(() => got.length >= 40, 20000, 'all 40 messages after failover');
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(got, sent);
    const reattached = changes.filter((c) => c.current === 'attached').at(-1);
    assert.equal(reattached.resumed, true);
    assert.equal(subscriber.connection.errorReason?.code, 80008, 'the connection itself is new there');
  } finally {
    proxy.close();
  }
});
