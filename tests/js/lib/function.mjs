// A function endpoint for webhook tests (docs/functions.md), written against Ably's
// webhook docs only.
import { createServer } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import { createHmac, timingSafeEqual } from 'node:crypto';

/// A function endpoint. Verifies every request as Ably's docs tell a receiver to:
/// HMAC-SHA256 of the raw body under the secret of the key `X-Ably-Key` names, base64,
/// compared with `X-Ably-Signature`. `mode` decides the answer: 'ok' (200 at once),
/// 'slow' (200 after `slowMs`), 'down' (503). Only answered-2xx requests count as
/// received (a function that failed did not process the request).
/// With `tls` ({cert, key} PEM) it serves https.
export function startFunction({ keyName, keySecret, tls }) {
  const fn = {
    mode: 'ok',
    slowMs: 150,
    requests: [], // { path, headers, body (Buffer), json }
    badSignatures: 0,
    serials: new Map(), // item serial → times received
    inFlight: 0,
    server: null,
    port: 0,
  };
  const serve = (handler) => (tls ? createTlsServer(tls, handler) : createServer(handler));
  fn.server = serve((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const signature = req.headers['x-ably-signature'];
      if (signature !== undefined) {
        const expected = createHmac('sha256', keySecret).update(body).digest('base64');
        const valid = req.headers['x-ably-key'] === keyName
          && expected.length === signature.length
          && timingSafeEqual(Buffer.from(expected), Buffer.from(signature));
        if (!valid) fn.badSignatures += 1;
      }
      const answer = () => {
        fn.inFlight -= 1;
        if (fn.mode === 'down') {
          res.writeHead(503).end('down');
          return;
        }
        const isJson = (req.headers['content-type'] || '').startsWith('application/json');
        const json = isJson ? JSON.parse(body.toString('utf8')) : null;
        fn.requests.push({ path: req.url, headers: req.headers, body, json });
        for (const item of json?.items || []) {
          fn.serials.set(item.serial, (fn.serials.get(item.serial) || 0) + 1);
        }
        res.writeHead(200).end('ok');
      };
      fn.inFlight += 1;
      if (fn.mode === 'slow') setTimeout(answer, fn.slowMs);
      else answer();
    });
  });
  return new Promise((resolve) => {
    fn.server.listen(0, '127.0.0.1', () => {
      fn.port = fn.server.address().port;
      resolve(fn);
    });
  });
}

/// Every item of the batched requests to `path` that were answered 2xx, in order.
export function items(fn, path = '/hook') {
  return fn.requests.filter((r) => r.path === path).flatMap((r) => r.json.items);
}

