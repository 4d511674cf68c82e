// What both Node baselines share: a BullMQ Worker doing W3/W1 the way a control-plane team
// would write it by hand. Per W3 run it writes what the runner writes for the contract:
// 8 status events (XADD MAXLEN ~ 100000, one per transition, each awaited before going on)
// and 3 progress updates, and returns the same small summary. Only the HTTP client differs
// (worker-fetch.mjs, worker-http.mjs).
//
// Env: REDIS_URL, QUEUE, PREFIX (bull), CONCURRENCY (50), STATUS_STREAM ({prefix}:{queue}:status),
// CREDENTIALS_KEY (base64; to open sealedCredentials). Jobs without a workflowVersionId are
// empty jobs: the worker returns at once.
import { Worker } from 'bullmq';
import IORedis from 'ioredis';
import { unseal } from './workloads.mjs';

const redisUrl = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379/0';
const queueName = process.env.QUEUE ?? 'workflow-runs';
const prefix = process.env.PREFIX ?? 'bull';
const concurrency = Number(process.env.CONCURRENCY ?? 50);
const stream = process.env.STATUS_STREAM || `${prefix}:${queueName}:status`;
const credentialsKey = process.env.CREDENTIALS_KEY
  ? Buffer.from(process.env.CREDENTIALS_KEY, 'base64')
  : null;

// Each step: how to build its request from the input and the outputs so far.
const REQUESTS = {
  fetch_customer: (d) => ({ method: 'GET', path: `/customers/${encodeURIComponent(d.input.customerId)}` }),
  create_ticket: (d, out) => ({
    method: 'POST',
    path: '/tickets',
    headers: {
      'Content-Type': 'application/json',
      'X-Region': 'eu',
      'Idempotency-Key': `${d.workflowRunId}:create_ticket`,
    },
    body: JSON.stringify({
      requester: out.fetch_customer.body.email,
      region: 'eu',
      subject: `Order ${d.input.orderNo} for ${out.fetch_customer.body.name}`,
      priority: d.input.priority,
    }),
  }),
  get_ticket: (d, out) => ({ method: 'GET', path: `/tickets/${encodeURIComponent(out.create_ticket.body.id)}` }),
  slow: (d) => ({ method: 'GET', path: `/slow/${encodeURIComponent(d.input.customerId)}` }),
};

export function startWorker(call, label) {
  const events = new IORedis(redisUrl, { maxRetriesPerRequest: null });

  async function run(job) {
    const d = job.data;
    if (!d.workflowVersionId) return null;
    const conn = d.workflowVersion.connections.conn_api;
    const base = conn.config.baseUrl;
    const auth = {};
    if (d.sealedCredentials) {
      const creds = JSON.parse(unseal(d.sealedCredentials, credentialsKey, d.workflowRunId));
      auth[conn.config.apiKeyName] = creds.connections.conn_api.secrets.apiKey;
    }
    const keys = d.workflowVersion.graph.steps.map((s) => s.key);
    const common = {
      v: 1,
      workflowRunId: d.workflowRunId,
      tenantId: d.tenantId,
      workflowVersionId: d.workflowVersionId,
      jobId: job.id,
    };
    let seq = 0;
    const emit = (fields) =>
      events.xadd(stream, 'MAXLEN', '~', 100000, '*', 'event',
        JSON.stringify({ ...common, seq: ++seq, at: Date.now(), ...fields }));

    const runStarted = Date.now();
    await emit({ kind: 'run', status: 'RUNNING', startedAt: runStarted });
    const outputs = {};
    const summary = {};
    let completed = 0;
    for (const key of keys) {
      const started = Date.now();
      const step = { kind: 'step', stepKey: key, stepRunId: `${d.workflowRunId}:${key}`, attempt: 1 };
      await emit({ ...step, status: 'RUNNING', startedAt: started });
      const req = REQUESTS[key](d, outputs);
      const res = await call(req.method, base + req.path, { ...auth, ...req.headers }, req.body);
      if (res.status >= 400) throw new Error(`HTTP_ERROR: ${key} answered ${res.status}`);
      outputs[key] = res;
      const finished = Date.now();
      await emit({
        ...step, status: 'SUCCESS', startedAt: started, finishedAt: finished,
        output: { status: res.status, body: res.body }, errorCode: null, errorMessage: null,
      });
      completed += 1;
      await job.updateProgress({
        progress: Math.round((100 * completed) / keys.length),
        stepKey: key, status: 'SUCCESS', completedSteps: completed, totalSteps: keys.length,
      });
      summary[key] = { status: 'SUCCESS', attempts: 1, durationMs: finished - started };
    }
    const now = Date.now();
    await emit({ kind: 'run', status: 'SUCCESS', startedAt: runStarted, finishedAt: now });
    return { workflowRunId: d.workflowRunId, status: 'SUCCESS', durationMs: now - runStarted, steps: summary };
  }

  const worker = new Worker(queueName, run, {
    connection: new IORedis(redisUrl, { maxRetriesPerRequest: null }),
    prefix,
    concurrency,
    name: label,
  });
  worker.on('error', (err) => process.stderr.write(`worker error: ${err.message}\n`));
  const stop = async () => {
    await worker.close();
    await events.quit();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  return worker;
}
