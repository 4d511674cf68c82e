// The benchmark's producer, a Node `bullmq` Queue as the control plane uses it.
//
//   node producer.mjs fill   --queue Q --workload w3|w1|slow|empty --count N --base-url U [...]
//     adds N jobs (jobId = workflowRunId = <id-prefix><i>), prints `filled N`.
//   node producer.mjs pickup --queue Q --workload w3|w1 --samples K --tag T --base-url U [...]
//     adds one job at a time to an idle worker, waits for it to finish, pauses, repeats; prints
//     {"t0": {customerId: hrtime ns just before add}, "failed": n}. The server's /__arrivals
//     has the other end (both clocks are CLOCK_MONOTONIC).
// Common: --redis URL (redis://127.0.0.1:6379/0) --prefix bull --auth none|api-key
//         --api-key K --key-b64 B (RUNNER_CREDENTIALS_KEY, for sealedCredentials)
import { Queue, QueueEvents } from 'bullmq';
import IORedis from 'ioredis';
import { jobData, workflowVersion } from './workloads.mjs';

const [command, ...rest] = process.argv.slice(2);
const args = {};
for (let i = 0; i < rest.length; i += 2) args[rest[i].replace(/^--/, '')] = rest[i + 1];

const redisUrl = args.redis ?? 'redis://127.0.0.1:6379/0';
const prefix = args.prefix ?? 'bull';
const workload = args.workload ?? 'w3';
const opts = {
  auth: args.auth ?? 'none',
  apiKey: args['api-key'] ?? '',
  key: args['key-b64'] ? Buffer.from(args['key-b64'], 'base64') : null,
};
const version = workload === 'empty' ? null : workflowVersion(workload, args['base-url'], opts.auth);

const connection = new IORedis(redisUrl, { maxRetriesPerRequest: null });
const queue = new Queue(args.queue, { connection, prefix });
const jobOpts = { attempts: 1, removeOnComplete: false, removeOnFail: false };

async function fill() {
  const count = Number(args.count);
  const idPrefix = args['id-prefix'] ?? 'run_';
  const chunk = 1000;
  for (let start = 0; start < count; start += chunk) {
    const jobs = [];
    for (let i = start; i < Math.min(count, start + chunk); i += 1) {
      const runId = `${idPrefix}${i}`;
      jobs.push({
        name: 'workflow_run',
        data: jobData(workload, runId, `c_${i}`, i, version, opts),
        opts: { ...jobOpts, jobId: runId },
      });
    }
    await queue.addBulk(jobs);
  }
  process.stdout.write(`filled ${count}\n`);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function pickup() {
  const samples = Number(args.samples ?? 50);
  const tag = args.tag ?? 'x';
  const gapMin = Number(args['gap-ms-min'] ?? 30);
  const gapMax = Number(args['gap-ms-max'] ?? 80);
  const events = new QueueEvents(args.queue, {
    connection: new IORedis(redisUrl, { maxRetriesPerRequest: null }),
    prefix,
  });
  await events.waitUntilReady();
  const t0 = {};
  let failed = 0;
  for (let i = 0; i < samples; i += 1) {
    // A pause long enough for the worker to be back in its blocking wait: "at idle".
    await sleep(gapMin + Math.random() * (gapMax - gapMin));
    const id = `pk_${tag}_${i}`;
    const data = jobData(workload, id, id, i, version, opts);
    t0[id] = process.hrtime.bigint().toString();
    const job = await queue.add('workflow_run', data, { ...jobOpts, jobId: id });
    try {
      await job.waitUntilFinished(events, 30000);
    } catch {
      failed += 1;
    }
  }
  process.stdout.write(`${JSON.stringify({ t0, failed })}\n`);
  await events.close();
}

let code = 0;
try {
  if (command === 'fill') await fill();
  else if (command === 'pickup') await pickup();
  else throw new Error(`unknown command ${command}`);
} catch (err) {
  process.stderr.write(`${err.stack ?? err}\n`);
  code = 1;
} finally {
  await queue.close();
  await connection.quit();
}
// A connection handed to BullMQ is never closed by it (QueueEvents' blocking one): leave.
process.exit(code);
