/**
 * Serve one real USB device over USB/IP, the way the daemon will: openLibusbSource, open the
 * device by busid (its kernel drivers detached), UsbIpServer on 127.0.0.1:PORT. Run inside a
 * guest (test/e2e/usb-host-device.test.ts) with the host's node on a compiled copy of this
 * file. SIGTERM closes the server and the device (drivers reattached), then exits.
 *
 *   node usb-host-serve.js BUSID [PORT] [READY_FILE]
 *
 * Every line it prints starts with "USB-S ".
 */
import * as fs from 'node:fs';
import { openLibusbSource } from '../../usb/host/libusb-source.js';
import { UsbIpServer } from '../../usb/server.js';

const [busid = '', portArg = '3240', readyFile] = process.argv.slice(2);
const say = (s: string) => process.stdout.write(`USB-S ${s}\n`);
const log = {
  debug: (o: object, m: string) => say(`debug ${m} ${JSON.stringify(o)}`),
  warn: (o: object, m: string) => say(`warn ${m} ${JSON.stringify(o)}`),
};
process.on('unhandledRejection', (e) => say(`unhandled ${String((e as Error)?.stack ?? e)}`));

const source = openLibusbSource({ log });
say(`list ${JSON.stringify(source.list())}`);
const dev = await source.open(busid);
say(`opened ${dev.busid} speed=${dev.speed} vid=${dev.info.vendorId.toString(16)} pid=${dev.info.productId.toString(16)} product=${dev.info.product}`);
const server = new UsbIpServer({ log });
server.add(dev);
source.on('remove', (d) => {
  if (d.busid !== busid) return;
  say(`removed ${d.busid}`);
  server.remove(d.busid);
});
const addr = await server.listen(Number(portArg), '127.0.0.1');
say(`listening ${addr.address}:${addr.port}`);
if (readyFile) fs.writeFileSync(readyFile, 'ready\n');

let stopping = false;
process.on('SIGTERM', () => {
  if (stopping) return;
  stopping = true;
  void (async () => {
    await server.close();
    await dev.close();
    source.close();
    say('closed');
    process.exit(0);
  })();
});
