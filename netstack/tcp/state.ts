/** RFC 9293 §3.3.2 connection states. */
export enum TcpState {
  CLOSED = 'CLOSED',
  SYN_SENT = 'SYN_SENT',
  SYN_RECEIVED = 'SYN_RECEIVED',
  ESTABLISHED = 'ESTABLISHED',
  FIN_WAIT_1 = 'FIN_WAIT_1',
  FIN_WAIT_2 = 'FIN_WAIT_2',
  CLOSE_WAIT = 'CLOSE_WAIT',
  CLOSING = 'CLOSING',
  LAST_ACK = 'LAST_ACK',
  TIME_WAIT = 'TIME_WAIT',
}

/** States in which the peer's SYN has been seen (rcv.nxt is meaningful). */
export function isSynchronized(s: TcpState): boolean {
  return s !== TcpState.CLOSED && s !== TcpState.SYN_SENT && s !== TcpState.SYN_RECEIVED;
}

/** States in which we may still send data (our FIN not yet queued). */
export function canSend(s: TcpState): boolean {
  return s === TcpState.ESTABLISHED || s === TcpState.CLOSE_WAIT;
}

/** States in which the peer may still send data to us (its FIN not yet received). */
export function canReceive(s: TcpState): boolean {
  return s === TcpState.ESTABLISHED || s === TcpState.FIN_WAIT_1 || s === TcpState.FIN_WAIT_2;
}
