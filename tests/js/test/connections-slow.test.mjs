// A push forwarded to the node holding the connection, where the holder's answer takes
// longer than 5 s: it waits for a replica in another region (`ack_replicas = 1`) while
// every node of the other regions is stopped (SIGSTOP) for 7 s. The forwarding node
// waits for the holder's own deadline (`forward::answer_within`: the replica-ack wait
// and the functions' timeouts, plus a margin) and answers 201, not a 504 for a push the
// holder then accepts (a backend retrying that 504 would push the message twice); the
// connection receives it once. Two nodes per region as separate `tern serve`
// processes (tests/js/lib/regions.mjs), failure detection slowed so the stopped nodes
// are not declared dead meanwhile.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, options, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, startRegions } from '../lib/regions.mjs';

const AUTH = `Basic ${Buffer.from(DEV_KEY).toString('base64')}`;
const STOPPED_MS = 7000;

test('a forwarded push whose holder waits 7 s for a remote replica is answered 201 and arrives once', async () => {
  const cluster = await startRegions({ nodesPerRegion: 2, extra: 'failure_detection_ms = 30000' });
  // nodes: us-east-1, eu-west-1, ap-south-1, us-east-2, eu-west-2, ap-south-2
  const [holder, west1, south1, forwarder, west2, south2] = cluster.nodes;
  const remote = [west1, south1, west2, south2];
  const realtime = new Ably.Realtime(options(cluster.port, { key: DEV_KEY, endpoint: holder.host }));
  let stopped = false;
  const resume = () => {
    if (!stopped) return;
    stopped = false;
    for (const node of remote) node.child.kill('SIGCONT');
  };
  try {
    await connected(realtime);
    const got = [];
    const id = realtime.connection.id;
    await realtime.channels.get(`[connection]${id}`).subscribe((m) => got.push(m.data));
    // The channel is warm everywhere: one push before the stop.
    const push = (data) => fetch(`http://${forwarder.host}:${cluster.port}/connections/${id}/messages`, {
      method: 'POST',
      headers: { authorization: AUTH, 'content-type': 'application/json' },
      body: JSON.stringify({ name: 'n', data }),
    });
    assert.equal((await push('before')).status, 201);
    await waitUntil(() => got.length === 1, 5000, 'the first push');

    for (const node of remote) node.child.kill('SIGSTOP');
    stopped = true;
    const timer = setTimeout(resume, STOPPED_MS);
    const started = Date.now();
    const response = await push('held by the replicas');
    const took = Date.now() - started;
    clearTimeout(timer);
    resume();
    assert.equal(response.status, 201, `${response.status} after ${took} ms: ${await response.text()}`);
    assert.ok(took >= STOPPED_MS - 500, `answered once a remote replica stored it (${took} ms)`);
    await waitUntil(() => got.length === 2, 5000, 'the held push');
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(got, ['before', 'held by the replicas']);
  } finally {
    resume();
    realtime.close();
    await cluster.stop();
  }
});
