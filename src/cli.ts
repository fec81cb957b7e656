#!/usr/bin/env node
/**
 * The `tender` command line. Errors print one line, `tender: CODE: message`, and exit with
 * the code's exit status (src/errors.ts, docs/errors.md).
 */
import { realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Command, CommanderError, Option } from 'commander';
import { serveNetns } from './commands/netns.js';
import { runDemo } from './commands/demo.js';
import { registerMachineCommands } from './commands/machine.js';
import { registerUsbCommands } from './commands/usb.js';
import { TenderError } from './errors.js';
import { createLogger } from './log.js';

const collect = (v: string, prev: string[]) => [...prev, v];

export function buildProgram(): Command {
  const program = new Command()
    .name('tender')
    .description('A companion service for micro-VMs: userspace networking, port forwarding, USB passthrough')
    .version('0.1.0')
    .exitOverride()
    .configureOutput({ outputError: (s, write) => write(s) });

  program
    .command('netns')
    .description('serve a network namespace on the userspace network (DHCP, DNS, NAT) until interrupted')
    .argument('<target>', 'a namespace name (under /var/run/netns), a path to a namespace file, or a PID')
    .option('--ifname <name>', 'interface to create inside the namespace', 'eth0')
    .option('--mtu <n>', 'MTU, 576 to 65520', '1500')
    .option('--mac <addr>', 'MAC address of the interface (default: random, locally administered)')
    .option('--subnet <cidr>', 'subnet of the virtual network', '192.168.127.0/24')
    .option('--configure', 'assign .2, the default route and resolv.conf inside the namespace instead of waiting for DHCP')
    .option('--dns-upstream <addr[:port]>', 'upstream DNS server (repeatable; default: /etc/resolv.conf)', collect, [])
    .option('--pcap <file>', "write the namespace's traffic to a pcap file")
    .option('--no-host-loopback', "do not let the host alias (.254) reach the host's 127.0.0.1")
    .option('--no-offload', 'no checksum/segmentation offload on the TAP (for debugging; slower)')
    .option('-p, --forward <spec>', 'forward a host port into the namespace: [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|udp] (repeatable)', collect, [])
    .option('--api-socket <path>', 'serve the network API (gvisor-tap-vsock compatible and /v1) on this unix socket')
    .addOption(new Option('--log-level <level>', 'log level').choices(['debug', 'info', 'warn', 'error']).default('info'))
    .action(async (target: string, opts) => {
      const log = createLogger(opts.logLevel);
      const served = await serveNetns(target, opts, log);
      // Scripts learn the bound ports (host port 0 = a free port) from stdout.
      for (const f of served.forwards) process.stdout.write(`forward ${f.spec} -> ${f.guestIp}:${f.guestPort}\n`);
      process.stdout.write(`ready ${target}\n`);
      await new Promise<void>((resolve) => {
        const stop = (sig: string) => {
          log.info({ signal: sig }, 'stopping');
          resolve();
        };
        process.once('SIGINT', () => stop('SIGINT'));
        process.once('SIGTERM', () => stop('SIGTERM'));
      });
      await served.stop();
    });

  program
    .command('demo')
    .description('boot a machine from the default image and show its network, exec and a forwarded port (--netns: serve a network namespace instead)')
    .option('--netns', 'the network namespace demo: DHCP, DNS, ping, UDP and TCP NAT from a namespace')
    .option('--keep', 'with --netns: leave the namespace served until interrupted')
    .action(async (opts) => {
      if (opts.netns) return runDemo({ keep: !!opts.keep });
      const { runMachineDemo } = await import('./commands/demo-machine.js');
      await runMachineDemo();
    });

  program
    .command('daemon')
    .description('run the tender service in the foreground (machines, network, API on $TENDER_HOME/tender.sock)')
    .addOption(new Option('--log-level <level>', 'log level').choices(['debug', 'info', 'warn', 'error']).default('info'))
    .action(async (opts) => {
      const log = createLogger(opts.logLevel);
      const { startDaemon } = await import('./daemon/daemon.js');
      const { defaultDeps } = await import('./daemon/deps.js');
      const { paths } = await import('./daemon/paths.js');
      const d = await startDaemon({ log, deps: defaultDeps(paths()) });
      await new Promise<void>((resolve) => {
        process.once('SIGINT', () => resolve());
        process.once('SIGTERM', () => resolve());
      });
      log.info({}, 'stopping (machines keep running)');
      await d.stop();
    });

  const image = program.command('image').description('machine images');
  image
    .command('build')
    .description('assemble the default image from the host\'s Debian packages (kernel, busybox, modules, agent)')
    .option('--force', 'rebuild even when up to date')
    .option('--json', 'print the image as JSON')
    .action(async (opts) => {
      const { buildDefaultImage, ImageUnavailableError } = await import('./image/default-image.js');
      const { tenderHome } = await import('./daemon/paths.js');
      const { progress } = await import('./commands/table.js');
      const p = progress();
      try {
        const img = await buildDefaultImage({ home: tenderHome(), force: !!opts.force, onProgress: (s) => p.update(`${s.step}: ${s.message ?? ''}`) });
        p.done();
        if (opts.json) process.stdout.write(JSON.stringify({ ...img, manifest: undefined }, null, 2) + '\n');
        else process.stdout.write(`${img.dir} (kernel ${img.version}, ${img.modules.length} modules, agent ${img.agent ? 'included' : 'MISSING'})\n`);
      } catch (err) {
        p.done();
        if (err instanceof ImageUnavailableError) throw new TenderError('IMAGE_UNAVAILABLE', err.message);
        throw err;
      }
    });

  registerMachineCommands(program);
  registerUsbCommands(program);
  return program;
}

export async function main(argv = process.argv): Promise<number> {
  try {
    await buildProgram().parseAsync(argv);
    // Commands that pass on a status of their own (exec) set process.exitCode.
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help') return 0;
      // commander already printed its message.
      return 2;
    }
    if (err instanceof TenderError) {
      process.stderr.write(`tender: ${err.code}: ${err.message}\n`);
      return err.exitCode;
    }
    process.stderr.write(`tender: INTERNAL: ${(err as Error)?.stack ?? String(err)}\n`);
    return 1;
  }
}

function invokedDirectly(): boolean {
  try {
    return !!process.argv[1] && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url);
  } catch {
    return false;
  }
}

const isMain = invokedDirectly();
if (isMain) {
  main().then((code) => {
    process.exitCode = code;
    // Exit promptly even if a handle lingers (stdin, a socket), but only once stdout and stderr
    // have drained: process.exit() at once can cut off output still queued for a pipe (the last
    // lines of `machine exec` were lost that way).
    let pending = 2;
    const done = () => {
      if (--pending === 0) process.exit(code);
    };
    process.stdout.write('', done);
    process.stderr.write('', done);
  });
}
