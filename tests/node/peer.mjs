// A Node control plane's side of the queue, as the integration tests drive it.
//
//   node peer.mjs run SPEC.json     add jobs with Node BullMQ, follow them with QueueEvents until
//                                   each one completes or fails, then print one JSON report:
//                                   {events: [...], jobs: {id: {state, returnvalue, failedReason,
//                                   progress, logs, processedBy}}}
//   node peer.mjs add SPEC.json     add the jobs and print their ids
//   node peer.mjs cancel SPEC.json  set the cancel key and publish a cancel-job event (CONTRACT §8)
//   node peer.mjs promote SPEC.json promote delayed jobs (spec.jobIds) as an operator would
//   node peer.mjs schedule SPEC.json upsertJobScheduler(spec.schedulerId, spec.repeat, spec.template)
//                                   until spec.iterations jobs of it finished, then remove it and
//                                   print {jobs: {id: {state, returnvalue, failedReason}}}
//
// SPEC: {redis: "redis://...", prefix, queue, timeoutMs, jobs: [{name, data, opts}],
//        runId, reason}
import { readFileSync } from 'node:fs';
import { Queue, QueueEvents, QueueEventsProducer } from 'bullmq';
import IORedis from 'ioredis';
import redisUrl from '../../scripts/status-sink/src/redis-url.js';

const [command, specPath] = process.argv.slice(2);
const spec = JSON.parse(readFileSync(specPath === '-' ? 0 : specPath, 'utf8'));
// Any of the runner's URL forms: one server, Sentinel or Cluster.
const connection = () =>
  redisUrl.createRedis(IORedis, spec.redis ?? 'redis://127.0.0.1:6379/0', { maxRetriesPerRequest: null });
const prefix = spec.prefix ?? 'bull';
const queueName = spec.queue ?? 'workflow-runs';

async function add(queue) {
  const ids = [];
  for (const job of spec.jobs ?? []) {
    const added = await queue.add(job.name ?? 'workflow_run', job.data, job.opts ?? {});
    ids.push(added.id);
  }
  return ids;
}

async function run() {
  const queue = new Queue(queueName, { connection: connection(), prefix });
  const events = new QueueEvents(queueName, { connection: connection(), prefix });
  await events.waitUntilReady();
  const seen = [];
  const announced = new Set(); // jobs whose completed/failed event arrived
  events.on('progress', ({ jobId, data }) => seen.push({ event: 'progress', jobId, data }));
  events.on('completed', ({ jobId, returnvalue }) => {
    seen.push({ event: 'completed', jobId, returnvalue });
    announced.add(jobId);
  });
  events.on('failed', ({ jobId, failedReason }) => {
    seen.push({ event: 'failed', jobId, failedReason });
    announced.add(jobId);
  });
  const ids = await add(queue);
  // The job's own state decides when it is over: QueueEvents may start reading after a fast
  // job already finished. Then give its events a moment to arrive.
  const deadline = Date.now() + (spec.timeoutMs ?? 30000);
  const pending = new Set(ids);
  while (pending.size > 0 && Date.now() < deadline) {
    for (const id of [...pending]) {
      const state = await queue.getJobState(id);
      if (state === 'completed' || state === 'failed') pending.delete(id);
    }
    if (pending.size > 0) await new Promise((r) => setTimeout(r, 25));
  }
  const eventsDeadline = Date.now() + 2000;
  while (ids.some((id) => !announced.has(id)) && Date.now() < eventsDeadline) {
    await new Promise((r) => setTimeout(r, 10));
  }
  const jobs = {};
  for (const id of ids) {
    const job = await queue.getJob(id);
    const { logs } = await queue.getJobLogs(id);
    jobs[id] = {
      state: job ? await job.getState() : 'missing',
      returnvalue: job?.returnvalue ?? null,
      failedReason: job?.failedReason ?? null,
      progress: job?.progress ?? null,
      processedBy: job?.processedBy ?? null,
      attemptsMade: job?.attemptsMade ?? null,
      logs,
    };
  }
  // Wait for the write: a report over the pipe's buffer would otherwise be cut by exit().
  const report = JSON.stringify({ ids, unfinished: [...pending], events: seen, jobs }) + '\n';
  await new Promise((resolve) => process.stdout.write(report, resolve));
  await events.close();
  await queue.close();
}

async function cancel() {
  const redis = connection();
  await redis.set(`${prefix}:${queueName}:cancel:${spec.runId}`, spec.reason ?? 'canceled', 'EX', 86400);
  const producer = new QueueEventsProducer(queueName, { connection: redis, prefix });
  await producer.publishEvent({ eventName: 'cancel-job', jobId: spec.runId, reason: spec.reason ?? 'canceled' }, 10000);
  await producer.close();
  await redis.quit();
}

async function schedule() {
  const queue = new Queue(queueName, { connection: connection(), prefix });
  await queue.upsertJobScheduler(spec.schedulerId, spec.repeat, spec.template);
  const deadline = Date.now() + (spec.timeoutMs ?? 30000);
  let finished = [];
  while (Date.now() < deadline) {
    finished = [...(await queue.getJobs(['completed', 'failed'], 0, -1))];
    if (finished.length >= spec.iterations) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  await queue.removeJobScheduler(spec.schedulerId);
  const jobs = {};
  for (const job of finished.sort((a, b) => a.timestamp - b.timestamp)) {
    jobs[job.id] = {
      state: await job.getState(),
      returnvalue: job.returnvalue ?? null,
      failedReason: job.failedReason ?? null,
    };
  }
  process.stdout.write(JSON.stringify({ jobs }) + '\n');
  await queue.close();
}

try {
  if (command === 'run') await run();
  else if (command === 'schedule') await schedule();
  else if (command === 'add') {
    const queue = new Queue(queueName, { connection: connection(), prefix });
    process.stdout.write(JSON.stringify({ ids: await add(queue) }) + '\n');
    await queue.close();
  } else if (command === 'cancel') await cancel();
  else if (command === 'promote') {
    const queue = new Queue(queueName, { connection: connection(), prefix });
    for (const id of spec.jobIds) await (await queue.getJob(id)).promote();
    await queue.close();
  }
  else throw new Error(`unknown command ${command}`);
  process.exit(0);
} catch (err) {
  process.stderr.write(`${err.stack ?? err}\n`);
  process.exit(1);
}
