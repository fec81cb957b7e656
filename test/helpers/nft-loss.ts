/**
 * Random TCP packet loss between tender and a Linux guest, with nftables (this host has no
 * netem).
 *
 * Why a bridge and not rules in the guest's own output hook: a packet dropped in the sending
 * host's OUTPUT (or egress) path is reported back to the sender's TCP as a local transmit
 * error, and Linux simply sends that segment again later. Only pure ACKs would really be
 * lost. So the guest lives in its own namespace behind a veth pair, bridged in a "wire"
 * namespace to tender's TAP, and the drops happen in the bridge's forward hook: neither TCP
 * learns of them except by the missing segments.
 *
 *   guest ns: eth0 (veth, 192.168.127.2) <-> wire ns: vguest -- br0 -- eth0 (tender's TAP)
 *
 * With offloads on, a dropped "packet" may be a TSO/GSO super-segment: one drop can lose a burst.
 */
import { nsExec, run } from './netns.js';

const TABLE = 'tender_loss';

/**
 * Bridge `tapIf` (tender's TAP, already in `wire`) to a veth whose other end is `eth0` in
 * `guest`, and configure the guest like `tender netns --configure` would.
 */
export async function bridgeGuest(wire: string, tapIf: string, guest: string, o: { address: string; prefix: number; gateway: string; mtu: number }): Promise<void> {
  const w = (...args: string[]) => run('ip', ['-n', wire, ...args]);
  const g = (...args: string[]) => run('ip', ['-n', guest, ...args]);
  await w('link', 'add', 'br0', 'type', 'bridge');
  await w('link', 'add', 'vguest', 'mtu', String(o.mtu), 'type', 'veth', 'peer', 'name', 'eth0', 'netns', guest, 'mtu', String(o.mtu));
  await w('link', 'set', 'vguest', 'master', 'br0');
  await w('link', 'set', tapIf, 'master', 'br0');
  for (const l of ['br0', 'vguest', tapIf]) await w('link', 'set', l, 'up');
  await g('addr', 'add', `${o.address}/${o.prefix}`, 'dev', 'eth0');
  await g('link', 'set', 'eth0', 'up');
  await g('route', 'add', 'default', 'via', o.gateway);
}

/**
 * Drop `perMille`/1000 of the IPv4 TCP packets each way across the bridge in `wire`
 * (replaces an earlier rate; 0 = no loss). `tapIf` is tender's side of the bridge.
 */
export async function setTcpLoss(wire: string, tapIf: string, perMille: number): Promise<void> {
  await nsExec(wire, ['nft', `delete table bridge ${TABLE}`]).catch(() => {});
  const rule = (chain: string, dir: string) =>
    `add rule bridge ${TABLE} ${chain} ${dir} "${tapIf}" ether type ip ip protocol tcp numgen random mod 1000 < ${perMille} counter drop`;
  await nsExec(wire, [
    'nft',
    [
      `add table bridge ${TABLE}`,
      // "up": guest -> tender; "down": tender -> guest.
      `add chain bridge ${TABLE} up { type filter hook forward priority 0; }`,
      `add chain bridge ${TABLE} down { type filter hook forward priority 0; }`,
      rule('up', 'oifname'),
      rule('down', 'iifname'),
    ].join('; '),
  ]);
}

/** Packets dropped so far: `up` from the guest to tender, `down` from tender to the guest. */
export async function tcpLossDrops(wire: string): Promise<{ up: number; down: number }> {
  const json = JSON.parse(await nsExec(wire, ['nft', '-j', 'list', 'table', 'bridge', TABLE])) as {
    nftables: { rule?: { chain: string; expr: { counter?: { packets: number } }[] } }[];
  };
  const drops = { up: 0, down: 0 };
  for (const item of json.nftables) {
    const r = item.rule;
    if (!r || (r.chain !== 'up' && r.chain !== 'down')) continue;
    for (const e of r.expr) if (e.counter) drops[r.chain] += e.counter.packets;
  }
  return drops;
}
