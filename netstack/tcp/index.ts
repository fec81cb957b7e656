/** Public surface of the TCP engine (what the NAT and the port forwarder use). */
export { TcpStack, type TcpStackOptions, type PendingSyn, type SynOptions, type TcpStackStats } from './stack.js';
export { TcpConnection, type TcpConnectionEvents, type TcpTuple } from './connection.js';
export { TcpError, type TcpErrorCode } from './errors.js';
export { TcpState } from './state.js';
export type { Ip4Output } from './ip.js';
export { DEFAULT_CONFIG, type TcpConfig, type KeepaliveConfig } from './config.js';
