/**
 * tender-vhost-vsock's data plane without QEMU: a Python script (the real kernel's
 * SCM_RIGHTS, memfd and eventfd, which Node cannot pass) plays QEMU and the guest's
 * virtio-vsock driver: it hands the helper a memfd as guest RAM and eventfds for kicks and
 * calls over the vhost-user socket, builds split rings by hand (rx: writable 8 KiB buffers;
 * tx: one readable buffer per packet) and checks, packet by packet:
 * - guest REQUEST to port P reaches the listener at `<uds>_P`, RESPONSE comes back;
 * - RW both ways; the guest's credit (buf_alloc/fwd_cnt) limits what the host may send, and
 *   CREDIT_UPDATE releases more; CREDIT_REQUEST is answered with our fwd_cnt;
 * - host EOF becomes SHUTDOWN(SEND), the guest may still write; guest SHUTDOWN(both) → RST;
 * - RST for REQUESTs to unserved ports and for packets on unknown connections, silence for
 *   RST on unknown ones, drops for a wrong destination CID;
 * - host-initiated `CONNECT <port>\n` → REQUEST → RESPONSE → `OK <hostport>\n`, bytes both
 *   ways, guest RST closes the client, a refused CONNECT closes without OK, garbage closes;
 * - GET_VRING_BASE reports the tx ring's position;
 * - the named drop counters (`STATS\n` on the host socket, and the `<uds>.stats` file).
 * Skips (saying why) when the helper is not built or python3 is missing.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { VhostVsock, findVhostVsock, parseVhostVsockStats, queryVhostVsockStats, readVhostVsockStatsFile } from '../../src/vmm/vhost-vsock.js';

async function waitFor(f: () => boolean, ms = 5000): Promise<void> {
  for (const end = Date.now() + ms; !f(); ) {
    if (Date.now() > end) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 20));
  }
}

const PYTHON = '/usr/bin/python3';
const binary = findVhostVsock();
const why = !binary ? 'tender-vhost-vsock not built (make -C native/vhost-vsock)' : !fs.existsSync(PYTHON) ? `${PYTHON} missing` : null;
if (why) console.warn(`vhost-vsock device: skipped: ${why}`);

describe.skipIf(why !== null)(`vhost-vsock data plane against a hand-driven guest${why ? ` (skipped: ${why})` : ''}`, () => {
  let dir: string;
  let helper: VhostVsock;
  const log: string[] = [];

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tender-vvsock-d-'));
    fs.writeFileSync(path.join(dir, 'driver.py'), DRIVER);
    helper = await VhostVsock.start({ socket: path.join(dir, 'vu.sock'), uds: path.join(dir, 'v.sock'), cid: 3, verbose: true, onLog: (l) => log.push(l) });
  });
  afterAll(async () => {
    await helper?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('every packet-level check passes', async () => {
    const { code, stdout, stderr } = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
      execFile(PYTHON, [path.join(dir, 'driver.py'), path.join(dir, 'vu.sock'), path.join(dir, 'v.sock')], { timeout: 60_000 }, (e, stdout, stderr) =>
        resolve({ code: e ? ((e as { code?: number }).code ?? 1) : 0, stdout, stderr }),
      );
    });
    const lines = stdout.trim().split('\n');
    const failed = lines.filter((l) => l.startsWith('not ok'));
    expect(failed, `${stdout}\n${stderr}\n--- helper:\n${log.slice(-30).join('\n')}`).toEqual([]);
    expect(code, `${stdout}\n${stderr}\n--- helper:\n${log.slice(-30).join('\n')}`).toBe(0);
    expect(lines.at(-1)).toMatch(/^1\.\.[23]\d$/);
  }, 70_000);

  test('the counters go to the log when QEMU hangs up; the next helper starts from zero', async () => {
    await waitFor(() => log.some((l) => /exit: STATS .*tx_bad_cid=1 /.test(l)));
    const exitLine = log.find((l) => /exit: STATS/.test(l))!;
    expect(parseVhostVsockStats(exitLine.slice(exitLine.indexOf('STATS')))).toMatchObject({ tx_bad_cid: 1, tx_unknown_conn: 2, host_bad_line: 1, ctrl_queue_full: 0 });
    // The restarted helper (QEMU hung up at the end of the script) answers STATS with zeros.
    // restarts counts the spawn; the new helper listens a moment later.
    await waitFor(() => helper.restarts === 1);
    let st: Record<string, number> | null = null;
    for (let i = 0; i < 100 && !st; i++) {
      st = await queryVhostVsockStats(path.join(dir, 'v.sock')).catch(() => null);
      if (!st) await new Promise((r) => setTimeout(r, 20));
    }
    if (!st) throw new Error('the restarted helper never answered STATS');
    expect(Object.keys(st).length).toBeGreaterThan(10);
    expect(Object.values(st).every((v) => v === 0)).toBe(true);
    expect(readVhostVsockStatsFile(path.join(dir, 'v.sock'))).toEqual(st);
  });
});

const DRIVER = String.raw`# A virtio-vsock driver and a QEMU stand-in in one: drives tender-vhost-vsock's vhost-user
# socket (memfd guest RAM and eventfds passed with SCM_RIGHTS, as QEMU does) and plays the
# guest's side of the rings. Prints "ok N - what" / "not ok N - what" and "1..N".
import mmap, os, select, socket, struct, sys, time

VU, UDS, CID = sys.argv[1], sys.argv[2], 3
MEM = 1 << 20
UVA = 0x7f0000000000          # QEMU's address of guest RAM: only ever translated
QN = 16
HDR = struct.Struct('<QQIIIHHIII')
count = fails = 0

def check(cond, what):
    global count, fails
    count += 1
    print(('ok' if cond else 'not ok'), count, '-', what, flush=True)
    if not cond:
        fails += 1

fd = os.memfd_create('guest')
os.ftruncate(fd, MEM)
ram = mmap.mmap(fd, MEM)

vu = socket.socket(socket.AF_UNIX)
vu.connect(VU)

def msg(req, payload=b'', fds=(), flags=1):
    data = struct.pack('<III', req, flags, len(payload)) + payload
    if fds:
        socket.send_fds(vu, [data], list(fds))
    else:
        vu.sendall(data)

def reply():
    h = vu.recv(12, socket.MSG_WAITALL)
    req, flags, size = struct.unpack('<III', h)
    return vu.recv(size, socket.MSG_WAITALL) if size else b''

class Ring:
    def __init__(self, idx, base):
        self.idx, self.desc, self.avail, self.used = idx, base, base + 0x1000, base + 0x2000
        self.avail_idx = self.used_seen = 0
        self.kick, self.call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        self.buf = base + 0x4000   # QN buffers of 8 KiB each
    def setup(self):
        msg(8, struct.pack('<II', self.idx, QN))
        msg(10, struct.pack('<II', self.idx, 0))
        msg(9, struct.pack('<IIQQQQ', self.idx, 0, UVA + self.desc, UVA + self.used, UVA + self.avail, 0))
        msg(12, struct.pack('<Q', self.idx), [self.kick])
        msg(13, struct.pack('<Q', self.idx), [self.call])
        msg(18, struct.pack('<II', self.idx, 1))
    def put(self, i, flags, data_len, data=b''):
        addr = self.buf + i * 8192
        ram[addr:addr + len(data)] = data
        struct.pack_into('<QIHH', ram, self.desc + 16 * i, addr, data_len, flags, 0)
        struct.pack_into('<H', ram, self.avail + 4 + 2 * (self.avail_idx % QN), i)
        self.avail_idx = (self.avail_idx + 1) & 0xffff
        struct.pack_into('<H', ram, self.avail + 2, self.avail_idx)   # x86: stores are ordered
    def used_entries(self):
        out = []
        while struct.unpack_from('<H', ram, self.used + 2)[0] != self.used_seen:
            out.append(struct.unpack_from('<II', ram, self.used + 4 + 8 * (self.used_seen % QN)))
            self.used_seen = (self.used_seen + 1) & 0xffff
        return out

rx, tx = Ring(0, 0x10000), Ring(1, 0x60000)

msg(1); feats = struct.unpack('<Q', reply())[0]
msg(2, struct.pack('<Q', feats))
msg(15); pf = struct.unpack('<Q', reply())[0]
msg(16, struct.pack('<Q', pf))
msg(3)
msg(5, struct.pack('<II', 1, 0) + struct.pack('<QQQQ', 0, MEM, UVA, 0), [fd])
rx.setup(); tx.setup()
for i in range(QN):
    rx.put(i, 2, 8192)   # VRING_DESC_F_WRITE
os.eventfd_write(rx.kick, 1)

pending = []
def rx_packets(want=1, timeout=5.0):
    """Packets the device put in rx buffers (re-posting each buffer)."""
    end = time.time() + timeout
    while len(pending) < want and time.time() < end:
        select.select([rx.call], [], [], 0.05)
        try: os.eventfd_read(rx.call)
        except BlockingIOError: pass
        for head, n in rx.used_entries():
            addr = rx.buf + head * 8192
            h = HDR.unpack_from(ram, addr)
            pending.append((h, bytes(ram[addr + 44: addr + 44 + h[4]])))
            check(n == 44 + h[4], f'used length {n} = header + len') if n != 44 + h[4] else None
            rx.put(head, 2, 8192)
        os.eventfd_write(rx.kick, 1)
    got = pending[:want]
    del pending[:want]
    return got

tx_slot = 0
def send(src_port, dst_port, op, payload=b'', flags=0, buf_alloc=65536, fwd_cnt=0, dst_cid=2):
    global tx_slot
    h = HDR.pack(CID, dst_cid, src_port, dst_port, len(payload), 1, op, flags, buf_alloc, fwd_cnt)
    tx.put(tx_slot, 0, 44 + len(payload), h + payload)
    tx_slot = (tx_slot + 1) % QN
    os.eventfd_write(tx.kick, 1)
    end = time.time() + 5
    while tx.used_seen != tx.avail_idx and time.time() < end:
        tx.used_entries(); time.sleep(0.005)

REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
F = dict(src_cid=0, dst_cid=1, src_port=2, dst_port=3, len=4, type=5, op=6, flags=7, buf_alloc=8, fwd_cnt=9)

# Guest-initiated: REQUEST to port 5000 reaches the listener at <uds>_5000.
lst = socket.socket(socket.AF_UNIX); lst.bind(UDS + '_5000'); lst.listen(4)
send(40000, 5000, REQUEST, buf_alloc=8)
(h, _), = rx_packets()
check(h[6] == RESPONSE and h[2] == 5000 and h[3] == 40000 and h[0] == 2 and h[1] == CID and h[8] == 262144, 'REQUEST -> RESPONSE from host port 5000, buf_alloc 256 KiB')
lst.settimeout(5); host, _ = lst.accept(); host.settimeout(5)
check(True, 'the host listener at <uds>_5000 got the connection')
send(40000, 5000, RW, b'ping', buf_alloc=8)
check(host.recv(100) == b'ping', 'guest RW reaches the host socket')
host.sendall(b'0123456789abcdefXYZ')
got = rx_packets()
check(got[0][0][6] == RW and got[0][1] == b'01234567', 'host bytes come as RW, limited by the guest credit (buf_alloc 8)')
check(rx_packets(timeout=0.3) == [], 'no more until the guest gives credit')
send(40000, 5000, CREDIT_UPDATE, buf_alloc=8, fwd_cnt=8)
got = rx_packets()
check(got and got[0][1] == b'89abcdef', 'CREDIT_UPDATE: the next 8 bytes')
send(40000, 5000, CREDIT_UPDATE, buf_alloc=1024, fwd_cnt=16)
got = rx_packets()
check(got and got[0][1] == b'XYZ', 'a larger buf_alloc: the rest')
send(40000, 5000, CREDIT_REQUEST, buf_alloc=1024, fwd_cnt=19)
(h, _), = rx_packets()
check(h[6] == CREDIT_UPDATE and h[8] == 262144 and h[9] == 4, 'CREDIT_REQUEST -> CREDIT_UPDATE with fwd_cnt = bytes delivered (4)')
host.shutdown(socket.SHUT_WR)
(h, _), = rx_packets()
check(h[6] == SHUTDOWN and h[7] == 2, 'host EOF -> SHUTDOWN(SEND)')
send(40000, 5000, RW, b'still', buf_alloc=1024, fwd_cnt=19)
check(host.recv(100) == b'still', 'the guest can still write after the host half-closed')
send(40000, 5000, SHUTDOWN, flags=3, buf_alloc=1024, fwd_cnt=19)
(h, _), = rx_packets()
check(h[6] == RST and h[3] == 40000, 'guest SHUTDOWN(both) -> RST')
check(host.recv(100) == b'', 'and the host socket sees EOF')
host.close()

# Resets for what nobody serves.
send(40001, 5001, REQUEST)
(h, _), = rx_packets()
check(h[6] == RST and h[2] == 5001 and h[3] == 40001, 'REQUEST to a port without <uds>_P -> RST')
send(40002, 5000, RW, b'x')
(h, _), = rx_packets()
check(h[6] == RST and h[2] == 5000 and h[3] == 40002, 'RW on an unknown connection -> RST')
send(40003, 5000, RST)
check(rx_packets(timeout=0.3) == [], 'RST on an unknown connection: no answer')
send(40004, 5000, REQUEST, dst_cid=9)
check(rx_packets(timeout=0.3) == [], 'a packet not for the host CID is dropped')

# Host-initiated: CONNECT <port> -> REQUEST to the guest; RESPONSE -> OK <hostport>.
cl = socket.socket(socket.AF_UNIX); cl.connect(UDS); cl.settimeout(5)
cl.sendall(b'CONNECT 6000\n')
(h, _), = rx_packets()
check(h[6] == REQUEST and h[3] == 6000 and h[2] >= 1 << 30, f'CONNECT 6000 -> REQUEST to guest port 6000 from local port {h[2]}')
local = h[2]
send(6000, local, RESPONSE, buf_alloc=65536)
line = b''
while not line.endswith(b'\n'):
    line += cl.recv(1)
check(line == b'OK %d\n' % local, f'RESPONSE -> {line!r}')
cl.sendall(b'hello guest')
got = rx_packets()
check(got and got[0][0][6] == RW and got[0][1] == b'hello guest' and got[0][0][3] == 6000, 'client bytes reach the guest port')
send(6000, local, RW, b'hello host', buf_alloc=65536)
check(cl.recv(100) == b'hello host', 'guest bytes reach the client')
send(6000, local, RST)
check(cl.recv(100) == b'', 'guest RST closes the client')
cl.close()

cl = socket.socket(socket.AF_UNIX); cl.connect(UDS); cl.settimeout(5)
cl.sendall(b'CONNECT 6001\n')
(h, _), = rx_packets()
send(6001, h[2], RST)
check(cl.recv(100) == b'', 'CONNECT refused by the guest (RST): EOF, no OK')
cl.close()
cl = socket.socket(socket.AF_UNIX); cl.connect(UDS); cl.settimeout(5)
cl.sendall(b'HELLO\n')
check(cl.recv(100) == b'', 'a line that is not CONNECT <port>: closed')

# The drop counters, live: STATS answers one line and closes.
cl = socket.socket(socket.AF_UNIX); cl.connect(UDS); cl.settimeout(5)
cl.sendall(b'STATS\n')
line = b''
while True:
    d = cl.recv(4096)
    if not d: break
    line += d
cl.close()
st = dict(kv.split('=', 1) for kv in line.decode().split()[1:])
check(line.startswith(b'STATS ') and line.endswith(b'\n'), f'STATS -> {line[:60]!r}...')
check(st.get('tx_bad_cid') == '1', f'tx_bad_cid={st.get("tx_bad_cid")} (the packet for CID 9)')
check(st.get('tx_unknown_conn') == '2', f'tx_unknown_conn={st.get("tx_unknown_conn")} (RW and RST on no connection)')
check(int(st.get('tx_request_refused', 0)) >= 1, f'tx_request_refused={st.get("tx_request_refused")}')
check(st.get('host_bad_line') == '1', f'host_bad_line={st.get("host_bad_line")} (HELLO)')
# And as a file, rewritten at most once a second while counters change.
time.sleep(1.3)
with open(UDS + '.stats', 'rb') as f:
    check(f.read() == line, '<uds>.stats holds the same line')

# A stopped ring (GET_VRING_BASE) reports where it got to.
msg(11, struct.pack('<II', 1, 0))
idx, base = struct.unpack('<II', reply())
check(idx == 1 and base == tx.avail_idx, f'GET_VRING_BASE tx -> {base}')
vu.close()
print(f'1..{count}', flush=True)
sys.exit(1 if fails else 0)
`;
