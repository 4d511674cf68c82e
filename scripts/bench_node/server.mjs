// The API the benchmark's workloads call: a plain node:http keep-alive server, one process,
// stateless so that thousands of runs cost it no memory. Chosen over aiohttp because it serves
// W3's three requests at several times the rate any contender asks for, on a fraction of a core
// (scripts/bench reports its CPU per run so that this stays checked).
//
//   GET  /customers/{id}   -> {"id", "email", "name"}
//   POST /tickets          -> 201 {"id": "t_<n>", ...body}
//   GET  /tickets/{id}     -> {"id", "status": "open"}
//   GET  /slow/{id}        -> {"id"} after --slow-ms (default 5000); with a barrier of N set
//                             (POST /__slow?barrier=N&ms=M), every slow request is held until N
//                             are in flight at once, and all are answered M ms after that
//                             (or when released by POST /__slow?release=1), so that N runs are in flight
//                             however fast the worker picks them up
//   GET  /__arrivals       -> {id: hrtime ns} of first requests for ids starting "pk_", then forgets them
//   GET  /__stats          -> {"requests", "inFlight", "peakInFlight"}; POST /__stats/reset
//
// With --key K every workload request needs `X-API-Key: K`, else 401.
// Prints `listening <port>` once ready.
import http from 'node:http';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith('--')) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const port = Number(args.port ?? 0);
const slowMs = Number(args['slow-ms'] ?? 5000);
const apiKey = args.key ?? '';

let requests = 0;
let inFlight = 0;
let peakInFlight = 0;
let ticketIds = 0;
let arrivals = {};
let barrier = 0;
let barrierMs = slowMs;
let slowWaiting = [];
let slowInFlight = 0;

function releaseSlow() {
  const waiting = slowWaiting;
  slowWaiting = [];
  setTimeout(() => waiting.forEach((answer) => answer()), barrierMs);
}

function send(res, status, value) {
  const body = JSON.stringify(value);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(body),
  });
  res.end(body);
}

function lastSegment(path) {
  return decodeURIComponent(path.slice(path.lastIndexOf('/') + 1));
}

const server = http.createServer((req, res) => {
  const arrived = process.hrtime.bigint();
  const url = req.url ?? '/';
  const q = url.indexOf('?');
  const path = q < 0 ? url : url.slice(0, q);

  if (path.startsWith('/__')) {
    if (path === '/__arrivals') {
      const out = arrivals;
      arrivals = {};
      return send(res, 200, out);
    }
    if (path === '/__slow' && req.method === 'POST') {
      const params = new URLSearchParams(q < 0 ? '' : url.slice(q + 1));
      if (params.get('release')) {
        barrier = 0;
        releaseSlow();
        return send(res, 200, { released: true });
      }
      barrier = Number(params.get('barrier') ?? 0);
      barrierMs = Number(params.get('ms') ?? slowMs);
      return send(res, 200, { barrier, ms: barrierMs });
    }
    if (path === '/__stats') {
      if (req.method === 'POST') {
        requests = 0;
        peakInFlight = inFlight;
      }
      return send(res, 200, { requests, inFlight, peakInFlight });
    }
    return send(res, 404, { error: 'no such route' });
  }

  requests += 1;
  inFlight += 1;
  if (inFlight > peakInFlight) peakInFlight = inFlight;
  res.on('close', () => {
    inFlight -= 1;
  });

  if (apiKey && req.headers['x-api-key'] !== apiKey) {
    req.resume();
    return send(res, 401, { error: 'unauthorized' });
  }
  if (req.method === 'GET' && path.startsWith('/customers/')) {
    const id = lastSegment(path);
    if (id.startsWith('pk_') && !(id in arrivals)) arrivals[id] = arrived.toString();
    return send(res, 200, { id, email: `${id}@example.com`, name: `Customer ${id}` });
  }
  if (req.method === 'POST' && path === '/tickets') {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      let body = {};
      try {
        body = JSON.parse(Buffer.concat(chunks).toString() || '{}');
      } catch {
        return send(res, 400, { error: 'body is not JSON' });
      }
      ticketIds += 1;
      send(res, 201, { id: `t_${ticketIds}`, ...body });
    });
    return undefined;
  }
  if (req.method === 'GET' && path.startsWith('/tickets/')) {
    return send(res, 200, { id: lastSegment(path), status: 'open' });
  }
  if (req.method === 'GET' && path.startsWith('/slow/')) {
    const id = lastSegment(path);
    if (!barrier) {
      const timer = setTimeout(() => send(res, 200, { id }), slowMs);
      res.on('close', () => clearTimeout(timer));
      return undefined;
    }
    let answered = false;
    const answer = () => {
      if (answered) return;
      answered = true;
      slowInFlight -= 1;
      send(res, 200, { id });
    };
    const cap = setTimeout(answer, 600_000);
    res.on('close', () => clearTimeout(cap));
    slowInFlight += 1;
    slowWaiting.push(answer);
    if (slowInFlight >= barrier) releaseSlow();
    return undefined;
  }
  req.resume();
  return send(res, 404, { error: 'no such route' });
});

// Keep idle keep-alive sockets open longer than any pause between a worker's requests.
server.keepAliveTimeout = 120_000;
server.headersTimeout = 125_000;
server.requestTimeout = 0;
server.maxRequestsPerSocket = 0;
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.on('SIGTERM', () => process.exit(0));
