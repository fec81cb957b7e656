/**
 * `tender machine …`, `tender forward …`, `tender net bridge …`: thin clients of the daemon API.
 */
import { Command, Option } from 'commander';
import { Client } from '../client.js';
import type { MachineInfo } from '../daemon/machines.js';
import { TenderError } from '../errors.js';
import { runExec } from './exec.js';
import { progress, table } from './table.js';

const collect = (v: string, prev: string[]) => [...prev, v];
const out = (s: string): void => void process.stdout.write(s);
const json = (o: unknown): void => void out(JSON.stringify(o, null, 2) + "\n");

function intOpt(name: string, min: number, max: number) {
  return (v: string) => {
    const n = Number(v);
    if (!/^\d+$/.test(v) || n < min || n > max) throw new TenderError('BAD_ARGUMENT', `${name} must be an integer from ${min} to ${max}`);
    return n;
  };
}

function machineRows(ms: MachineInfo[]): string {
  return table(
    ['NAME', 'STATE', 'IP', 'CPUS', 'MEMORY', 'NET', 'FORWARDS'],
    ms.map((m) => [m.name, m.state, m.ip, m.cpus, `${m.memoryMiB} MiB`, m.net, [...m.forwards, ...m.autoForwards].map((f) => f.spec).join(', ')]),
  );
}

async function lifecycle(c: Client, name: string, action: string, body: object): Promise<MachineInfo> {
  const p = progress();
  try {
    return await c.stream<MachineInfo>('POST', `/v1/machines/${encodeURIComponent(name)}/${action}`, body, (m) => p.update(m));
  } finally {
    p.done();
  }
}

export function registerMachineCommands(program: Command): void {
  const c = () => new Client();
  const machine = program.command('machine').description('create, run and manage machines');

  machine
    .command('create')
    .argument('<name>')
    .description('create a machine (from the built-in default image unless --kernel or --disk is given)')
    .option('--cpus <n>', 'virtual CPUs', intOpt('--cpus', 1, 64), 1)
    .option('--memory <MiB>', 'memory in MiB', intOpt('--memory', 64, 1024 * 1024), 512)
    .option('--image <default|DIR>', 'image: default, or a directory with vmlinuz and initrd', 'default')
    .option('--kernel <file>', 'your own kernel')
    .option('--initrd <file>', 'your own initrd (with --kernel)')
    .option('--disk <file>', 'a disk image to use as root (virtio-blk)')
    .option('--net <nat|bridged:BRIDGE>', 'networking', 'nat')
    .option('-p, --forward <spec>', 'port forward [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp] (repeatable)', collect, [])
    .addOption(new Option('--accel <accel>', 'acceleration').choices(['auto', 'kvm', 'tcg']).default('auto'))
    .option('--no-auto-forward', 'do not forward the guest\'s listening ports automatically')
    .addOption(new Option('--agent <channel>', 'guest agent channel: vsock (default: the host\'s vhost-vsock, else tender\'s vhost-user backend, else serial) or serial (virtio-serial)').choices(['serial', 'vsock']))
    .option('--start', 'start it right away')
    .option('--json', 'print the created machine as JSON')
    .action(async (name: string, o) => {
      const client = c();
      let info = await client.request<MachineInfo>('POST', '/v1/machines', {
        name,
        cpus: o.cpus,
        memoryMiB: o.memory,
        image: o.kernel || o.disk ? undefined : o.image,
        kernel: o.kernel,
        initrd: o.initrd,
        disk: o.disk,
        net: o.net,
        forwards: o.forward,
        accel: o.accel,
        autoForward: o.autoForward,
        agent: o.agent,
      });
      if (o.start) info = await lifecycle(client, name, 'start', { wait: true });
      if (o.json) json(info);
      else out(`${info.name}\n`);
    });

  machine
    .command('start')
    .argument('<name>')
    .description('start a machine and wait until its agent is up and it has an address')
    .option('--no-wait', 'return once the VMM runs')
    .option('--json', 'print the machine as JSON')
    .action(async (name: string, o) => {
      const info = await lifecycle(c(), name, 'start', { wait: o.wait });
      if (o.json) json(info);
      else out(`${info.name} ${info.state}${info.ip ? ` ${info.ip}` : ''}\n`);
    });

  machine
    .command('stop')
    .argument('<name>')
    .option('--force', 'kill the VMM instead of powering the guest off')
    .option('--json', 'print the machine as JSON')
    .action(async (name: string, o) => {
      const info = await lifecycle(c(), name, 'stop', { force: !!o.force });
      if (o.json) json(info);
      else out(`${info.name} ${info.state}\n`);
    });

  machine
    .command('restart')
    .argument('<name>')
    .option('--json', 'print the machine as JSON')
    .action(async (name: string, o) => {
      const info = await lifecycle(c(), name, 'restart', { wait: true });
      if (o.json) json(info);
      else out(`${info.name} ${info.state}${info.ip ? ` ${info.ip}` : ''}\n`);
    });

  machine
    .command('rm')
    .argument('<name>')
    .option('--force', 'remove even if running (kills it)')
    .action(async (name: string, o) => {
      await c().request('DELETE', `/v1/machines/${encodeURIComponent(name)}${o.force ? '?force=true' : ''}`);
      out(`${name}\n`);
    });

  machine
    .command('ls')
    .description('list machines')
    .option('--json', 'JSON')
    .action(async (o) => {
      const ms = await c().request<MachineInfo[]>('GET', '/v1/machines');
      if (o.json) json(ms);
      else out(machineRows(ms));
    });

  machine
    .command('inspect')
    .argument('<name>')
    .option('--json', 'JSON (the default is a readable summary)')
    .action(async (name: string, o) => {
      const m = await c().request<MachineInfo>('GET', `/v1/machines/${encodeURIComponent(name)}`);
      if (o.json) return json(m);
      const rows: [string, string][] = [
        ['name', m.name],
        ['state', m.state],
        ['ip', m.ip ?? '-'],
        ['cpus', String(m.cpus)],
        ['memory', `${m.memoryMiB} MiB`],
        ['net', m.net],
        ['mac', m.mac],
        ['image', m.image],
        ['accel', m.accel ?? '-'],
        ['pid', m.pid ? String(m.pid) : '-'],
        ['agent', m.agent],
        ...(m.vsockDrops && Object.keys(m.vsockDrops).length ? [['vsock drops', Object.entries(m.vsockDrops).map(([k, v]) => `${k}=${v}`).join(' ')] as [string, string]] : []),
        ['forwards', [...m.forwards, ...m.autoForwards].map((f) => f.spec).join(', ') || '-'],
        ['last exit', m.lastExit ? `${m.lastExit.reason} (${m.lastExit.at})` : '-'],
        ['directory', m.dir],
      ];
      out(rows.map(([k, v]) => `${k.padEnd(10)} ${v}`).join('\n') + '\n');
    });

  machine
    .command('logs')
    .argument('<name>')
    .option('-f, --follow', 'keep printing new output')
    .action(async (name: string, o) => {
      const client = c();
      await client.ensureDaemon();
      const res = await client.raw('GET', `/v1/machines/${encodeURIComponent(name)}/logs${o.follow ? '?follow=1' : ''}`);
      if ((res.statusCode ?? 500) >= 400) {
        let s = '';
        for await (const d of res) s += d;
        const e = JSON.parse(s);
        throw new TenderError(e.code, e.message);
      }
      for await (const d of res) process.stdout.write(d);
    });

  machine
    .command('set')
    .argument('<name>')
    .argument('<key=value...>', 'cpus=N, memory=MiB, accel=auto|kvm|tcg, net=nat|bridged:BR, auto-forward=on|off')
    .description('change settings (applied at the next start)')
    .option('--json', 'JSON')
    .action(async (name: string, settings: string[], o) => {
      const m = await c().request<MachineInfo>('PATCH', `/v1/machines/${encodeURIComponent(name)}`, { settings });
      if (o.json) json(m);
      else out(`${m.name}\n`);
    });

  machine
    .command('exec')
    .argument('<name>')
    .argument('<command...>', 'the command and its arguments (after --)')
    .description('run a command in the machine; its output is streamed and its exit status returned')
    .option('-t, --tty', 'allocate a terminal')
    .option('-e, --env <KEY=VALUE>', 'environment variable (repeatable)', collect, [])
    .option('-w, --workdir <dir>', 'working directory')
    .action(async (name: string, command: string[], o) => {
      const env: Record<string, string> = {};
      for (const kv of o.env as string[]) {
        const i = kv.indexOf('=');
        if (i <= 0) throw new TenderError('BAD_ARGUMENT', `--env wants KEY=VALUE, got "${kv}"`);
        env[kv.slice(0, i)] = kv.slice(i + 1);
      }
      process.exitCode = await runExec(name, command, { tty: !!o.tty, env, cwd: o.workdir });
    });

  machine
    .command('shell')
    .argument('<name>')
    .description('an interactive shell in the machine (with a terminal)')
    .action(async (name: string) => {
      process.exitCode = await runExec(name, ['/bin/sh', '-l'], { tty: true, env: { TERM: process.env.TERM ?? 'xterm' } });
    });

  const forward = program.command('forward').description('port forwards of machines');
  forward
    .command('add')
    .argument('<name>')
    .argument('<spec>', '[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp]')
    .option('--json', 'JSON')
    .action(async (name: string, spec: string, o) => {
      const added = await c().request<{ spec: string }[]>('POST', `/v1/machines/${encodeURIComponent(name)}/forwards`, { spec });
      if (o.json) json(added);
      else out(added.map((f) => f.spec).join('\n') + '\n');
    });
  forward
    .command('ls')
    .argument('[name]')
    .option('--json', 'JSON')
    .action(async (name: string | undefined, o) => {
      const fs = await c().request<{ machine: string; spec: string; guestIp: string; guestPort: number; auto: boolean; active: boolean }[]>(
        'GET',
        name ? `/v1/machines/${encodeURIComponent(name)}/forwards` : '/v1/machine-forwards',
      );
      if (o.json) return json(fs);
      out(table(['MACHINE', 'FORWARD', 'GUEST', 'KIND'], fs.map((f) => [f.machine, f.spec, f.guestIp ? `${f.guestIp}:${f.guestPort}` : `:${f.guestPort}`, f.auto ? 'auto' : f.active ? 'active' : 'configured'])));
    });
  forward
    .command('rm')
    .argument('<name>')
    .argument('<spec>')
    .action(async (name: string, spec: string) => {
      await c().request('DELETE', `/v1/machines/${encodeURIComponent(name)}/forwards`, { spec });
      out(`${spec}\n`);
    });

  const netCmd = program.command('net').description('machine networking');
  netCmd
    .command('bridge')
    .argument('<name>')
    .option('--to <bridge>', 'put the machine on this Linux bridge (live when running)')
    .option('--off', 'back to the userspace network (nat)')
    .option('--json', 'JSON')
    .action(async (name: string, o) => {
      if (!!o.to === !!o.off) throw new TenderError('BAD_ARGUMENT', 'give exactly one of --to BRIDGE or --off');
      const m = await c().request<MachineInfo>('PUT', `/v1/machines/${encodeURIComponent(name)}/net`, { net: o.off ? 'nat' : `bridged:${o.to}` });
      if (o.json) json(m);
      else out(`${m.name} ${m.net}\n`);
    });
}
