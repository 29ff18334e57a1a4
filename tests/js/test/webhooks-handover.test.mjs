// The handover of a dead node's webhooks (docs/functions.md, "Who delivers"): three
// regions as separate `tern serve` processes, a slow function, the delivering node
// SIGKILLed with deliveries in flight and never restarted. The node that kept shadow
// rows of its events takes over: every ACKed message reaches the function, duplicates
// only around the dead node's last published mark, each detectable by its serial.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, REGIONS, startRegions } from '../lib/regions.mjs';
import { items, startFunction } from '../lib/function.mjs';

// The takeover's steps are logged at info: a failure in CI then shows what happened.
process.env.TERN_LOG = process.env.TERN_LOG || 'warn,tern_functions=info,tern::handover=info';

const AUTH = `Basic ${Buffer.from(DEV_KEY).toString('base64')}`;

async function publish(host, port, channel, id) {
  const response = await fetch(`http://${host}:${port}/channels/${channel}/messages`, {
    method: 'POST',
    headers: { authorization: AUTH, 'content-type': 'application/json' },
    body: JSON.stringify({ id, name: 'n', data: id }),
  });
  return response.status;
}

test('SIGKILL of the delivering node: another node delivers what it had not, nothing lost', async () => {
  // Proves the handover: the ACKed messages of a node killed for good all reach the
  // function (from the node after it shadowed them), and the copies delivered twice are
  // only those the dead node delivered in its last seconds, each with the same serial.
  const fn = await startFunction({ keyName: 'dev.root', keySecret: 'dev-secret-change-me' });
  fn.mode = 'slow';
  fn.slowMs = 400;
  const cluster = await startRegions({
    appExtra: `
[[apps.rules]]
id = "handover"
url = "http://127.0.0.1:${fn.port}/hook"
batch_window_ms = 10
batch_items_max = 5
retry_delay_initial_ms = 100
retry_delay_max_ms = 400
sign_with_key = "root"
`,
  });
  const [origin] = cluster.nodes; // us-east: every message is published there
  const channels = ['orders', 'chat:1', 'chat:2', 'audit'];
  const acked = new Set();
  const ackedAt = new Map(); // message id → [channel, when its 201 came]
  const cut = new Set(); // publishes without a 201 (cut by the kill): maybe stored, not ACKed
  const firstSeen = new Map(); // message id → when the function first got it
  const deliveredAt = () => {
    for (const item of items(fn)) {
      const id = item.data.messages[0].id;
      if (!firstSeen.has(id)) firstSeen.set(id, { at: Date.now(), site: item.data.site });
    }
  };
  const watcher = setInterval(deliveredAt, 20);
  let killedAt = 0;
  try {
    // Publishes until the kill; only 201s count as ACKed. The function takes 400 ms a
    // batch of 5 (12.5/s), so a backlog builds up and a request is in flight at the kill.
    let stop = false;
    let next = 0;
    const worker = async () => {
      while (!stop && next < 3000) {
        const id = `m${next++}`;
        const status = await publish(origin.host, cluster.port, channels[next % channels.length], id)
          .catch((err) => `${err.cause?.code || err.message}`);
        if (status === 201) { acked.add(id); ackedAt.set(id, [channels[next % channels.length], Date.now()]); }
        else cut.add(id);
        if (status !== 201 && !stop) console.log(`# publish ${id}: ${status}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    // Four publishers (~25/s: the WAN makes each publish wait for a remote replica),
    // twice what the function takes: the backlog grows. Killed once the dead node has
    // delivered for a while, so its mark has moved well past its first deliveries.
    const publisher = Promise.all(Array.from({ length: 4 }, worker));
    await waitUntil(() => firstSeen.size >= 150 && fn.inFlight > 0 && acked.size - firstSeen.size >= 50, 90000, 'a backlog in flight')
      .catch((err) => { throw new Error(`${err.message}: ${acked.size} acked, ${firstSeen.size} delivered`); });
    stop = true;
    killedAt = Date.now();
    await origin.stop('SIGKILL');
    await publisher;
    const deliveredBeforeKill = firstSeen.size;
    assert.ok(deliveredBeforeKill < acked.size, `killed mid-delivery (${deliveredBeforeKill} of ${acked.size})`);

    // Failure detection (~2-4 s), the takeover grace (5 s), then the backlog at 12/s.
    const missing = () => [...acked].filter((id) => !firstSeen.has(id));
    await waitUntil(() => missing().length === 0, 150000, 'every ACKed message').catch(async (err) => {
      // What a failure needs to be understood: which messages (channel, ACKed how long
      // before the kill) and what each survivor counted.
      const shown = missing().slice(0, 20).map((id) => {
        const [channel, at] = ackedAt.get(id);
        return `${id}@${channel}:${killedAt - at}ms`;
      });
      const counted = [];
      for (const node of cluster.nodes.slice(1)) {
        const text = await fetch(`http://${node.host}:${cluster.adminPort}/metrics`).then((r) => r.text()).catch((e) => `${e}`);
        const lines = text.split('\n').filter((l) => /^tern_(webhook|replica|replication_(frames|resends|buffer)|history_backfilled)/.test(l));
        counted.push(`${node.region.name}: ${lines.join(' | ')}`);
      }
      throw new Error(`${err.message}: ${missing().length} of ${acked.size} missing (id@channel:ACKed ms before the kill) `
        + `${shown.join(' ')}; ${firstSeen.size} delivered, ${deliveredBeforeKill} before the kill\n${counted.join('\n')}`);
    });
    // Copies still queued arrive: count duplicates, do not guess them.
    await new Promise((r) => setTimeout(r, 1500));
    deliveredAt();

    assert.equal(fn.badSignatures, 0);
    const counts = new Map();
    for (const item of items(fn)) {
      const id = item.data.messages[0].id;
      counts.set(id, (counts.get(id) || 0) + 1);
      // The serial is stable: one serial per message id, whoever delivered it.
      assert.equal(item.serial, item.data.messages[0].serial);
    }
    const serialsById = new Map();
    for (const item of items(fn)) {
      const id = item.data.messages[0].id;
      const known = serialsById.get(id);
      assert.ok(known === undefined || known === item.serial, `${id}: one serial on every copy`);
      serialsById.set(id, item.serial);
    }
    const unknown = [...counts.keys()].filter((id) => !acked.has(id));
    // A publish cut by the kill may have been stored without its 201: it may arrive,
    // it is simply not counted as ACKed. Nothing else may.
    assert.deepEqual(unknown.filter((id) => !cut.has(id)), [], 'only messages that were published');
    const duplicates = [...counts.entries()].filter(([, n]) => n > 1);
    const sites = {};
    for (const item of items(fn)) sites[item.data.site] = (sites[item.data.site] || 0) + 1;
    const takenOver = [...acked].filter((id) => firstSeen.get(id).site !== REGIONS[0].name).length;
    console.log(`# webhook handover: ${acked.size} ACKed, ${deliveredBeforeKill} delivered before the kill, `
      + `${takenOver} first delivered by the taker, ${duplicates.length} delivered twice; by site ${JSON.stringify(sites)}`);
    assert.ok(takenOver > 0, 'another node delivered the rest');
    // Duplicates are only messages the dead node delivered in its last seconds (after
    // the mark its peers last heard, less the 1 s skew), never older ones.
    for (const [id] of duplicates) {
      const first = firstSeen.get(id);
      assert.equal(first.site, REGIONS[0].name, `${id} was first delivered by the dead node`);
      assert.ok(killedAt - first.at < 6000, `${id} duplicated though delivered ${killedAt - first.at} ms before the kill`);
    }
    assert.ok(duplicates.length < deliveredBeforeKill, 'the mark held: not everything again');
  } finally {
    clearInterval(watcher);
    await cluster.stop();
    fn.server.close();
  }
});
