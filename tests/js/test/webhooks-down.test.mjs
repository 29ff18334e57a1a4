// A function down for 30 s, then back (docs/functions.md, "Bounded"): every event the
// outbox kept is delivered, in order; what did not fit is dropped and counted, never
// queued in memory; the node's memory stays flat and the outbox bounded.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { startTern, testConfig, waitUntil } from '../lib/tern.mjs';
import { items, startFunction } from '../lib/function.mjs';

const AUTH = `Basic ${Buffer.from('test.root:rootsecret').toString('base64')}`;
const OUTBOX_MAX = 1000;

function rssMb(pid) {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+)/.exec(status)[1]) / 1024;
}

/// A series of the node's /metrics (on its admin port).
async function metric(port, name, labels) {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(name) && labels.every((x) => l.includes(x)));
  return line ? Number(line.split(' ').at(-1)) : 0;
}

test('function down for 30 s, then back: kept events all delivered, memory flat, outbox bounded', async () => {
  // Proves the bound on a function that is down: publishing at ~90/s for 30 s keeps at
  // most outbox_items_max events waiting (the rest counted as dropped), RSS does not
  // grow with the backlog, and once the function answers every kept event arrives.
  const fn = await startFunction({ keyName: 'test.root', keySecret: 'rootsecret' });
  fn.mode = 'down';
  const tern = await startTern(testConfig({ history: 'mode = "redb"\npath = "data/history.redb"' }) + `
[[apps.rules]]
id = "down"
url = "http://127.0.0.1:${fn.port}/hook"
batch_window_ms = 20
batch_items_max = 100
outbox_items_max = ${OUTBOX_MAX}
retry_delay_initial_ms = 200
retry_delay_max_ms = 1000
sign_with_key = "root"
`);
  try {
    const pid = tern.child.pid;
    const before = rssMb(pid);
    const samples = [];
    let undeliveredMax = 0;
    const started = Date.now();
    let published = 0;
    while (Date.now() - started < 30000) {
      const response = await fetch(`http://127.0.0.1:${tern.port}/channels/down/messages`, {
        method: 'POST',
        headers: { authorization: AUTH, 'content-type': 'application/json' },
        body: JSON.stringify({ name: 'n', data: `d${published}` }),
      });
      assert.equal(response.status, 201);
      published += 1;
      if (published % 100 === 0) {
        samples.push(rssMb(pid));
        undeliveredMax = Math.max(undeliveredMax,
          await metric(tern.admin, 'tern_webhook_outbox_undelivered', ['rule="down"']));
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    assert.equal(fn.requests.length, 0, 'nothing accepted while down');
    const dropped = await metric(tern.admin, 'tern_webhook_events_dropped_total', ['rule="down"', 'reason="outbox_full"']);
    const downRss = Math.max(...samples);
    fn.mode = 'ok';
    const backAt = Date.now();
    await waitUntil(() => items(fn).length >= OUTBOX_MAX, 30000, `${OUTBOX_MAX} items`);
    const drainMs = Date.now() - backAt;
    await new Promise((r) => setTimeout(r, 500));
    const after = rssMb(pid);
    const data = items(fn).map((i) => i.data.messages[0].data);
    console.log(`# function down 30 s: ${published} published, ${data.length} delivered ${drainMs} ms after it came back, `
      + `${dropped} dropped (outbox_full), undelivered gauge max ${undeliveredMax}; RSS ${before.toFixed(1)} MB before, `
      + `${samples[Math.floor(samples.length / 3)].toFixed(1)} MB at 10 s, ${downRss.toFixed(1)} MB max while down, ${after.toFixed(1)} MB after`);
    // The first OUTBOX_MAX accepted are kept and delivered in order; none twice.
    assert.deepEqual(data, Array.from({ length: OUTBOX_MAX }, (_, i) => `d${i}`));
    assert.equal(dropped, published - OUTBOX_MAX, 'every event past the bound is counted as dropped');
    // The outbox on disk holds at most the bound while down (the gauge is read back
    // from the outbox's own count), and nothing once delivered.
    assert.ok(undeliveredMax > 0 && undeliveredMax <= OUTBOX_MAX, `undelivered gauge ${undeliveredMax}`);
    assert.equal(await metric(tern.admin, 'tern_webhook_outbox_undelivered', ['rule="down"']), 0);
    // Flat: the last two thirds of the outage (the backlog beyond the bound being
    // dropped) add no more than the channel's bounded in-memory log does.
    const atTen = samples[Math.floor(samples.length / 3)];
    assert.ok(downRss - atTen < 16, `RSS grew ${(downRss - atTen).toFixed(1)} MB in the last 20 s of the outage`);
    assert.equal(fn.badSignatures, 0);
  } finally {
    await tern.stop();
    fn.server.close();
  }
});
