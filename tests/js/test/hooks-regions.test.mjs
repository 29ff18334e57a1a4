// $disconnect when the node holding connections dies (docs/functions.md): three regions
// as separate `tern serve` processes; one is killed with SIGKILL; a survivor reports its
// connections as connection.disconnected ("node_lost"), each once by id.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, startRegions } from '../lib/regions.mjs';
import { startHookFunction } from '../lib/hook-function.mjs';

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

test('a node killed with SIGKILL: a survivor reports its connections as node_lost, once each', async () => {
  // Proves: the connections open (and parked) on a node that dies are reported by one
  // survivor, with the connection's stable id, clientId and reason "node_lost"; a
  // connection closed on it before it died is reported once, as "closed", by it; the
  // survivors' own connections are not reported.
  const fn = await startHookFunction({ keyName: 'dev.root', keySecret: 'dev-secret-change-me', decide: () => ({}) });
  const cluster = await startRegions({
    appExtra: `
[[apps.rules]]
id = "conns"
events = ["connection.disconnected"]
url = "http://127.0.0.1:${fn.port}/hook"
batch_window_ms = 20
sign_with_key = "root"
`,
  });
  const clients = [];
  const events = () => fn.requests.filter((r) => r.path === '/hook').flatMap((r) => r.json.items);
  try {
    const [east, west] = cluster.nodes;
    const open = (node, clientId) => {
      const c = new Ably.Realtime(clientOptions(node.host, cluster.port, { clientId, disconnectedRetryTimeout: 600000 }));
      clients.push(c);
      return connected(c);
    };
    const doomed = await Promise.all([open(west, 'w1'), open(west, 'w2')]);
    const closedEarly = await open(west, 'w3');
    const survivor = await open(east, 'e1');
    const doomedIds = doomed.map((c) => c.connection.id);
    const closedId = closedEarly.connection.id;
    closedEarly.close();
    await waitUntil(() => events().some((e) => e.data.connectionId === closedId), 10000, 'the close event');
    // The records of the open connections reach the survivors before the kill.
    await new Promise((r) => setTimeout(r, 1500));

    await west.stop('SIGKILL');
    await waitUntil(
      () => doomedIds.every((id) => events().some((e) => e.data.connectionId === id)),
      60000,
      'node_lost events for the dead node\'s connections',
    );
    await new Promise((r) => setTimeout(r, 2000));

    assert.equal(fn.badSignatures, 0);
    for (const [i, id] of doomedIds.entries()) {
      const mine = events().filter((e) => e.data.connectionId === id);
      assert.equal(mine.length, 1, `${id} reported once`);
      assert.equal(mine[0].serial, `${id}:disconnected`);
      assert.equal(mine[0].data.reason, 'node_lost');
      assert.equal(mine[0].data.clientId, `w${i + 1}`);
      assert.notEqual(mine[0].data.site, 'eu-west', 'reported by a survivor');
    }
    const closed = events().filter((e) => e.data.connectionId === closedId);
    assert.equal(closed.length, 1, 'closed before the kill: reported once');
    assert.equal(closed[0].data.reason, 'closed');
    assert.equal(events().filter((e) => e.data.connectionId === survivor.connection.id).length, 0);
  } finally {
    for (const c of clients) c.close();
    await cluster.stop();
    await fn.stop();
  }
});
