// Reading a node's /metrics (Prometheus text exposition, on its admin port).

/// The value of `name{labels…}` in `text`: the first sample of that name whose labels
/// include all of `labels` (others, such as every series' `node` and `region`, may be
/// present), or `undefined`.
export function sample(text, name, labels = {}) {
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = Object.fromEntries([...(m[2] || '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((l) => [l[1], l[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) return Number(m[3]);
  }
  return undefined;
}

/// `GET http://host:port/metrics` as text.
export async function scrape(host, port) {
  return (await fetch(`http://${host}:${port}/metrics`)).text();
}
