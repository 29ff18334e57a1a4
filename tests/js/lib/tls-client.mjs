// Run as a child process with NODE_EXTRA_CA_CERTS set (Node reads it only at start):
// ably-js over wss:// and https:// against tern on localhost:PORT. Prints one JSON line.
import Ably from 'ably';

const [port, key, channelName] = process.argv.slice(2);
const common = { key, endpoint: 'localhost', port: Number(port), tls: true, tlsPort: Number(port),
  disableConnectivityCheck: true, fallbackHosts: [], logLevel: 0, useBinaryProtocol: false };
const result = { connected: false, received: [], history: [], error: null };
const realtime = new Ably.Realtime({ ...common, transports: ['web_socket'] });
const timer = setTimeout(() => finish(new Error('timed out')), 15000);
function finish(err) {
  clearTimeout(timer);
  if (err) result.error = String(err.message || err);
  console.log(JSON.stringify(result));
  realtime.close();
  setTimeout(() => process.exit(0), 100);
}
try {
  await realtime.connection.once('connected');
  result.connected = true;
  const channel = realtime.channels.get(channelName);
  await channel.subscribe((m) => result.received.push(m.data));
  const rest = new Ably.Rest(common); // Basic auth: the key itself, over TLS
  await rest.channels.get(channelName).publish('n', 'over https');
  await realtime.channels.get(channelName).publish('n', 'over wss');
  while (result.received.length < 2) await new Promise((r) => setTimeout(r, 20));
  const page = await rest.channels.get(channelName).history({ direction: 'forwards' });
  result.history = page.items.map((m) => m.data);
  finish();
} catch (err) {
  finish(err);
}
