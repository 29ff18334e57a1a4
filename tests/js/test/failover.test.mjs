// Regions as separate processes; one is killed with SIGKILL. Proves what issue 4 asks
// of region failover: clients with fallbackHosts resume on another region with no lost
// and no duplicated message, the dead region's presence members leave everywhere, and
// a publish ACKed just before the kill is not lost (ack_replicas = 1), and GET /regions
// follows membership.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, options, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, REGIONS, startRegions } from '../lib/regions.mjs';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

test('kill -9 a region: its clients fail over with fallbackHosts and resume; its members leave', async () => {
  const cluster = await startRegions();
  const clients = [];
  const client = (host, extra = {}) => {
    const others = REGIONS.map((r) => r.host).filter((h) => h !== host);
    const c = new Ably.Realtime(options(cluster.port, {
      key: DEV_KEY, endpoint: host, fallbackHosts: others, disconnectedRetryTimeout: 300, ...extra,
    }));
    clients.push(c);
    return c;
  };
  try {
    const [east, west, south] = REGIONS.map((r) => r.host);
    const regions = async (host) => {
      const body = await (await fetch(`http://${host}:${cluster.adminPort}/regions`)).json();
      return body.regions.map((r) => [r.region, r.nodes.map((n) => n.endpoint)]);
    };
    // Membership is gossip: a node may announce itself before it has heard of everyone.
    for (let i = 0; i < 100 && (await regions(south)).length < 3; i++) await sleep(50);
    assert.deepEqual(await regions(south), [
      ['ap-south', [`http://${south}:${cluster.port}`]],
      ['eu-west', [`http://${west}:${cluster.port}`]],
      ['us-east', [`http://${east}:${cluster.port}`]],
    ], 'GET /regions lists every live region');
    const subscriber = await connected(client(east));
    const member = await connected(client(east, { clientId: 'doomed', fallbackHosts: [] }));
    const watcher = await connected(client(south));
    const publisher = await connected(client(west));

    const channel = subscriber.channels.get('failover');
    const got = [];
    let firstAfterKill = null;
    let killedAt = null;
    await channel.subscribe((m) => {
      got.push(m.data);
      if (killedAt && firstAfterKill === null) firstAfterKill = Date.now() - killedAt;
    });
    const idBefore = subscriber.connection.id;

    const presence = [];
    await watcher.channels.get('failover').presence.subscribe((p) => presence.push([p.action, p.clientId]));
    await member.channels.get('failover').presence.enter('here');
    await waitUntil(() => presence.some(([a, c]) => a === 'enter' && c === 'doomed'), 10000, 'presence in ap-south');

    const sent = [];
    for (let i = 0; i < 60; i++) {
      sent.push(`m${i}`);
      await publisher.channels.get('failover').publish('n', `m${i}`);
      if (i === 20) {
        killedAt = Date.now();
        cluster.nodes[0].child.kill('SIGKILL');
      }
      await sleep(20);
    }
    await waitUntil(() => got.length >= 60, 30000, 'every message after failover');
    await sleep(500);
    assert.deepEqual(got, sent, 'every message exactly once, in order');
    assert.equal(subscriber.connection.state, 'connected');
    assert.notEqual(subscriber.connection.id, idBefore, 'now connected to another region');
    assert.equal(channel.state, 'attached');
    await waitUntil(() => presence.some(([a, c]) => a === 'leave' && c === 'doomed'), 15000, "the dead region's member to leave");
    for (let i = 0; i < 100 && (await regions(west)).length > 2; i++) await sleep(50);
    assert.deepEqual((await regions(west)).map(([r]) => r), ['ap-south', 'eu-west'], 'the dead region left /regions');
    console.log(`# failover: first message ${firstAfterKill} ms after SIGKILL`);
  } finally {
    for (const c of clients) c.close();
    await cluster.stop();
  }
});

test('publishes ACKed just before their region is killed survive in every other region', async () => {
  const cluster = await startRegions();
  const clients = [];
  try {
    const [east, west, south] = REGIONS.map((r) => r.host);
    const publisher = new Ably.Realtime(options(cluster.port, { key: DEV_KEY, endpoint: east }));
    clients.push(publisher);
    await connected(publisher);
    const channel = publisher.channels.get('durable');
    const sent = Array.from({ length: 50 }, (_, i) => `d${i}`);
    await Promise.all(sent.map((d) => channel.publish('n', d)));
    cluster.nodes[0].child.kill('SIGKILL');
    for (const host of [west, south]) {
      const rest = new Ably.Rest(options(cluster.port, { key: DEV_KEY, endpoint: host }));
      let items = [];
      const deadline = Date.now() + 15000;
      while (items.length < sent.length && Date.now() < deadline) {
        items = (await rest.channels.get('durable').history({ direction: 'forwards', limit: 100 })).items;
        if (items.length < sent.length) await sleep(200);
      }
      assert.deepEqual(items.map((m) => m.data), sent, `${host} has every ACKed message once`);
    }
  } finally {
    for (const c of clients) c.close();
    await cluster.stop();
  }
});
