// A node that stored a publish but was killed before any peer had it: restarted on its
// disk store, it offers the message again (tern_replication::recover), so a subscriber in
// another region receives it and every region's history holds it, once.
//
// The WAN from us-east is emulated at 1.5 s one way, so the message waits in us-east's
// link for far longer than the store takes to commit it: killed then, only us-east's
// store has it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Ably from 'ably';
import { options, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, startRegions } from '../lib/regions.mjs';

const SLOW_EAST = `
regions = ["us-east", "eu-west", "ap-south"]

[[links]]
a = "us-east"
b = "eu-west"
delay_ms = 1500
loss_percent = 0

[[links]]
a = "us-east"
b = "ap-south"
delay_ms = 1500
loss_percent = 0

[[links]]
a = "eu-west"
b = "ap-south"
delay_ms = 70
loss_percent = 0
`;

test('a message stored only by a node killed before sending it reaches the other regions after its restart', async () => {
  const topology = join(mkdtempSync(join(tmpdir(), 'tern-topology-')), 'slow-east.toml');
  writeFileSync(topology, SLOW_EAST);
  const cluster = await startRegions({
    history: 'mode = "redb"\npath = "data/history.redb"',
    topology,
  });
  const rest = (host) => new Ably.Rest(options(cluster.port, { key: DEV_KEY, endpoint: host }));
  const history = async (host) =>
    (await rest(host).channels.get('recover-1').history({ direction: 'forwards' })).items.map((m) => m.data);
  const realtime = new Ably.Realtime(options(cluster.port, { key: DEV_KEY, endpoint: '127.0.0.2' }));
  try {
    const got = [];
    const channel = realtime.channels.get('recover-1');
    await channel.subscribe((m) => got.push(m.data));
    await rest('127.0.0.1').channels.get('recover-1').publish('n', 'before');
    await waitUntil(async () => got.length === 1, 15000, 'the first message in eu-west');

    // The publish waits for a replica that would be 3 s away: it is not awaited.
    const auth = Buffer.from(DEV_KEY).toString('base64');
    const publishing = fetch(`http://127.0.0.1:${cluster.port}/channels/recover-1/messages`, {
      method: 'POST',
      headers: { authorization: `Basic ${auth}`, 'content-type': 'application/json' },
      body: JSON.stringify({ name: 'n', data: 'stored-only-here' }),
    }).catch(() => null);
    const sent = Date.now();
    await waitUntil(async () => (await history('127.0.0.1')).includes('stored-only-here'), 1000, 'stored in us-east');
    assert.ok(Date.now() - sent < 1200, 'stored long before a peer could have it');
    await cluster.nodes[0].stop('SIGKILL');
    await publishing;
    assert.deepEqual(await history('127.0.0.2'), ['before'], 'eu-west never had it');
    assert.deepEqual(got, ['before']);

    await cluster.restartNode(0);
    await waitUntil(async () => got.length >= 2, 30000, 'the stored message in eu-west after the restart');
    for (const host of ['127.0.0.2', '127.0.0.3', '127.0.0.1']) {
      let seen = [];
      await waitUntil(async () => {
        seen = await history(host);
        return seen.length >= 2;
      }, 20000, `history on ${host} (has ${seen})`);
      assert.deepEqual(seen, ['before', 'stored-only-here'], `history on ${host}`);
    }
    // Once: nothing more arrives later.
    await new Promise((r) => setTimeout(r, 3000));
    assert.deepEqual(got, ['before', 'stored-only-here']);
  } finally {
    realtime.close();
    await cluster.stop();
  }
});
