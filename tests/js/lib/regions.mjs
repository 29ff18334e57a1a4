// Three regions as separate `tern serve` processes, like scripts/run-regions: region i
// on 127.0.0.(i+1), all on one client port (ably-js fallbackHosts reuse the primary's
// port), gossip seeded by us-east and authenticated with the key `tern certs` writes,
// mutual-TLS QUIC with certificates from `tern certs`, the WAN of regions/topology.toml
// emulated.
import { execFileSync } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { mkdtempSync, mkdirSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repo, startTern, ternBin } from './tern.mjs';

export const DEV_KEY = 'dev.root:dev-secret-change-me';
export const REGIONS = [
  { name: 'us-east', host: '127.0.0.1' },
  { name: 'eu-west', host: '127.0.0.2' },
  { name: 'ap-south', host: '127.0.0.3' },
];

async function freeTcpPort() {
  const server = createServer();
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  await new Promise((r) => server.close(r));
  return port;
}

async function freeUdpPort(host) {
  const socket = createSocket('udp4');
  await new Promise((r) => socket.bind(0, host, r));
  const { port } = socket.address();
  await new Promise((r) => socket.close(r));
  return port;
}

function regionConfig({ name, host, node }, port, adminPort, gossip, seed, dir, { extra, appExtra, history, topology }) {
  return `
[server]
host = "${host}"
port = ${port}
server_id = "${node}"

[history]
${history}

[admin]
listen = "${host}:${adminPort}"

[cluster]
region = "${name}"
quic_listen = "${host}:0"
gossip_listen = "${host}:${gossip}"
seeds = [${seed ? `"${seed}"` : ''}]
ack_replicas = 1
ca_cert = "${join(dir, 'ca.pem')}"
cert = "${join(dir, `${node}.pem`)}"
key = "${join(dir, `${node}.key`)}"
gossip_key = "${join(dir, 'gossip.key')}"
emulate_topology = "${topology}"
${extra}

[[apps]]
id = "dev"

[[apps.keys]]
id = "root"
secret = "dev-secret-change-me"
capability = '{"*":["*"]}'
${appExtra}
`;
}

/// Starts the three regions (`nodesPerRegion` nodes each: node k of region r listens on
/// 127.k.0.(r+1), like scripts/run-regions); resolves once each has joined the
/// cluster (the admin port, `/regions` and `/metrics`, is `adminPort` on each node's
/// host). `nodes[i]` has `.stop(signal)` (only that PID), `.child.pid` and `.host`;
/// the first `REGIONS.length` are the regions' first nodes. `extra` is TOML appended to
/// every node's config (after its `[cluster]` section); `appExtra` after its app's keys
/// (e.g. `[[apps.rules]]`); `history` the body of its `[history]` section (memory by
/// default; a relative redb path lands in the node's own folder); `topology` the WAN
/// to emulate (regions/topology.toml by default).
export async function startRegions({
  extra = '',
  nodesPerRegion = 1,
  appExtra = '',
  history = 'mode = "memory"',
  topology = join(repo, 'regions', 'topology.toml'),
} = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'tern-regions-'));
  const plan = [];
  for (let k = 0; k < nodesPerRegion; k++) {
    for (const [r, region] of REGIONS.entries()) {
      plan.push({ ...region, host: `127.${k}.0.${r + 1}`, node: `${region.name}-${k + 1}` });
    }
  }
  const spares = REGIONS.map((r) => `${r.name}-${nodesPerRegion + 1}`);
  execFileSync(ternBin, ['certs', '--out', dir, '--nodes', [...plan.map((p) => p.node), ...spares].join(',')]);
  const port = await freeTcpPort();
  // Every node's admin listener (/metrics, /regions) on its own address, one port.
  const adminPort = await freeTcpPort();
  const nodes = [];
  let seed = null;
  // Starts one planned node, joining through `seed` (the first node starts the cluster).
  // A UDP port found free is released before tern binds it; should another socket take
  // it in between (tern refuses to start: "Address already in use"), the node starts
  // again on a new one.
  const startNode = async (region) => {
    const nodeDir = join(dir, region.node);
    mkdirSync(nodeDir, { recursive: true });
    let gossip;
    let node;
    let config;
    for (let attempt = 1; !node; attempt++) {
      gossip = await freeUdpPort(region.host);
      config = regionConfig(region, port, adminPort, gossip, seed, dir, { extra, appExtra, history, topology });
      node = await startTern(config, { dir: nodeDir, args: ['serve', '--config', join(nodeDir, 'tern.toml')] })
        .catch((err) => {
          if (attempt < 3 && /Address already in use/.test(err.message)) return null;
          throw err;
        });
    }
    nodes.push({ ...node, region, host: region.host, gossip, config });
    seed = seed || `${region.host}:${gossip}`;
    return node;
  };
  for (const region of plan) await startNode(region);
  return {
    port,
    /// Every node's admin port (on its own host): `/metrics`, `/regions`.
    adminPort,
    nodes,
    /// The folder holding `ca.pem`, `gossip.key` and the node certificates.
    dir,
    /// Starts node `k` (0-based, at most `nodesPerRegion`: certificates exist for one
    /// more node per region) of region `r`, joining through the first node's gossip.
    addNode(r, k) {
      return startNode({ ...REGIONS[r], host: `127.${k}.0.${r + 1}`, node: `${REGIONS[r].name}-${k + 1}` });
    },
    /// Starts `nodes[i]` again (after its `.stop(signal)`): the same node id, folder,
    /// config and gossip address; a new incarnation to its peers.
    async restartNode(i) {
      const old = nodes[i];
      const nodeDir = join(dir, old.region.node);
      const node = await startTern(old.config, { dir: nodeDir, args: ['serve', '--config', join(nodeDir, 'tern.toml')] });
      nodes[i] = { ...node, region: old.region, host: old.host, gossip: old.gossip, config: old.config };
      return nodes[i];
    },
    async stop() { for (const n of nodes) await n.stop(); },
  };
}
