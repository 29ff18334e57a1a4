// A TCP proxy the test controls, to cut a client's transport mid-stream.
import net from 'node:net';

export function startProxy(targetPort) {
  const sockets = new Set();
  let target = targetPort;
  let paused = false;
  const server = net.createServer((client) => {
    if (paused) { client.destroy(); return; }
    const upstream = net.connect(target, '127.0.0.1');
    sockets.add(client);
    sockets.add(upstream);
    client.pipe(upstream);
    upstream.pipe(client);
    const close = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    for (const s of [client, upstream]) {
      s.on('error', close);
      s.on('close', close);
    }
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({
    port: server.address().port,
    /// Cuts every live connection through the proxy.
    dropAll() { for (const s of sockets) s.destroy(); sockets.clear(); },
    /// New connections go to `port` from now on (what geo-DNS does when a region dies).
    retarget(port) { target = port; },
    /// While paused, new connections are refused (closed at once).
    pause(value) { paused = value; },
    close() { for (const s of sockets) s.destroy(); server.close(); },
  })));
}
