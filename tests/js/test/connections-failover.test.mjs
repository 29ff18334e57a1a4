// Per-connection push when the node holding a connection dies (regions as separate
// processes, one killed with SIGKILL). The client reaches each region through a proxy
// of ours on that region's address (one port for all, as ably-js's fallbackHosts need),
// so its transport can be cut while the holder is still alive: pushes are acknowledged
// (201, on `ack_replicas = 1`) for the parked connection, then the holder is killed and
// the client fails over to another region. Its new node cannot reach the dead one, but
// the resume key's signature vouches for the client, so the new connection owns the old
// id's channel and ably-js's re-attach resumes it: every acknowledged push arrives
// exactly once. The dead node's id is never answered 201 after the kill (504 while
// gossip still lists the node, then 404/80022), and the app's `connected` handler
// subscribes under the new id, which a backend reaches from any region.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import Ably from 'ably';
import { options, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, REGIONS, startRegions } from '../lib/regions.mjs';

const AUTH = `Basic ${Buffer.from(DEV_KEY).toString('base64')}`;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// One push; `{ status, code }`, or status 0 when the request itself failed.
async function post(host, port, id, data) {
  try {
    const response = await fetch(`http://${host}:${port}/connections/${id}/messages`, {
      method: 'POST',
      headers: { authorization: AUTH, 'content-type': 'application/json' },
      body: JSON.stringify({ data }),
      signal: AbortSignal.timeout(15000),
    });
    const text = await response.text();
    return { status: response.status, code: response.status === 201 ? undefined : JSON.parse(text).error?.code };
  } catch {
    return { status: 0 };
  }
}

/// A TCP proxy on `host:port` to `host:target`; while closed (`open = false`) it
/// refuses new connections; `cut()` drops the live ones.
function proxy(host, port, target) {
  const sockets = new Set();
  const state = { open: true };
  const server = net.createServer((client) => {
    if (!state.open) { client.destroy(); return; }
    const upstream = net.connect(target, host);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => { client.destroy(); upstream.destroy(); sockets.delete(s); });
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve(Object.assign(state, {
      cut() { for (const s of sockets) s.destroy(); },
      close() { this.cut(); server.close(); },
    })));
  });
}

/// Proxies for every region on one free port.
async function regionProxies(target) {
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = 20000 + Math.floor(Math.random() * 30000);
    const made = [];
    try {
      for (const r of REGIONS) made.push(await proxy(r.host, port, target));
      return { port, proxies: made };
    } catch {
      for (const p of made) p.close();
    }
  }
  throw new Error('no port free on every region address');
}

test('kill -9 the node holding a parked connection: every 201 arrives once; the new id works', async () => {
  const cluster = await startRegions();
  const [east, west, south] = REGIONS.map((r) => r.host);
  const { port, proxies } = await regionProxies(cluster.port);
  const realtime = new Ably.Realtime(options(port, {
    key: DEV_KEY, endpoint: east, fallbackHosts: [west, south], disconnectedRetryTimeout: 300,
  }));
  try {
    // What an app writes: subscribe to its own channel on every new connection id.
    const got = [];
    let own;
    realtime.connection.on('connected', () => {
      if (realtime.connection.id === own) return;
      own = realtime.connection.id;
      const id = own;
      realtime.channels.get(`[connection]${id}`).subscribe((m) => got.push([id, m.data]));
    });
    await waitUntil(() => realtime.connection.state === 'connected', 10000, 'connected');
    const oldId = realtime.connection.id;
    await waitUntil(() => realtime.channels.get(`[connection]${oldId}`).state === 'attached', 10000, 'own channel attached');
    assert.equal((await post(south, cluster.port, oldId, 'live')).status, 201);
    await waitUntil(() => got.length === 1, 10000, 'a live push');

    // Cut the client off every region; its connection is parked on the holder.
    for (const p of proxies) { p.open = false; p.cut(); }
    await waitUntil(async () => {
      const r = await fetch(`http://${south}:${cluster.port}/connections/${oldId}`, { headers: { authorization: AUTH } });
      return (await r.json()).state === 'disconnected';
    }, 10000, 'parked');
    const acked = ['live'];
    for (let i = 0; i < 20; i++) {
      const answer = await post(south, cluster.port, oldId, `parked-${i}`);
      assert.equal(answer.status, 201);
      acked.push(`parked-${i}`);
    }

    // The holder dies; the client may come back, to the other regions only.
    cluster.nodes[0].child.kill('SIGKILL');
    proxies[1].open = true;
    proxies[2].open = true;
    const after = [];
    for (let i = 0; ; i++) {
      const answer = await post(south, cluster.port, oldId, `dead-${i}`);
      after.push(`${answer.status}/${answer.code}`);
      if (answer.status === 404) break;
      assert.ok(['504/50003', '0/undefined'].includes(after.at(-1)) && i < 200, `after the kill: ${after}`);
      await sleep(100);
    }
    assert.equal(after.at(-1), '404/80022');

    await waitUntil(() => realtime.connection.state === 'connected' && realtime.connection.id !== oldId, 30000, 'failover');
    const newId = realtime.connection.id;
    await waitUntil(() => acked.every((d) => got.some(([id, data]) => id === oldId && data === d)), 20000, 'every acknowledged push after the failover');
    await sleep(500);
    assert.deepEqual(got.filter(([id]) => id === oldId).map(([, data]) => data), acked, 'every 201 once, in order, nothing else');
    assert.equal(realtime.channels.get(`[connection]${oldId}`).state, 'attached', 'the old channel resumed on the new node');

    await waitUntil(() => realtime.channels.get(`[connection]${newId}`).state === 'attached', 10000, 'new own channel attached');
    for (const host of [west, south]) assert.equal((await post(host, cluster.port, newId, `after-${host}`)).status, 201);
    await waitUntil(() => got.filter(([id]) => id === newId).length >= 2, 10000, 'pushes to the new id');
    assert.deepEqual(got.filter(([id]) => id === newId).map(([, data]) => data), [`after-${west}`, `after-${south}`]);
    console.log(`${acked.length} pushes acknowledged (${acked.length - 1} while parked), all delivered once after the holder died; the dead id then answered ${after.join(' ')}`);
  } finally {
    realtime.close();
    for (const p of proxies) p.close();
    await cluster.stop();
  }
});
