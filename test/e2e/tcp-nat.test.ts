/**
 * TCP through the userspace network, end to end: the Linux kernel in a namespace is the
 * guest; curl, iperf3, dig and small Node programs are the clients; host servers listen on
 * 127.0.0.1 and are reached through the host alias 192.168.127.254. Port forwards go the other
 * way, and the network API is driven with curl over its unix socket.
 */
import { createHash } from 'node:crypto';
import dgram from 'node:dgram';
import http from 'node:http';
import net from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serveNetns, type ServedNetns } from '../../src/commands/netns.js';
import { createLogger } from '../../src/log.js';
import { addNetns, delNetns, hasCommand, isRoot, nsExec, nsName, run, waitFor } from '../helpers/netns.js';

const canRun = isRoot && (await hasCommand('curl')) && (await hasCommand('iperf3'));
const MiB = 1024 * 1024;

/** Deterministic bytes, so both ends can hash without storing the data. */
function pattern(n: number): Buffer {
  const b = Buffer.alloc(n);
  let x = 0x12345678;
  for (let i = 0; i < n; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  return b;
}

describe.skipIf(!canRun)('TCP NAT, port forwarding and the API, end to end', () => {
  const ns = nsName('tcp');
  const dir = mkdtempSync(join(tmpdir(), 'tender-tcp-'));
  const api = join(dir, 'api.sock');
  let served: ServedNetns;
  let httpServer: http.Server;
  let port = 0;
  const big = pattern(200 * MiB);
  const bigHash = createHash('sha256').update(big).digest('hex');

  beforeAll(async () => {
    await addNetns(ns);
    httpServer = http.createServer((req, res) => {
      if (req.method === 'POST') {
        const h = createHash('sha256');
        let n = 0;
        req.on('data', (c: Buffer) => {
          n += c.length;
          h.update(c);
        });
        req.on('end', () => res.end(`${n} ${h.digest('hex')}`));
      } else if (req.url === '/big') {
        res.setHeader('content-length', big.length);
        res.end(big);
      } else {
        res.end(`hello ${req.socket.remoteAddress}`);
      }
    });
    await new Promise<void>((r) => httpServer.listen(0, '127.0.0.1', r));
    port = (httpServer.address() as net.AddressInfo).port;
    served = await serveNetns(
      ns,
      { ifname: 'eth0', mtu: '1500', dnsUpstream: [], hostLoopback: true, configure: true, apiSocket: api, forward: ['0:8080', '0:5353/udp'] },
      createLogger('warn'),
    );
  });

  afterAll(async () => {
    await served?.stop();
    httpServer?.close();
    await delNetns(ns);
    rmSync(dir, { recursive: true, force: true });
  });

  const url = (path = '/') => `http://192.168.127.254:${port}${path}`;

  it('downloads 200 MiB byte-identical', async () => {
    const out = await nsExec(ns, ['sh', '-c', `curl -sS --fail ${url('/big')} | sha256sum`], { timeout: 120_000 });
    expect(out.split(' ')[0]).toBe(bigHash);
  }, 150_000);

  it('uploads 200 MiB byte-identical', async () => {
    // The guest generates the same pattern with Node and streams it up.
    const gen = `const b=Buffer.alloc(${200 * MiB});let x=0x12345678;for(let i=0;i<b.length;i+=4){x^=x<<13;x^=x>>>17;x^=x<<5;b.writeUInt32LE(x>>>0,i)}process.stdout.write(b)`;
    const out = await nsExec(ns, ['sh', '-c', `${process.execPath} -e '${gen}' | curl -sS --fail -X POST --data-binary @- ${url('/up')}`], { timeout: 120_000 });
    expect(out.trim()).toBe(`${200 * MiB} ${bigHash}`);
  }, 150_000);

  it('fails fast on a refused port (RST, not a timeout)', async () => {
    const closed = await new Promise<number>((resolve) => {
      const s = net.createServer().listen(0, '127.0.0.1', () => {
        const p = (s.address() as net.AddressInfo).port;
        s.close(() => resolve(p));
      });
    });
    // curl exit 7 = "couldn't connect" (refused); 28 would be a timeout.
    const r = await run('ip', ['netns', 'exec', ns, 'curl', '-sS', '-m', '10', `http://192.168.127.254:${closed}/`]).catch((e) => e);
    expect(r.code).toBe(7);
  });

  it('carries a half-close both ways', async () => {
    // The server reads until the client's FIN, then answers and closes.
    const srv = net.createServer((s) => {
      const chunks: Buffer[] = [];
      s.on('data', (c) => chunks.push(c));
      s.on('end', () => s.end(`got ${Buffer.concat(chunks).length} bytes after your FIN`));
    });
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const p = (srv.address() as net.AddressInfo).port;
    const js = `const s=require('net').connect(${p},'192.168.127.254',()=>{s.end(Buffer.alloc(100000,1))});let o='';s.on('data',d=>o+=d);s.on('end',()=>{process.stdout.write(o)});`;
    expect(await nsExec(ns, [process.execPath, '-e', js])).toBe('got 100000 bytes after your FIN');
    srv.close();
  });

  it('keeps carrying the guest\'s bytes after the host peer closed its side first', async () => {
    // The host server says its piece and sends FIN at once, then keeps reading: the guest's
    // answer, written after that FIN, must still reach it (a half-open connection).
    let got!: (s: string) => void;
    const received = new Promise<string>((r) => (got = r));
    const srv = net.createServer({ allowHalfOpen: true }, (s) => {
      s.end('bye first');
      const chunks: Buffer[] = [];
      s.on('data', (c) => chunks.push(c));
      s.on('end', () => got(Buffer.concat(chunks).toString()));
    });
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const p = (srv.address() as net.AddressInfo).port;
    const js = `const s=require('net').connect({port:${p},host:'192.168.127.254',allowHalfOpen:true});let o='';s.on('data',d=>o+=d);s.on('end',()=>{setTimeout(()=>s.end('late answer to '+o),100)});s.on('close',()=>process.exit(0));`;
    await nsExec(ns, [process.execPath, '-e', js]);
    expect(await received).toBe('late answer to bye first');
    srv.close();
  });

  it('handles hundreds of concurrent connections', async () => {
    const srv = net.createServer((s) => s.pipe(s));
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const p = (srv.address() as net.AddressInfo).port;
    const js = `const net=require('net');let ok=0,n=300;const payload=Buffer.alloc(20000,7);
for(let i=0;i<n;i++){const s=net.connect(${p},'192.168.127.254',()=>s.end(payload));let got=0;s.on('data',d=>got+=d.length);
s.on('end',()=>{if(got===payload.length)ok++;if(--n===0||ok===300){process.stdout.write(String(ok));process.exit(0)}});s.on('error',e=>{console.error(e.code);if(--n===0){process.stdout.write(String(ok));process.exit(0)}})}`;
    expect(await nsExec(ns, [process.execPath, '-e', js], { timeout: 60_000 })).toBe('300');
    srv.close();
  }, 90_000);

  it('sustains iperf3 both ways', async () => {
    const iperfPort = 20000 + (process.pid % 20000);
    const server = run('iperf3', ['-s', '-1', '-B', '127.0.0.1', '-p', String(iperfPort), '-J']).catch(() => null);
    await waitFor(async () => (await run('ss', ['-ltn'])).stdout.includes(`127.0.0.1:${iperfPort}`), 5000);
    const up = JSON.parse(await nsExec(ns, ['iperf3', '-c', '192.168.127.254', '-p', String(iperfPort), '-t', '3', '-J'], { timeout: 30_000 }));
    await server;
    expect(up.end.sum_received.bytes).toBeGreaterThan(0);
    const server2 = run('iperf3', ['-s', '-1', '-B', '127.0.0.1', '-p', String(iperfPort), '-J']).catch(() => null);
    await waitFor(async () => (await run('ss', ['-ltn'])).stdout.includes(`127.0.0.1:${iperfPort}`), 5000);
    const down = JSON.parse(await nsExec(ns, ['iperf3', '-c', '192.168.127.254', '-p', String(iperfPort), '-t', '3', '-R', '-J'], { timeout: 30_000 }));
    await server2;
    expect(down.end.sum_received.bytes).toBeGreaterThan(0);
  }, 60_000);

  it('answers DNS over TCP on the gateway', async () => {
    expect((await nsExec(ns, ['dig', '+tcp', '+short', '@192.168.127.1', 'gateway.tender.internal'])).trim()).toBe('192.168.127.1');
  });

  it('forwards a host TCP port into the namespace; the guest sees the host alias', async () => {
    const tcpFwd = served.forwards.find((f) => f.protocol === 'tcp')!;
    expect(tcpFwd.hostPort).toBeGreaterThan(0);
    const js = `require('net').createServer(s=>{s.end('from guest to '+s.remoteAddress.replace('::ffff:',''))}).listen(8080,()=>console.log('listening'))`;
    const guest = run('ip', ['netns', 'exec', ns, process.execPath, '-e', js]).catch(() => null);
    await waitFor(async () => (await nsExec(ns, ['ss', '-ltn'])).includes(':8080'), 10_000);
    const got = await new Promise<string>((resolve, reject) => {
      const s = net.connect(tcpFwd.hostPort, '127.0.0.1');
      let o = '';
      s.on('data', (d) => (o += d));
      s.on('end', () => resolve(o));
      s.on('error', reject);
    });
    expect(got).toBe('from guest to 192.168.127.254');
    await nsExec(ns, ['pkill', '-f', 'listen\\(8080']).catch(() => {});
    await guest;
  });

  it('forwards a half-close from the host client and still delivers the guest\'s reply', async () => {
    // As `nc -N` or an HTTP/1.0 client does: send the request, shut down writing, read the reply.
    const tcpFwd = served.forwards.find((f) => f.protocol === 'tcp')!;
    const js = `require('net').createServer({allowHalfOpen:true},s=>{let n=0;s.on('data',d=>n+=d.length);s.on('end',()=>s.end('read '+n+' bytes'))}).listen(8080,()=>console.log('listening'))`;
    const guest = run('ip', ['netns', 'exec', ns, process.execPath, '-e', js]).catch(() => null);
    await waitFor(async () => (await nsExec(ns, ['ss', '-ltn'])).includes(':8080'), 10_000);
    const got = await new Promise<string>((resolve, reject) => {
      const s = net.connect({ port: tcpFwd.hostPort, host: '127.0.0.1', allowHalfOpen: true }, () => s.end(Buffer.alloc(5000, 1)));
      let o = '';
      s.on('data', (d) => (o += d));
      s.on('end', () => resolve(o));
      s.on('error', reject);
    });
    expect(got).toBe('read 5000 bytes');
    await nsExec(ns, ['pkill', '-f', 'listen\\(8080']).catch(() => {});
    await guest;
  });

  it('shows the guest the real address of a client on another host', async () => {
    // "Another host": a namespace joined to ours by a veth pair, connecting to a forward on 0.0.0.0.
    const client = nsName('cli');
    const hostIf = `tv${process.pid % 100000}`;
    await addNetns(client);
    try {
      await run('ip', ['link', 'add', hostIf, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', client]);
      await run('ip', ['addr', 'add', '10.213.7.1/30', 'dev', hostIf]);
      await run('ip', ['link', 'set', hostIf, 'up']);
      await nsExec(client, ['ip', 'addr', 'add', '10.213.7.2/30', 'dev', 'eth0']);
      await nsExec(client, ['ip', 'link', 'set', 'eth0', 'up']);
      const fwd = await served.network.forwards.add({ protocol: 'tcp', hostIp: '0.0.0.0', hostPort: 0, guestPort: 8081 }, served.network.config.poolStart);
      const js = `require('net').createServer(s=>{s.end(s.remoteAddress.replace('::ffff:',''))}).listen(8081)`;
      const guest = run('ip', ['netns', 'exec', ns, process.execPath, '-e', js]).catch(() => null);
      await waitFor(async () => (await nsExec(ns, ['ss', '-ltn'])).includes(':8081'), 10_000);
      // The guest answers with bare bytes (its view of the client's address): --http0.9 reads them.
      const seen = await nsExec(client, ['curl', '-sS', '--http0.9', '--max-time', '5', `http://10.213.7.1:${fwd.hostPort}/`]);
      expect(seen).toBe('10.213.7.2');
      served.network.forwards.remove('tcp', '0.0.0.0', fwd.hostPort);
      await nsExec(ns, ['pkill', '-f', 'listen\\(8081']).catch(() => {});
      await guest;
    } finally {
      await run('ip', ['link', 'del', hostIf]).catch(() => {});
      await delNetns(client);
    }
  });

  it('closes the host connection promptly when the guest refuses', async () => {
    const tcpFwd = served.forwards.find((f) => f.protocol === 'tcp')!;
    // Nothing listens on 8080 in the guest now.
    const result = await new Promise<string>((resolve) => {
      const s = net.connect(tcpFwd.hostPort, '127.0.0.1');
      s.on('data', () => {});
      s.on('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? 'error'));
      s.on('close', () => resolve('closed'));
    });
    expect(['ECONNRESET', 'closed']).toContain(result);
  });

  it('forwards a host UDP port into the namespace', async () => {
    const udpFwd = served.forwards.find((f) => f.protocol === 'udp')!;
    const js = `const s=require('dgram').createSocket('udp4');s.on('message',(m,r)=>s.send('echo '+m+' from '+r.address,r.port,r.address));s.bind(5353,()=>console.log('ok'))`;
    const guest = run('ip', ['netns', 'exec', ns, process.execPath, '-e', js]).catch(() => null);
    await waitFor(async () => (await nsExec(ns, ['ss', '-lun'])).includes(':5353'), 10_000);
    const c = dgram.createSocket('udp4');
    const reply = await new Promise<string>((resolve) => {
      c.on('message', (m) => resolve(String(m)));
      c.send('hi', udpFwd.hostPort, '127.0.0.1');
    });
    c.close();
    expect(reply).toBe('echo hi from 192.168.127.254');
    await nsExec(ns, ['pkill', '-f', 'bind\\(5353']).catch(() => {});
    await guest;
  });

  const curlApi = async (args: string[]) => {
    const r = await run('curl', ['-sS', '--unix-socket', api, '-w', '\n%{http_code}', ...args]);
    const lines = r.stdout.trimEnd().split('\n');
    const status = Number(lines.pop());
    return { status, body: lines.join('\n') };
  };

  it('serves the gvisor-tap-vsock compatible API', async () => {
    let r = await curlApi(['-X', 'POST', '-d', '{"local":"127.0.0.1:0","remote":"192.168.127.2:9","protocol":"tcp"}', 'http://x/services/forwarder/expose']);
    expect(r.status).toBe(200);
    r = await curlApi(['http://x/services/forwarder/all']);
    const all = JSON.parse(r.body) as { local: string; remote: string; protocol: string }[];
    expect(all.some((f) => f.remote === '192.168.127.2:9' && f.protocol === 'tcp')).toBe(true);
    const local = all.find((f) => f.remote === '192.168.127.2:9')!.local;
    r = await curlApi(['-X', 'POST', '-d', JSON.stringify({ local, protocol: 'tcp' }), 'http://x/services/forwarder/unexpose']);
    expect(r.status).toBe(200);
    r = await curlApi(['http://x/services/dhcp/leases']);
    expect(r.status).toBe(200);
    expect(JSON.parse(r.body)).toBeTypeOf('object');
  });

  it('serves /v1 routes with stable error codes', async () => {
    let r = await curlApi(['-X', 'POST', '-H', 'content-type: application/json', '-d', '{"spec":"0:7000/udp"}', 'http://x/v1/forwards']);
    expect(r.status).toBe(201);
    const [f] = JSON.parse(r.body);
    r = await curlApi(['-X', 'DELETE', `http://x/v1/forwards/udp/127.0.0.1/${f.hostPort}`]);
    expect(r.status).toBe(200);
    r = await curlApi(['-X', 'DELETE', `http://x/v1/forwards/udp/127.0.0.1/${f.hostPort}`]);
    expect([r.status, JSON.parse(r.body).code]).toEqual([404, 'FORWARD_NOT_FOUND']);
    r = await curlApi(['-X', 'POST', '-H', 'content-type: application/json', '-d', '{"spec":"80"}', 'http://x/v1/forwards']);
    expect([r.status, JSON.parse(r.body).code]).toEqual([400, 'BAD_FORWARD_SPEC']);
    r = await curlApi(['-X', 'POST', '-H', 'content-type: application/json', '-d', '{not json', 'http://x/v1/forwards']);
    expect(r.status).toBe(400);
    r = await curlApi(['http://x/v1/stats']);
    const stats = JSON.parse(r.body);
    expect(stats.counters['tcp_nat.connected']).toBeGreaterThan(0);
    r = await curlApi(['http://x/openapi.json']);
    expect(JSON.parse(r.body).paths['/v1/forwards']).toBeDefined();
    const mode = (await run('stat', ['-c', '%a', api])).stdout.trim();
    expect(mode).toBe('600');
  });
});
