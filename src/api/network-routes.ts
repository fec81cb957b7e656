/**
 * Network routes: gvisor-tap-vsock's (so existing tooling such as podman machine and
 * crc keeps working) and tender's own typed `/v1/` routes.
 */
import { Type, type Static } from '@sinclair/typebox';
import { isIP } from 'node:net';
import { ip4 } from '../../netstack/addr.js';
import { ForwardSpecError, parseForwardSpec, type ForwardSpec } from '../../netstack/services/forward-spec.js';
import { ForwardError, type Forward } from '../../netstack/services/forwards.js';
import type { Network } from '../../netstack/network.js';
import { TenderError } from '../errors.js';
import type { Api } from './server.js';

const ErrorBody = Type.Object({ code: Type.String(), message: Type.String() }, { $id: 'Error' });

const ForwardT = Type.Object({
  protocol: Type.Union([Type.Literal('tcp'), Type.Literal('udp')]),
  hostIp: Type.String(),
  hostPort: Type.Integer(),
  guestIp: Type.String(),
  guestPort: Type.Integer(),
  spec: Type.String(),
});

const GvForward = Type.Object({
  local: Type.String({ maxLength: 300 }),
  remote: Type.Optional(Type.String({ maxLength: 300 })),
  protocol: Type.Optional(Type.Union([Type.Literal('tcp'), Type.Literal('udp'), Type.Literal('unix'), Type.Literal('')])),
});

const errorResponses = { 400: ErrorBody, 404: ErrorBody, 409: ErrorBody };

/** Map netstack's coded errors to TenderError (the one table of codes). */
function coded(err: unknown): never {
  if (err instanceof ForwardSpecError) throw new TenderError('BAD_FORWARD_SPEC', err.message);
  if (err instanceof ForwardError) throw new TenderError(err.code, err.message);
  throw err;
}

/** "host:port", "[v6]:port", ":port" (all interfaces, as gvisor-tap-vsock does). */
function splitHostPort(s: string, what: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(s);
  if (!m) throw new TenderError('BAD_REQUEST', `${what} "${s}" is not HOST:PORT`);
  const host = m[1] ?? m[2] ?? '';
  const port = Number(m[3]);
  if (port > 65535) throw new TenderError('BAD_REQUEST', `${what} port ${port} is above 65535`);
  if (host !== '' && isIP(host) === 0) throw new TenderError('BAD_REQUEST', `${what} host "${host}" is not an IP address`);
  return { host, port };
}

function hostText(h: string): string {
  return h.includes(':') ? `[${h}]` : h;
}

export function registerNetworkRoutes(app: Api, net: Network, opts: { v1Prefix?: string } = {}): void {
  const v1 = opts.v1Prefix ?? '/v1';
  if (!app.getSchema('Error')) app.addSchema(ErrorBody);

  // ---- gvisor-tap-vsock compatible ----
  app.post('/services/forwarder/expose', { schema: { tags: ['gvisor-tap-vsock'], body: GvForward } }, async (req, reply) => {
    const proto = req.body.protocol || 'tcp';
    if (proto === 'unix') throw new TenderError('BAD_REQUEST', 'unix socket forwards are not supported yet');
    const local = splitHostPort(req.body.local, 'local');
    if (!req.body.remote) throw new TenderError('BAD_REQUEST', 'remote is required');
    const remote = splitHostPort(req.body.remote, 'remote');
    if (isIP(remote.host) !== 4) throw new TenderError('BAD_REQUEST', `remote "${req.body.remote}" must be an IPv4 guest address`);
    if (remote.port === 0) throw new TenderError('BAD_REQUEST', 'remote port 0');
    const spec: ForwardSpec = { protocol: proto, hostIp: local.host === '' ? '0.0.0.0' : local.host, hostPort: local.port, guestPort: remote.port };
    await net.forwards.add(spec, ip4(remote.host)).catch(coded);
    return reply.status(200).send();
  });

  app.post('/services/forwarder/unexpose', { schema: { tags: ['gvisor-tap-vsock'], body: GvForward } }, async (req, reply) => {
    const proto = req.body.protocol || 'tcp';
    if (proto === 'unix') throw new TenderError('BAD_REQUEST', 'unix socket forwards are not supported yet');
    const local = splitHostPort(req.body.local, 'local');
    try {
      net.forwards.remove(proto, local.host === '' ? '0.0.0.0' : local.host, local.port);
    } catch (err) {
      coded(err);
    }
    return reply.status(200).send();
  });

  app.get('/services/forwarder/all', { schema: { tags: ['gvisor-tap-vsock'] } }, async () =>
    net.forwards.list().map((f) => ({
      local: `${hostText(f.hostIp)}:${f.hostPort}`,
      remote: `${f.guestIp}:${f.guestPort}`,
      protocol: f.protocol,
    })),
  );

  app.get('/services/dhcp/leases', { schema: { tags: ['gvisor-tap-vsock'] } }, async () => {
    const out: Record<string, string> = {};
    for (const l of net.dhcp.leases()) out[l.ip] = l.mac;
    return out;
  });

  // ---- tender /v1 ----
  app.get(`${v1}/forwards`, { schema: { tags: ['forwards'], response: { 200: Type.Array(ForwardT) } } }, async () => net.forwards.list());

  const AddForward = Type.Object(
    {
      spec: Type.String({ minLength: 1, maxLength: 200, description: '[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]' }),
      guestIp: Type.Optional(Type.String({ maxLength: 15, description: 'default: the network\'s default guest' })),
    },
    { additionalProperties: false },
  );
  app.post(`${v1}/forwards`, { schema: { tags: ['forwards'], body: AddForward, response: { 201: Type.Array(ForwardT), ...errorResponses } } }, async (req, reply) => {
    let specs: ForwardSpec[];
    try {
      specs = parseForwardSpec(req.body.spec);
    } catch (err) {
      coded(err);
    }
    const guestText = req.body.guestIp ?? net.defaultGuest();
    if (guestText === null) throw new TenderError('BAD_REQUEST', 'no guest address: give guestIp');
    if (isIP(guestText) !== 4) throw new TenderError('BAD_REQUEST', `guestIp "${guestText}" is not an IPv4 address`);
    const added: Forward[] = [];
    try {
      for (const s of specs) added.push(await net.forwards.add(s, ip4(guestText)));
    } catch (err) {
      // All or nothing for a range.
      for (const a of added) net.forwards.remove(a.protocol, a.hostIp, a.hostPort);
      coded(err);
    }
    return reply.status(201).send(added);
  });

  const DelParams = Type.Object({
    protocol: Type.Union([Type.Literal('tcp'), Type.Literal('udp')]),
    hostIp: Type.String({ maxLength: 64 }),
    hostPort: Type.String({ pattern: '^[0-9]{1,5}$' }),
  });
  app.delete(`${v1}/forwards/:protocol/:hostIp/:hostPort`, { schema: { tags: ['forwards'], params: DelParams, response: { 200: ForwardT, ...errorResponses } } }, async (req) => {
    try {
      return net.forwards.remove(req.params.protocol, req.params.hostIp, Number(req.params.hostPort));
    } catch (err) {
      coded(err);
    }
  });

  const Lease = Type.Object({ ip: Type.String(), mac: Type.String(), hostname: Type.Optional(Type.String()), expiresAt: Type.Number() });
  app.get(`${v1}/leases`, { schema: { tags: ['dhcp'], response: { 200: Type.Array(Lease) } } }, async () => net.dhcp.leases());

  const DnsRecordT = Type.Object({ name: Type.String(), address: Type.String() });
  app.get(`${v1}/dns/records`, { schema: { tags: ['dns'], response: { 200: Type.Array(DnsRecordT) } } }, async () =>
    net.dns.records.list().map((r) => ({ name: r.name, address: r.address })),
  );
  const AddRecord = Type.Object(
    { name: Type.String({ minLength: 1, maxLength: 253 }), address: Type.String({ minLength: 2, maxLength: 45 }) },
    { additionalProperties: false },
  );
  app.post(`${v1}/dns/records`, { schema: { tags: ['dns'], body: AddRecord, response: { 201: DnsRecordT, ...errorResponses } } }, async (req, reply) => {
    if (isIP(req.body.address) === 0) throw new TenderError('BAD_DNS_RECORD', `"${req.body.address}" is not an IP address`);
    if (!net.dns.records.add(req.body.name, req.body.address)) {
      throw new TenderError('BAD_DNS_RECORD', `"${req.body.name}" is not a valid DNS name`);
    }
    return reply.status(201).send({ name: req.body.name.toLowerCase().replace(/\.$/, ''), address: req.body.address });
  });

  app.get(`${v1}/stats`, { schema: { tags: ['stats'] } }, async () => net.stats());
}

export type AddForwardBody = Static<typeof GvForward>;
