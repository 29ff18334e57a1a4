// Server-Sent Events read off a fetch() body, as EventSource parses them: one object per
// event block (`id`, `event`, `data` with its lines joined by `\n`), and `comments` for
// the `:keepalive` lines between events.

/// Yields `{id, event, data, comments}` for each block of `body` (a fetch Response body).
export async function* sseBlocks(body) {
  const decoder = new TextDecoder();
  let buffer = '';
  for await (const chunk of body) {
    buffer += decoder.decode(chunk, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { data: [], comments: 0 };
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) { event.comments++; continue; }
        const colon = line.indexOf(':');
        const field = line.slice(0, colon);
        const value = line.slice(colon + 1).replace(/^ /, '');
        if (field === 'data') event.data.push(value);
        else event[field] = value;
      }
      yield { ...event, data: event.data.join('\n') };
    }
  }
}
