// TcpOffload: see tcp_offload.h. Sequence arithmetic is RFC 9293's modulo 2^32 (int32 casts).
#include "tcp_offload.h"

#include "common.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>

#ifndef MSG_NOSIGNAL
// macOS has no MSG_NOSIGNAL (SIGPIPE is ignored by Node's process anyway).
#define MSG_NOSIGNAL 0
#endif

namespace tender {

const char* const kOffloadExitNames[X_COUNT] = {
    "released", "segment", "host_eof", "host_error", "host_full",
    "window", "bulk", "rto", "device_full", "max_age",
};

namespace {

constexpr uint8_t FIN = 0x01, SYN = 0x02, RST = 0x04, PSH = 0x08, ACK = 0x10, URG = 0x20;
constexpr uint8_t ECE = 0x40, CWR = 0x80;
constexpr size_t ETH = 14, IP = 20;
// Unacknowledged bytes we keep in flight at most; more is bulk data (the engine's, with TSO).
constexpr size_t INFLIGHT_MAX = 16 * 1024;

inline uint16_t Be16(const uint8_t* p) { return uint16_t((p[0] << 8) | p[1]); }
inline uint32_t Be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
}
inline void Put16(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v >> 8);
  p[1] = uint8_t(v);
}
inline void Put32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v >> 24);
  p[1] = uint8_t(v >> 16);
  p[2] = uint8_t(v >> 8);
  p[3] = uint8_t(v);
}
inline int32_t SeqDiff(uint32_t a, uint32_t b) { return int32_t(a - b); }

uint32_t SumBytes(const uint8_t* p, size_t n, uint32_t sum) {
  for (; n > 1; p += 2, n -= 2) sum += uint32_t((p[0] << 8) | p[1]);
  if (n) sum += uint32_t(p[0] << 8);
  return sum;
}
uint16_t Fold(uint32_t sum) {
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return uint16_t(~sum);
}
uint32_t PseudoSum(uint32_t src, uint32_t dst, uint32_t tcpLen) {
  return (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + 6 + tcpLen;
}

uint64_t NowMs(uv_loop_t* loop) { return uv_hrtime() / 1000000; }

}  // namespace

struct TcpOffload::Flow {
  TcpOffload* owner = nullptr;
  uint32_t id = 0;
  uint32_t guestIp = 0, remoteIp = 0;
  uint16_t guestPort = 0, remotePort = 0;
  uint8_t guestMac[6] = {};
  int fd = -1;
  Poller poller;
  uv_timer_t* delack = nullptr;
  uv_timer_t* rto = nullptr;  // retransmission timeout while data is in flight, else max age

  uint32_t rcvNxt = 0, sndUna = 0, sndNxt = 0, sndWnd = 0, sndWl1 = 0, sndWl2 = 0;
  uint8_t sndWscale = 0, rcvWscale = 0;
  uint16_t rcvWndField = 0;
  bool tsOk = false;
  uint32_t tsRecent = 0, lastAckSent = 0, tsAtAdopt = 0;
  uint64_t adoptedMs = 0, lastRxMs = 0;
  uint32_t mss = 536, cwnd = 0, rtoMs = 1000, delackMs = 40, smallMax = 512, maxAgeMs = 60000;
  uint8_t ttl = 64;
  bool ackOwed = false;
  std::vector<uint8_t> sent;    // [sndUna, sndNxt)
  std::vector<uint8_t> unsent;  // read from the host but not sent (only at exit)
  uint64_t bytesIn = 0, bytesOut = 0, segsIn = 0, segsOut = 0;
  uint32_t rttMs = UINT32_MAX;
  bool exited = false;
  OffloadExit reason = X_RELEASED;

  static uv_timer_t* NewTimer(uv_loop_t* loop, Flow* f) {
    auto* t = new uv_timer_t;
    uv_timer_init(loop, t);
    // The FrameIO that owns the offload keeps the loop alive; a 60 s max-age timer must not.
    uv_unref(reinterpret_cast<uv_handle_t*>(t));
    t->data = f;
    return t;
  }
  static void CloseTimer(uv_timer_t*& t) {
    if (!t) return;
    uv_timer_stop(t);
    t->data = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(t), [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
    t = nullptr;
  }
  void StartRto(uint64_t ms) {
    uv_timer_start(rto, [](uv_timer_t* t) {
      auto* f = static_cast<Flow*>(t->data);
      if (f) f->owner->RtoFired(f);
    }, ms, 0);
  }
  // With nothing in flight the same timer ends the offload after maxAgeMs.
  void ArmIdle(uint64_t now) {
    uint64_t age = now - adoptedMs;
    StartRto(age >= maxAgeMs ? 0 : maxAgeMs - age);
  }
  ~Flow() {
    poller.Close();
    CloseTimer(delack);
    CloseTimer(rto);
    if (fd >= 0) close(fd);
  }
};

TcpOffload::TcpOffload(uv_loop_t* loop, const uint8_t gwMac[6], Hooks hooks)
    : loop_(loop), hooks_(std::move(hooks)) {
  memcpy(gwMac_, gwMac, 6);
  frame_.resize(ETH + IP + 60 + 65536);
  readBuf_.resize(65536);
}

TcpOffload::~TcpOffload() = default;

uint32_t TcpOffload::TsNow(const Flow* f) const {
  return f->tsAtAdopt + uint32_t(NowMs(loop_) - f->adoptedMs);
}

int TcpOffload::Adopt(uint32_t id, int hostFd, const uint32_t* p, const uint8_t guestMac[6],
                      const uint8_t* sent, size_t sentLen) {
  if (flows_.count(id)) return EEXIST;
  uint64_t key = Key(p[P_GUEST_IP], p[P_GUEST_PORT], p[P_REMOTE_PORT]);
  if (byTuple_.count(key)) return EEXIST;
  if (p[P_GUEST_PORT] > 0xffff || p[P_REMOTE_PORT] > 0xffff || p[P_SND_WSCALE] > 14 ||
      p[P_RCV_WSCALE] > 14 || p[P_RCV_WND_FIELD] > 0xffff || p[P_MSS] < 64 || p[P_MSS] > 65495 ||
      p[P_SMALL_MAX] > 16384 || p[P_TTL] == 0 || p[P_TTL] > 255 ||
      uint32_t(p[P_SND_NXT] - p[P_SND_UNA]) != sentLen || sentLen > INFLIGHT_MAX)
    return EINVAL;
  int fd = dup(hostFd);
  if (fd < 0) return errno;
  auto f = std::make_unique<Flow>();
  Flow* fp = f.get();
  fp->owner = this;
  fp->id = id;
  fp->fd = fd;
  fp->guestIp = p[P_GUEST_IP];
  fp->remoteIp = p[P_REMOTE_IP];
  fp->guestPort = uint16_t(p[P_GUEST_PORT]);
  fp->remotePort = uint16_t(p[P_REMOTE_PORT]);
  memcpy(fp->guestMac, guestMac, 6);
  fp->rcvNxt = p[P_RCV_NXT];
  fp->sndUna = p[P_SND_UNA];
  fp->sndNxt = p[P_SND_NXT];
  fp->sndWnd = p[P_SND_WND];
  fp->sndWl1 = p[P_SND_WL1];
  fp->sndWl2 = p[P_SND_WL2];
  fp->sndWscale = uint8_t(p[P_SND_WSCALE]);
  fp->rcvWscale = uint8_t(p[P_RCV_WSCALE]);
  fp->rcvWndField = uint16_t(p[P_RCV_WND_FIELD]);
  fp->tsOk = p[P_TS_OK] != 0;
  fp->tsRecent = p[P_TS_RECENT];
  fp->tsAtAdopt = p[P_TS_NOW];
  fp->lastAckSent = p[P_LAST_ACK_SENT];
  fp->mss = p[P_MSS];
  fp->cwnd = p[P_CWND];
  fp->rtoMs = std::max<uint32_t>(p[P_RTO_MS], 1);
  fp->delackMs = std::max<uint32_t>(p[P_DELACK_MS], 1);
  fp->ackOwed = p[P_ACK_OWED] != 0;
  fp->ttl = uint8_t(p[P_TTL]);
  fp->smallMax = p[P_SMALL_MAX];
  fp->maxAgeMs = p[P_MAX_AGE_MS];
  fp->adoptedMs = fp->lastRxMs = NowMs(loop_);
  fp->sent.assign(sent, sent + sentLen);
  int r = fp->poller.Init(loop_, fd, fp, [](void* o, int status, int events) {
    auto* fl = static_cast<Flow*>(o);
    fl->owner->HostReadable(fl);
  });
  if (r < 0) return -r;  // ~Flow closes the descriptor
  fp->delack = Flow::NewTimer(loop_, fp);
  fp->rto = Flow::NewTimer(loop_, fp);
  if (fp->ackOwed) {
    uv_timer_start(fp->delack, [](uv_timer_t* t) {
      auto* fl = static_cast<Flow*>(t->data);
      if (fl) fl->owner->DelackFired(fl);
    }, fp->delackMs, 0);
  }
  if (!fp->sent.empty()) fp->StartRto(fp->rtoMs);
  else fp->ArmIdle(fp->adoptedMs);
  fp->poller.SetEvents(UV_READABLE);
  byTuple_[key] = fp;
  flows_[id] = std::move(f);
  return 0;
}

void TcpOffload::Exit(Flow* f, OffloadExit why, bool notify) {
  if (f->exited) return;
  f->exited = true;
  f->reason = why;
  exits[why]++;
  byTuple_.erase(Key(f->guestIp, f->guestPort, f->remotePort));
  f->poller.SetEvents(0);
  uv_timer_stop(f->delack);
  uv_timer_stop(f->rto);
  if (notify && hooks_.exited) hooks_.exited(f->id);
}

bool TcpOffload::Release(uint32_t id, uint32_t* out, uint8_t* data, size_t cap) {
  auto it = flows_.find(id);
  if (it == flows_.end()) return false;
  Flow* f = it->second.get();
  Exit(f, X_RELEASED, false);
  uint64_t now = NowMs(loop_);
  out[S_RCV_NXT] = f->rcvNxt;
  out[S_SND_UNA] = f->sndUna;
  out[S_SND_NXT] = f->sndNxt;
  out[S_SND_WND] = f->sndWnd;
  out[S_SND_WL1] = f->sndWl1;
  out[S_SND_WL2] = f->sndWl2;
  out[S_TS_RECENT] = f->tsRecent;
  out[S_LAST_ACK_SENT] = f->lastAckSent;
  out[S_ACK_OWED] = f->ackOwed ? 1 : 0;
  out[S_BYTES_IN] = uint32_t(f->bytesIn);
  out[S_BYTES_OUT] = uint32_t(f->bytesOut);
  out[S_SEGS_IN] = uint32_t(f->segsIn);
  out[S_SEGS_OUT] = uint32_t(f->segsOut);
  out[S_RTT_MS] = f->rttMs;
  out[S_RX_AGE_MS] = uint32_t(std::min<uint64_t>(now - f->lastRxMs, UINT32_MAX));
  out[S_REASON] = f->reason;
  size_t s = std::min(f->sent.size(), cap);
  size_t u = std::min(f->unsent.size(), cap - s);
  if (s) memcpy(data, f->sent.data(), s);
  if (u) memcpy(data + s, f->unsent.data(), u);
  out[S_SENT_LEN] = uint32_t(s);
  out[S_UNSENT_LEN] = uint32_t(u);
  flows_.erase(it);  // ~Flow: poller and timers closed, the duplicate descriptor closed
  return true;
}

bool TcpOffload::OnFrame(const uint8_t* fr, size_t len, bool csumTrusted, bool gso) {
  if (len < ETH + IP + 20 || memcmp(fr, gwMac_, 6) != 0 || Be16(fr + 12) != 0x0800) return false;
  const uint8_t* ip = fr + ETH;
  if (ip[0] != 0x45 || ip[9] != 6 || (Be16(ip + 6) & 0x3fff) != 0) return false;
  uint32_t totLen = Be16(ip + 2);
  if (totLen < IP + 20 || ETH + totLen > len) return false;
  const uint8_t* tcp = ip + IP;
  uint32_t src = Be32(ip + 12), dst = Be32(ip + 16);
  auto it = byTuple_.find(Key(src, Be16(tcp), Be16(tcp + 2)));
  if (it == byTuple_.end() || it->second->remoteIp != dst) return false;
  Flow* f = it->second;
  uint32_t hl = uint32_t(tcp[12] >> 4) * 4;
  uint32_t tcpLen = totLen - IP;
  if (hl < 20 || hl > tcpLen) return false;  // malformed: the engine counts and drops it
  // A corrupted frame is the engine's to count and drop; it does not end the offload. The
  // device's NEEDS_CSUM/DATA_VALID flags vouch for the TCP checksum only, never the IP header.
  if (Fold(SumBytes(ip, IP, 0)) != 0) return false;
  if (!csumTrusted && Fold(SumBytes(tcp, tcpLen, PseudoSum(src, dst, tcpLen))) != 0) return false;
  if (gso) {
    Exit(f, X_BULK, true);
    return false;
  }
  uint8_t flags = tcp[13];
  uint32_t plen = tcpLen - hl;
  // Only the plain case: ACK (PSH allowed), timestamps as Linux lays them out, or no options.
  bool optsOk = f->tsOk ? (hl == 32 && tcp[20] == 1 && tcp[21] == 1 && tcp[22] == 8 && tcp[23] == 10) : hl == 20;
  if ((flags & (FIN | SYN | RST | URG | ECE | CWR)) || !(flags & ACK) || !optsOk) {
    Exit(f, X_SEGMENT, true);
    return false;
  }
  if (plen > f->smallMax) {
    Exit(f, X_BULK, true);
    return false;
  }
  uint32_t seq = Be32(tcp + 4), ack = Be32(tcp + 8);
  uint32_t wnd = uint32_t(Be16(tcp + 14)) << f->sndWscale;
  uint32_t tsval = f->tsOk ? Be32(tcp + 24) : 0, tsecr = f->tsOk ? Be32(tcp + 28) : 0;
  int32_t acked = SeqDiff(ack, f->sndUna);
  // In order, within our window, not older than TS.Recent (PAWS), acknowledging only what was
  // sent; a duplicate ACK (nothing new, no data, same window, data outstanding) means loss.
  if (seq != f->rcvNxt || (plen > 0 && plen > (uint32_t(f->rcvWndField) << f->rcvWscale)) ||
      (f->tsOk && SeqDiff(tsval, f->tsRecent) < 0) || acked < 0 || SeqDiff(ack, f->sndNxt) > 0 ||
      (plen == 0 && acked == 0 && wnd == f->sndWnd && !f->sent.empty())) {
    Exit(f, X_SEGMENT, true);
    return false;
  }
  uint32_t took = 0;
  if (plen > 0) {
    ssize_t n;
    do n = send(f->fd, tcp + hl, plen, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
      Exit(f, (errno == EAGAIN || errno == EWOULDBLOCK) ? X_HOST_FULL : X_HOST_ERROR, true);
      return false;
    }
    took = uint32_t(n);
  }
  uint64_t now = NowMs(loop_);
  // RFC 7323 §4.3: TS.Recent from a segment at or before the last ACK we sent.
  if (f->tsOk && SeqDiff(seq, f->lastAckSent) <= 0) f->tsRecent = tsval;
  if (acked > 0) {
    f->sent.erase(f->sent.begin(), f->sent.begin() + acked);
    f->sndUna = ack;
    f->bytesOut += uint32_t(acked);
    if (f->tsOk && tsecr != 0) {
      // A tsecr ahead of our clock (a guest echoing what we never sent) is no sample.
      int32_t rtt = SeqDiff(TsNow(f), tsecr);
      if (rtt >= 0) f->rttMs = uint32_t(rtt);
    }
  }
  // RFC 9293 §3.10.7.4: SND.WL1/WL2 keep old segments from updating the window.
  if (SeqDiff(f->sndWl1, seq) < 0 || (f->sndWl1 == seq && SeqDiff(f->sndWl2, ack) <= 0)) {
    f->sndWnd = wnd;
    f->sndWl1 = seq;
    f->sndWl2 = ack;
  }
  f->rcvNxt += took;
  f->bytesIn += took;
  f->segsIn++;
  f->lastRxMs = now;
  rxSegments++;
  rxBytes += took;
  rxFrameBytes += len;
  if (took < plen) {
    // The host socket is full: the engine takes the rest of this segment (it trims what we
    // already wrote) and applies backpressure as usual.
    Exit(f, X_HOST_FULL, true);
    return false;
  }
  if (acked > 0) {
    if (!f->sent.empty()) f->StartRto(f->rtoMs);  // RFC 6298 §5.3
    else f->ArmIdle(now);
  }
  if (took > 0) {
    // Delayed ACK as the engine does it: every second segment at once, else within delackMs
    // (a reply usually comes first and carries it).
    if (f->ackOwed) {
      if (!SendSegment(f, nullptr, 0, false)) return true;  // the flow exited; this segment was taken
    } else {
      f->ackOwed = true;
      uv_timer_start(f->delack, [](uv_timer_t* t) {
        auto* fl = static_cast<Flow*>(t->data);
        if (fl) fl->owner->DelackFired(fl);
      }, f->delackMs, 0);
    }
  }
  return true;
}

void TcpOffload::HostReadable(Flow* f) {
  if (f->exited) return;
  uint32_t inflight = uint32_t(f->sent.size());
  uint32_t limit = std::min<uint32_t>({f->sndWnd, f->cwnd, uint32_t(INFLIGHT_MAX)});
  if (f->sndWnd <= inflight) {
    Exit(f, X_WINDOW, true);  // the engine probes a closed window
    return;
  }
  if (limit <= inflight) {
    Exit(f, X_BULK, true);
    return;
  }
  size_t want = std::min<size_t>({size_t(f->smallMax) + 1, size_t(limit - inflight), size_t(f->mss)});
  ssize_t r;
  do r = read(f->fd, readBuf_.data(), want);
  while (r < 0 && errno == EINTR);
  if (r == 0) {
    Exit(f, X_HOST_EOF, true);  // nothing consumed: the engine's socket reads the EOF itself
    return;
  }
  if (r < 0) {
    if (errno != EAGAIN && errno != EWOULDBLOCK) Exit(f, X_HOST_ERROR, true);
    return;
  }
  if (uint32_t(r) > f->smallMax) {
    f->unsent.assign(readBuf_.data(), readBuf_.data() + r);
    Exit(f, X_BULK, true);
    return;
  }
  SendSegment(f, readBuf_.data(), size_t(r), true);
}

bool TcpOffload::SendSegment(Flow* f, const uint8_t* payload, size_t len, bool keepBytes) {
  uint32_t hl = f->tsOk ? 32 : 20;
  uint32_t tcpLen = hl + uint32_t(len);
  uint8_t* b = frame_.data();
  memcpy(b, f->guestMac, 6);
  memcpy(b + 6, gwMac_, 6);
  Put16(b + 12, 0x0800);
  uint8_t* ip = b + ETH;
  ip[0] = 0x45;
  ip[1] = 0;
  Put16(ip + 2, IP + tcpLen);
  Put16(ip + 4, ipId_++);
  Put16(ip + 6, 0);
  ip[8] = f->ttl;
  ip[9] = 6;
  Put16(ip + 10, 0);
  Put32(ip + 12, f->remoteIp);
  Put32(ip + 16, f->guestIp);
  Put16(ip + 10, Fold(SumBytes(ip, IP, 0)));
  uint8_t* tcp = ip + IP;
  Put16(tcp, f->remotePort);
  Put16(tcp + 2, f->guestPort);
  Put32(tcp + 4, f->sndNxt);
  Put32(tcp + 8, f->rcvNxt);
  tcp[12] = uint8_t((hl / 4) << 4);
  tcp[13] = ACK | (len ? PSH : 0);
  Put16(tcp + 14, f->rcvWndField);
  Put16(tcp + 16, 0);
  Put16(tcp + 18, 0);
  if (f->tsOk) {
    tcp[20] = 1;
    tcp[21] = 1;
    tcp[22] = 8;
    tcp[23] = 10;
    Put32(tcp + 24, TsNow(f));
    Put32(tcp + 28, f->tsRecent);
  }
  if (len) memcpy(tcp + hl, payload, len);
  Put16(tcp + 16, Fold(SumBytes(tcp, tcpLen, PseudoSum(f->remoteIp, f->guestIp, tcpLen))));
  size_t flen = ETH + IP + tcpLen;
  int err = hooks_.writeFrame(b, flen);
  if (err) {
    if (keepBytes) f->unsent.assign(payload, payload + len);
    Exit(f, X_DEVICE_FULL, true);
    return false;
  }
  f->lastAckSent = f->rcvNxt;
  if (f->ackOwed) {
    f->ackOwed = false;
    uv_timer_stop(f->delack);
  }
  f->segsOut++;
  txSegments++;
  txFrameBytes += flen;
  if (len) {
    if (f->sent.empty()) f->StartRto(f->rtoMs);
    f->sent.insert(f->sent.end(), payload, payload + len);
    f->sndNxt += uint32_t(len);
    txBytes += len;
  }
  return true;
}

void TcpOffload::DelackFired(Flow* f) {
  if (f->exited || !f->ackOwed) return;
  SendSegment(f, nullptr, 0, false);
}

void TcpOffload::RtoFired(Flow* f) {
  if (f->exited) return;
  Exit(f, f->sent.empty() ? X_MAX_AGE : X_RTO, true);
}

}  // namespace tender
