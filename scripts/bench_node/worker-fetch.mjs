// Node BullMQ baseline doing the workloads with the global `fetch` (undici, keep-alive).
import { startWorker } from './worker-common.mjs';

async function call(method, url, headers, body) {
  const res = await fetch(url, { method, headers, body });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

startWorker(call, 'bench-node-fetch');
