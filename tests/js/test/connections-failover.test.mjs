// Per-connection push when the node holding a connection dies (regions as separate
// processes, one killed with SIGKILL): pushes to the dead node's connection ids are
// never answered 201 (504 while gossip still lists the node, then 404/80022), the
// client fails over to another region with a new id, its re-attach of the old id's
// channel is refused (nothing can vouch for it: the old node is gone), and the app's
// `connected` handler subscribes under the new id, which a backend reaches from any
// region.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, options, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, REGIONS, startRegions } from '../lib/regions.mjs';

const AUTH = `Basic ${Buffer.from(DEV_KEY).toString('base64')}`;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function post(host, port, id, data) {
  const response = await fetch(`http://${host}:${port}/connections/${id}/messages`, {
    method: 'POST',
    headers: { authorization: AUTH, 'content-type': 'application/json' },
    body: JSON.stringify({ data }),
    signal: AbortSignal.timeout(15000),
  });
  const text = await response.text();
  return { status: response.status, code: text ? JSON.parse(text).error?.code : undefined };
}

test('kill -9 the node holding a connection: its id is gone, the new id works from any region', async () => {
  const cluster = await startRegions();
  const [east, west, south] = REGIONS.map((r) => r.host);
  const realtime = new Ably.Realtime(options(cluster.port, {
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
    await connected(realtime);
    const oldId = realtime.connection.id;
    await waitUntil(() => realtime.channels.get(`[connection]${oldId}`).state === 'attached', 10000, 'own channel attached');
    assert.equal((await post(south, cluster.port, oldId, 'before')).status, 201);
    await waitUntil(() => got.length === 1, 10000, 'first push');

    cluster.nodes[0].child.kill('SIGKILL');
    await waitUntil(() => realtime.connection.state === 'connected' && realtime.connection.id !== oldId, 30000, 'failover');
    const newId = realtime.connection.id;
    assert.notEqual(newId.split('-')[0], oldId.split('-')[0], 'held by another node');

    // The dead node's id: never 201; 504 until gossip declares it dead, then 404.
    const answers = [];
    const deadline = Date.now() + 20000;
    for (;;) {
      const answer = await post(south, cluster.port, oldId, 'lost');
      answers.push(`${answer.status}/${answer.code}`);
      if (answer.status === 404) break;
      assert.ok(Date.now() < deadline, `the dead node's id never became 404: ${answers}`);
      await sleep(200);
    }
    for (const answer of answers) assert.ok(['504/50003', '404/80022'].includes(answer), answer);
    console.log(`the dead node's id answered: ${answers.join(' ')}`);
    await waitUntil(() => realtime.channels.get(`[connection]${oldId}`).state === 'failed', 10000, 'old channel refused');
    assert.equal(realtime.channels.get(`[connection]${oldId}`).errorReason.code, 40160);

    await waitUntil(() => realtime.channels.get(`[connection]${newId}`).state === 'attached', 10000, 'new own channel attached');
    for (const host of [west, south]) assert.equal((await post(host, cluster.port, newId, `after-${host}`)).status, 201);
    await waitUntil(() => got.length >= 3, 10000, 'pushes to the new id');
    await sleep(300);
    assert.deepEqual(got, [[oldId, 'before'], [newId, `after-${west}`], [newId, `after-${south}`]]);
  } finally {
    realtime.close();
    await cluster.stop();
  }
});
