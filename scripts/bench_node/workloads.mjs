// The benchmark's workloads as the control plane would enqueue them: `workflow_run` jobs whose
// data carries the WorkflowVersion inline (CONTRACT §2-3), optionally with sealedCredentials.
//   w3: GET /customers/{id}, POST /tickets templated from it, GET /tickets/{id}
//   w1: GET /customers/{id}
//   slow: GET /slow/{id} (the server answers after --slow-ms)
//   empty: no definition at all; the stock workers' empty-job throughput
import crypto from 'node:crypto';

function connection(baseUrl, auth) {
  if (auth === 'api-key') {
    return {
      id: 'conn_api',
      type: 'API_KEY',
      config: { baseUrl, apiKeyName: 'X-API-Key', apiKeyIn: 'header' },
    };
  }
  return { id: 'conn_api', type: 'NONE', config: { baseUrl } };
}

const ACTIONS = {
  act_get_customer: {
    id: 'act_get_customer',
    name: 'Get customer',
    method: 'GET',
    endpointTemplate: '/customers/{customerId}',
    timeoutMs: 30000,
  },
  act_create_ticket: {
    id: 'act_create_ticket',
    name: 'Create ticket',
    method: 'POST',
    endpointTemplate: '/tickets',
    headersTemplate: { 'X-Region': '{{ env.REGION }}' },
    idempotencyHeader: 'Idempotency-Key',
    timeoutMs: 30000,
  },
  act_get_ticket: {
    id: 'act_get_ticket',
    name: 'Get ticket',
    method: 'GET',
    endpointTemplate: '/tickets/{ticketId}',
    timeoutMs: 30000,
  },
  act_slow: {
    id: 'act_slow',
    name: 'Slow call',
    method: 'GET',
    endpointTemplate: '/slow/{id}',
    timeoutMs: 600000,
  },
};

const STEPS = {
  fetch_customer: {
    key: 'fetch_customer',
    actionId: 'act_get_customer',
    connectionId: 'conn_api',
    input: { path: { customerId: '{{ input.customerId }}' } },
    extract: { email: '$.body.email' },
  },
  create_ticket: {
    key: 'create_ticket',
    actionId: 'act_create_ticket',
    connectionId: 'conn_api',
    input: {
      body: {
        requester: '{{ steps.fetch_customer.output.email }}',
        region: '{{ env.REGION }}',
        subject: 'Order {{ input.orderNo }} for {{ steps.fetch_customer.output.body.name }}',
        priority: '{{ input.priority }}',
      },
    },
  },
  get_ticket: {
    key: 'get_ticket',
    actionId: 'act_get_ticket',
    connectionId: 'conn_api',
    input: { path: { ticketId: '{{ steps.create_ticket.output.body.id }}' } },
  },
  slow: {
    key: 'slow',
    actionId: 'act_slow',
    connectionId: 'conn_api',
    input: { path: { id: '{{ input.customerId }}' } },
  },
};

const SHAPES = {
  w3: ['fetch_customer', 'create_ticket', 'get_ticket'],
  w1: ['fetch_customer'],
  slow: ['slow'],
};

export function workflowVersion(workload, baseUrl, auth) {
  const steps = SHAPES[workload].map((key) => STEPS[key]);
  const actions = Object.fromEntries(steps.map((s) => [s.actionId, ACTIONS[s.actionId]]));
  return {
    id: `wfv_bench_${workload}`,
    workflowId: `wf_bench_${workload}`,
    version: 1,
    parameterSchema: {
      type: 'object',
      required: ['customerId'],
      properties: { customerId: { type: 'string' } },
    },
    envConfig: { vars: { REGION: 'eu' } },
    timeoutMs: 300000,
    graph: { steps },
    actions,
    connections: { conn_api: connection(baseUrl, auth) },
  };
}

function b64url(buf) {
  return buf.toString('base64url');
}

// CONTRACT §4: v1.<nonce>.<ciphertext||tag>, AES-256-GCM, the run id as associated data.
export function seal(plaintext, key, runId) {
  const nonce = crypto.randomBytes(12);
  const cipher = crypto.createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(Buffer.from(runId));
  const sealed = Buffer.concat([cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
  return `v1.${b64url(nonce)}.${b64url(sealed)}`;
}

export function unseal(envelope, key, runId) {
  const [, nonce64, sealed64] = envelope.split('.');
  const sealed = Buffer.from(sealed64, 'base64url');
  const decipher = crypto.createDecipheriv('aes-256-gcm', key, Buffer.from(nonce64, 'base64url'));
  decipher.setAAD(Buffer.from(runId));
  decipher.setAuthTag(sealed.subarray(sealed.length - 16));
  return Buffer.concat([decipher.update(sealed.subarray(0, sealed.length - 16)), decipher.final()]);
}

// One job's data. `version` is built once per fill and shared: the producer does not pay for it.
export function jobData(workload, runId, customerId, i, version, opts) {
  if (workload === 'empty') return { i };
  const data = {
    workflowRunId: runId,
    workflowVersionId: version.id,
    tenantId: 'ten_bench',
    input: { customerId, orderNo: i, priority: 2 },
    workflowVersion: version,
  };
  if (opts.auth === 'api-key') {
    const creds = {
      connections: {
        conn_api: { ...version.connections.conn_api, secrets: { apiKey: opts.apiKey } },
      },
      secrets: {},
    };
    data.sealedCredentials = seal(Buffer.from(JSON.stringify(creds)), opts.key, runId);
  }
  return data;
}
