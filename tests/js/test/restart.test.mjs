// History in redb survives a restart of the node (SIGTERM and SIGKILL).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { options, startTern, testConfig } from '../lib/tern.mjs';

const config = testConfig({ history: 'mode = "redb"\npath = "data/history.redb"' });

for (const signal of ['SIGTERM', 'SIGKILL']) {
  test(`acknowledged messages are in history after a ${signal} restart`, async () => {
    // Proves ACK-after-commit and that the redb store reopens with everything in it.
    const first = await startTern(config);
    const sent = [];
    try {
      const rest = new Ably.Rest(options(first.port));
      const channel = rest.channels.get(`durable-${signal}`);
      for (let i = 0; i < 25; i++) {
        sent.push(`d${i}`);
        await channel.publish('n', `d${i}`);
      }
    } finally {
      await first.stop(signal);
    }
    const second = await startTern(config, { dir: first.dir });
    try {
      const rest = new Ably.Rest(options(second.port));
      let page = await rest.channels.get(`durable-${signal}`).history({ direction: 'forwards', limit: 10 });
      const seen = page.items.map((m) => m.data);
      while (page.hasNext()) {
        page = await page.next();
        seen.push(...page.items.map((m) => m.data));
      }
      assert.deepEqual(seen, sent);
    } finally {
      await second.stop();
    }
  });
}
