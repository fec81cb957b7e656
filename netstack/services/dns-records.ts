/**
 * The DNS service's local table: names the gateway answers itself (gateway, host alias,
 * machines by their DHCP lease), their addresses, and aliases (`host.docker.internal` →
 * `host.tender.internal`) for drop-in compatibility with gvisor-tap-vsock and Docker.
 *
 * Names are stored lower-case without the trailing dot: DNS names compare case-insensitively
 * (RFC 4343). Machine names come from a guest's DHCP hostname option, so `add` treats its
 * input as hostile: an invalid name or address is refused (returns false), never thrown.
 */
import { isIPv4, isIPv6 } from 'node:net';
import { Address4, Address6 } from 'ip-address';

export type LocalRecordType = 'A' | 'AAAA';

export interface LocalRecord {
  name: string;
  type: LocalRecordType;
  address: string;
}

/** What a name resolves to: its canonical name (after an alias) and addresses by family. */
export interface LocalEntry {
  name: string;
  a: string[];
  aaaa: string[];
}

/** `Foo.Example.` → `foo.example`. */
export function normalizeName(name: string): string {
  let n = name.toLowerCase();
  if (n.endsWith('.')) n = n.slice(0, -1);
  return n;
}

/**
 * A host name we are willing to serve: labels of letters, digits, '-' and '_' (underscore is
 * common in DHCP hostnames), 1..63 bytes each, at most 253 in all (RFC 1035 §2.3.4).
 */
export function isValidName(name: string): boolean {
  if (name.length === 0 || name.length > 253) return false;
  for (const label of name.split('.')) {
    if (!/^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$/.test(label)) return false;
  }
  return true;
}

/** The reverse-lookup name of an address, normalised (`1.127.168.192.in-addr.arpa`), or null. */
export function reverseName(address: string): string | null {
  if (isIPv4(address)) return normalizeName(new Address4(address).reverseForm());
  if (isIPv6(address)) return normalizeName(new Address6(address).reverseForm());
  return null;
}

function canonicalAddress(address: string): string | null {
  if (isIPv4(address)) return address;
  if (isIPv6(address)) return new Address6(address).correctForm();
  return null;
}

export class DnsRecords {
  private readonly entries = new Map<string, LocalEntry>();
  private readonly aliases = new Map<string, string>();
  /** reverse name → names holding that address, in the order they were added. */
  private readonly reverse = new Map<string, string[]>();

  /** Add an A or AAAA record (the family is taken from the address). False if refused. */
  add(name: string, address: string): boolean {
    const n = normalizeName(name);
    const addr = canonicalAddress(address);
    if (!isValidName(n) || addr === null) return false;
    let e = this.entries.get(n);
    if (!e) {
      e = { name: n, a: [], aaaa: [] };
      this.entries.set(n, e);
    }
    const list = isIPv4(addr) ? e.a : e.aaaa;
    if (list.includes(addr)) return true;
    list.push(addr);
    const rev = reverseName(addr)!;
    const names = this.reverse.get(rev) ?? [];
    if (!names.includes(n)) names.push(n);
    this.reverse.set(rev, names);
    return true;
  }

  /**
   * Remove one address of a name, or the whole name when `address` is omitted.
   * Returns whether anything was removed.
   */
  remove(name: string, address?: string): boolean {
    const n = normalizeName(name);
    const e = this.entries.get(n);
    if (!e) return false;
    let removed: string[];
    if (address === undefined) {
      removed = [...e.a, ...e.aaaa];
      e.a = [];
      e.aaaa = [];
    } else {
      const addr = canonicalAddress(address);
      if (addr === null) return false;
      const before = e.a.length + e.aaaa.length;
      e.a = e.a.filter((x) => x !== addr);
      e.aaaa = e.aaaa.filter((x) => x !== addr);
      if (e.a.length + e.aaaa.length === before) return false;
      removed = [addr];
    }
    for (const addr of removed) {
      const rev = reverseName(addr)!;
      const names = this.reverse.get(rev)?.filter((x) => x !== n) ?? [];
      if (names.length > 0) this.reverse.set(rev, names);
      else this.reverse.delete(rev);
    }
    if (e.a.length + e.aaaa.length === 0) this.entries.delete(n);
    return true;
  }

  /** Answer for `alias` whatever `target` holds (no CNAME on the wire: as gvisor-tap-vsock does). */
  alias(alias: string, target: string): boolean {
    const a = normalizeName(alias);
    const t = normalizeName(target);
    if (!isValidName(a) || !isValidName(t) || a === t) return false;
    this.aliases.set(a, t);
    return true;
  }

  unalias(alias: string): boolean {
    return this.aliases.delete(normalizeName(alias));
  }

  /** The entry a (normalised) name resolves to, following one alias; undefined if none. */
  resolve(name: string): LocalEntry | undefined {
    const n = normalizeName(name);
    return this.entries.get(n) ?? this.entries.get(this.aliases.get(n) ?? '');
  }

  /** Names holding the address whose reverse name is given (`1.127.168.192.in-addr.arpa`). */
  namesForReverse(reverseName: string): readonly string[] {
    return this.reverse.get(normalizeName(reverseName)) ?? [];
  }

  list(): LocalRecord[] {
    const out: LocalRecord[] = [];
    for (const e of this.entries.values()) {
      for (const address of e.a) out.push({ name: e.name, type: 'A', address });
      for (const address of e.aaaa) out.push({ name: e.name, type: 'AAAA', address });
    }
    return out;
  }

  listAliases(): { alias: string; target: string }[] {
    return [...this.aliases].map(([alias, target]) => ({ alias, target }));
  }
}
