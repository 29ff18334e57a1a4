// The admin port (`[admin]`): /metrics, /regions and the status page are served there and
// not on the client port; a single node lists itself in /regions; a token, when set, is
// required. `tern dev`'s regions count apart (node and region labels), /metrics passes
// Debian's `promtool check metrics`, and Debian's Prometheus scraping the three regions
// answers every query of docs/grafana-dashboard.json.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { sample } from '../lib/metrics.mjs';
import { options, repo, startTern, testConfig, waitUntil } from '../lib/tern.mjs';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

test('cluster details are on the admin port, not the client port', async () => {
  const tern = await startTern();
  try {
    for (const path of ['/metrics', '/regions']) {
      const client = await fetch(`http://127.0.0.1:${tern.port}${path}`);
      assert.equal(client.status, 404, `${path} on the client port`);
      await client.arrayBuffer();
    }
    assert.equal((await fetch(`http://127.0.0.1:${tern.port}/health`)).status, 200, 'the client port keeps /health');
    assert.notEqual(tern.admin, undefined, 'the admin line is printed');
    const metrics = await fetch(`http://127.0.0.1:${tern.admin}/metrics`);
    assert.equal(metrics.status, 200);
    assert.match(await metrics.text(), /^# TYPE tern_connections gauge$/m);
    const regions = await (await fetch(`http://127.0.0.1:${tern.admin}/regions`)).json();
    assert.equal(regions.self, 'local');
    assert.equal(regions.regions.length, 1, 'a single node lists itself');
    assert.deepEqual(regions.regions[0].nodes.map((n) => n.endpoint), [`http://127.0.0.1:${tern.port}`]);
    const health = await (await fetch(`http://127.0.0.1:${tern.admin}/health`)).json();
    assert.equal(health.status, 'ok');
  } finally {
    await tern.stop();
  }
});

test('an admin token is required on every admin route once set', async () => {
  const token = 'admin-token-0123456789';
  const tern = await startTern(`${testConfig()}\n[admin]\nlisten = "127.0.0.1:0"\ntoken = "${token}"\n`);
  try {
    for (const path of ['/metrics', '/regions', '/health', '/']) {
      const none = await fetch(`http://127.0.0.1:${tern.admin}${path}`);
      assert.equal(none.status, 401, `${path} without the token`);
      const wrong = await fetch(`http://127.0.0.1:${tern.admin}${path}`, { headers: { authorization: `Bearer ${token}x` } });
      assert.equal(wrong.status, 401, `${path} with a wrong token`);
    }
    const ok = await fetch(`http://127.0.0.1:${tern.admin}/metrics`, { headers: { authorization: `Bearer ${token}` } });
    assert.equal(ok.status, 200);
  } finally {
    await tern.stop();
  }
});

test('a non-loopback admin port without a token refuses to start', async () => {
  await assert.rejects(
    startTern(`${testConfig()}\n[admin]\nlisten = "0.0.0.0:0"\n`),
    /admin\.token/,
  );
});

test('tern dev: each region\'s /metrics counts only that region, labelled with its node and region', async () => {
  const tern = await startTern('', { args: ['dev', '--port', '0'], listening: 3 });
  const clients = [];
  try {
    assert.equal(tern.admins.length, 3, 'three admin ports printed');
    const metrics = async (i) => (await fetch(`http://127.0.0.1:${tern.admins[i]}/metrics`)).text();
    const nodes = ['tern-dev-us-east', 'tern-dev-eu-west', 'tern-dev-ap-south'];
    const regions = ['us-east', 'eu-west', 'ap-south'];
    // Two clients on eu-west, one publishing: only eu-west counts them and the publish.
    for (let i = 0; i < 2; i++) {
      const client = new Ably.Realtime(options(tern.ports[1], { key: 'dev.root:dev-secret-change-me' }));
      clients.push(client);
      await client.connection.whenState('connected');
    }
    await clients[0].channels.get('per-node').publish('n', 'x');
    // REST and SSE on eu-west too (their handlers, the store writer and the replication
    // to the others all record somewhere: the tripwire below says it is always a node).
    const auth = { authorization: `Basic ${Buffer.from('dev.root:dev-secret-change-me').toString('base64')}` };
    const rest = await fetch(`http://127.0.0.1:${tern.ports[1]}/channels/per-node/messages`, {
      method: 'POST', headers: { ...auth, 'content-type': 'application/json' }, body: JSON.stringify({ name: 'r', data: 'y' }),
    });
    assert.equal(rest.status, 201);
    await rest.arrayBuffer();
    const sse = new AbortController();
    const stream = await fetch(`http://127.0.0.1:${tern.ports[1]}/sse?v=1.2&channels=per-node&rewind=2`, { headers: auth, signal: sse.signal });
    const reader = stream.body.getReader();
    let streamed = '';
    while (!streamed.includes('"data":"y"')) streamed += new TextDecoder().decode((await reader.read()).value);
    const texts = await Promise.all([0, 1, 2].map(metrics));
    sse.abort();
    for (const [i, text] of texts.entries()) {
      const labels = { node: nodes[i], region: regions[i] };
      const expected = i === 1 ? 2 : 0;
      assert.equal(sample(text, 'tern_connections', { ...labels, transport: 'ws' }), expected, `ws connections on ${regions[i]}`);
      assert.equal(sample(text, 'tern_connections', { ...labels, transport: 'sse' }), i === 1 ? 1 : 0, `sse connections on ${regions[i]}`);
      assert.equal(sample(text, 'tern_messages_published_total', labels), i === 1 ? 2 : 0, `publishes on ${regions[i]}`);
      for (const line of text.split('\n').filter((l) => l && !l.startsWith('#'))) {
        assert.match(line, new RegExp(`node="${nodes[i]}"`), `every series on ${regions[i]} has its node label: ${line}`);
        assert.match(line, new RegExp(`region="${regions[i]}"`), `every series on ${regions[i]} has its region label: ${line}`);
      }
    }
    assert.doesNotMatch(tern.stderr, /outside any node/, 'no series escaped its node');
  } finally {
    for (const c of clients) c.close();
    await tern.stop();
  }
});

test('promtool check metrics passes on every tern dev region\'s /metrics, with traffic in every histogram', async () => {
  const promtool = process.env.PROMTOOL || 'promtool';
  const tern = await startTern('', { args: ['dev', '--port', '0'], listening: 3 });
  const clients = [];
  try {
    // A subscriber on every region and a publisher on the first: ACKs, local and
    // replicated deliveries, replication acks and store commits all get samples.
    const channelName = `promtool-${Date.now()}`;
    const got = [];
    for (const port of tern.ports) {
      const client = new Ably.Realtime(options(port, { key: 'dev.root:dev-secret-change-me' }));
      clients.push(client);
      const channel = client.channels.get(channelName);
      const seen = [];
      got.push(seen);
      await channel.subscribe((m) => seen.push(m.data));
    }
    for (let i = 0; i < 5; i++) await clients[0].channels.get(channelName).publish('n', `m${i}`);
    await waitUntil(() => got.every((seen) => seen.length === 5), 10000, 'deliveries in every region');
    for (const [i, admin] of tern.admins.entries()) {
      const text = await (await fetch(`http://127.0.0.1:${admin}/metrics`)).text();
      const check = spawnSync(promtool, ['check', 'metrics'], { input: text, encoding: 'utf8' });
      assert.equal(check.error, undefined, `running ${promtool}: ${check.error}`);
      assert.equal(check.status, 0, `promtool on region ${i}: ${check.stdout}${check.stderr}`);
      for (const name of ['tern_build_info', 'process_cpu_seconds_total', 'process_resident_memory_bytes',
        'process_open_fds', 'process_start_time_seconds', 'tern_outbound_queue_depth_max']) {
        assert.notEqual(sample(text, name), undefined, `${name} on region ${i}`);
      }
      assert.ok(sample(text, 'tern_store_commit_seconds_count') > 0, `store commits timed on region ${i}`);
      assert.ok(sample(text, 'tern_delivery_seconds_count', { origin: i === 0 ? 'local' : 'remote' }) > 0, `deliveries timed on region ${i}`);
      assert.ok(sample(text, 'tern_replication_unacked_events') !== undefined, `unacked per peer on region ${i}`);
      assert.ok(sample(text, 'tern_link_rtt_seconds') > 0, `link RTT on region ${i}`);
    }
    const first = await (await fetch(`http://127.0.0.1:${tern.admins[0]}/metrics`)).text();
    assert.equal(sample(first, 'tern_publish_ack_seconds_count'), 5, 'every ACK timed on the publishing region');
    assert.ok(sample(first, 'tern_replication_lag_seconds_count') > 0, 'replication lag sampled');
  } finally {
    for (const c of clients) c.close();
    await tern.stop();
  }
});

test('Debian\'s Prometheus scrapes every tern dev region and answers every query of docs/grafana-dashboard.json', async () => {
  const prometheusBin = process.env.PROMETHEUS || 'prometheus';
  const dashboard = JSON.parse(readFileSync(join(repo, 'docs', 'grafana-dashboard.json'), 'utf8'));
  const tern = await startTern('', { args: ['dev', '--port', '0'], listening: 3 });
  const dir = mkdtempSync(join(tmpdir(), 'tern-prometheus-'));
  const web = await new Promise((ok) => { const s = createServer(); s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => ok(port)); }); });
  writeFileSync(join(dir, 'prometheus.yml'), `
global: { scrape_interval: 1s, evaluation_interval: 1s }
scrape_configs:
  - job_name: tern
    static_configs:
      - targets: [${tern.admins.map((p) => `"127.0.0.1:${p}"`).join(', ')}]
`);
  const prometheus = spawn(prometheusBin, [`--config.file=${join(dir, 'prometheus.yml')}`,
    `--storage.tsdb.path=${join(dir, 'data')}`, `--web.listen-address=127.0.0.1:${web}`], { stdio: 'ignore' });
  const clients = [];
  let flow;
  try {
    const query = async (expr) => (await (await fetch(`http://127.0.0.1:${web}/api/v1/query?query=${encodeURIComponent(expr)}`)).json());
    // Traffic while Prometheus scrapes: a subscriber per region, 10 publishes a second
    // on us-east (bounded: at most 300).
    const name = `prom-${Date.now()}`;
    for (const port of tern.ports) {
      const c = new Ably.Realtime(options(port, { key: 'dev.root:dev-secret-change-me' }));
      clients.push(c);
      await c.channels.get(name).subscribe(() => {});
    }
    let sent = 0;
    flow = setInterval(() => { if (sent++ < 300) clients[0].channels.get(name).publish('n', 'x').catch(() => {}); }, 100);
    await waitUntil(async () => {
      try {
        const up = await query('sum(up{job="tern"})');
        return Number(up.data.result[0]?.value[1]) === 3;
      } catch { return false; }
    }, 20000, 'Prometheus scraping all three regions');
    await new Promise((r) => setTimeout(r, 6000));
    const quiet = /webhook|refused|nacks/;
    for (const panel of dashboard.panels) {
      for (const target of panel.targets) {
        const expr = target.expr.replaceAll('$node', '.*');
        const answer = await query(expr);
        assert.equal(answer.status, 'success', `${panel.title}: ${expr}: ${JSON.stringify(answer)}`);
        if (!quiet.test(expr)) assert.ok(answer.data.result.length > 0, `${panel.title}: ${expr} has data`);
      }
    }
    // Per node, not merged: each region's own series, labelled by node and region.
    const published = await query('sum by (node, region) (tern_messages_published_total)');
    const byNode = Object.fromEntries(published.data.result.map((r) => [r.metric.node, Number(r.value[1])]));
    assert.equal(Object.keys(byNode).length, 3, JSON.stringify(byNode));
    assert.ok(byNode['tern-dev-us-east'] > 0 && byNode['tern-dev-eu-west'] === 0 && byNode['tern-dev-ap-south'] === 0, JSON.stringify(byNode));
  } finally {
    clearInterval(flow);
    for (const c of clients) c.close();
    prometheus.kill('SIGTERM');
    await tern.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('an admin port already taken is an error naming it (not a panic)', async () => {
  const taken = createServer();
  await new Promise((r) => taken.listen(0, '127.0.0.1', r));
  try {
    const err = await startTern(`${testConfig()}\n[admin]\nlisten = "127.0.0.1:${taken.address().port}"\n`).then(
      (tern) => { tern.stop(); return null; },
      (e) => e,
    );
    assert.ok(err, 'tern started on a taken admin port');
    assert.match(err.message, /binding the admin listener/);
    assert.doesNotMatch(err.message, /panicked/);
  } finally {
    taken.close();
  }
});
