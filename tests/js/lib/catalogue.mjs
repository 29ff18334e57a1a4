// The bad-input catalogue's harness: rows of (input, exact expected answer) run against
// `tern dev` (three regions in one process, replicating over QUIC with the WAN of
// regions/topology.toml emulated), and after every row the proof that the bad input
// harmed no one: a normal publish in us-east is answered 201 and reaches an ably-js
// subscriber in eu-west, and an ably-js client on us-east still publishes and receives.
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, options, startTern, waitUntil } from './tern.mjs';

export const DEV_KEY = 'dev.root:dev-secret-change-me';
export const BASIC = `Basic ${Buffer.from(DEV_KEY).toString('base64')}`;

/// Starts `tern dev` and the witnesses that check the cluster after each row.
export async function startCatalogue() {
  const tern = await startTern('', { args: ['dev', '--port', '0'], listening: 3 });
  const [east, west] = tern.ports;
  const clients = [];
  const realtime = (port, extra = {}) => {
    const c = new Ably.Realtime(options(port, { key: DEV_KEY, ...extra }));
    clients.push(c);
    return c;
  };
  const westSub = await connected(realtime(west));
  const eastClient = await connected(realtime(east, { binary: true }));
  const crossed = new Set();
  const local = new Set();
  await westSub.channels.get('witness').subscribe((m) => crossed.add(m.data));
  await eastClient.channels.get('witness-local').subscribe((m) => local.add(m.data));
  let round = 0;
  return {
    tern,
    east,
    west,
    url: (path, port = east) => `http://127.0.0.1:${port}${path}`,
    /// Asserts the cluster still serves everyone normally (see the file comment).
    async stillServes(after) {
      round += 1;
      const marker = `ok-${round}`;
      const res = await fetch(`http://127.0.0.1:${east}/channels/witness/messages`, {
        method: 'POST',
        headers: { authorization: BASIC, 'content-type': 'application/json' },
        body: JSON.stringify({ name: 'w', data: marker }),
        signal: AbortSignal.timeout(15000),
      });
      assert.equal(res.status, 201, `after ${after}: a normal publish must still be accepted`);
      await eastClient.channels.get('witness-local').publish('w', marker);
      await waitUntil(() => crossed.has(marker), 10000, `after ${after}: cross-region delivery`);
      await waitUntil(() => local.has(marker), 5000, `after ${after}: local delivery`);
    },
    async stop() {
      for (const c of clients) c.close();
      await tern.stop();
    },
  };
}

/// Runs one HTTP row: `request` is fetch's (url, init); `expect` the exact answer.
export async function httpRow(cat, { name, path, init, expect }) {
  const res = await fetch(cat.url(path), { ...init, signal: AbortSignal.timeout(15000) });
  const text = await res.text();
  assert.equal(res.status, expect.status, `${name}: status (body ${text.slice(0, 200)})`);
  if (expect.code !== undefined) {
    const body = JSON.parse(text);
    assert.equal(body.error?.code, expect.code, `${name}: Ably error code (body ${text.slice(0, 200)})`);
    assert.equal(res.headers.get('x-ably-errorcode'), String(expect.code), `${name}: x-ably-errorcode`);
  }
  return text;
}
