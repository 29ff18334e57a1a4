// A synchronous function endpoint (before-publish, $connect; docs/functions.md) for the
// hook tests, verifying X-Ably-Signature exactly as Ably's webhook docs tell a receiver.
import { createServer } from 'node:http';
import { createHmac, timingSafeEqual } from 'node:crypto';

/// Starts a function whose answer is `decide(path, json)` → `{ status?, body?, delayMs? }`
/// (body is JSON-encoded). Records every request (`path`, `headers`, `json`) and counts
/// bad signatures. `stop()` closes it (and its kept-alive connections), so calls fail.
export function startHookFunction({ keyName, keySecret, decide }) {
  const fn = { requests: [], badSignatures: 0, unsigned: 0, port: 0, server: null, decide };
  fn.server = createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const signature = req.headers['x-ably-signature'];
      if (signature === undefined) {
        fn.unsigned += 1;
      } else {
        const mac = createHmac('sha256', keySecret).update(body).digest();
        const given = Buffer.from(signature, 'base64');
        const valid = req.headers['x-ably-key'] === keyName
          && given.length === mac.length && timingSafeEqual(given, mac);
        if (!valid) fn.badSignatures += 1;
      }
      const json = JSON.parse(body.toString('utf8'));
      fn.requests.push({ path: req.url, headers: req.headers, json });
      const answer = fn.decide(req.url, json) || {};
      const reply = () => {
        res.writeHead(answer.status || 200, { 'content-type': 'application/json' });
        res.end(answer.body === undefined ? '' : JSON.stringify(answer.body));
      };
      if (answer.delayMs) setTimeout(reply, answer.delayMs);
      else reply();
    });
  });
  fn.stop = () => new Promise((resolve) => {
    fn.server.close(() => resolve());
    fn.server.closeAllConnections();
  });
  return new Promise((resolve) => {
    fn.server.listen(0, '127.0.0.1', () => {
      fn.port = fn.server.address().port;
      resolve(fn);
    });
  });
}
