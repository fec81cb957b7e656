// TcpOffload: the established-flow fast path of the userspace TCP engine, for request/response
// traffic (docs/tcp-offload.md has the design; netstack/tcp/offload.ts is the owner's side).
//
// The TypeScript engine owns every connection. When one is quiet and simple (ESTABLISHED,
// nothing unsent, at most one small segment unacknowledged, no FIN, no out-of-order data, no
// loss recovery) it may hand the connection here ("adopt"); from then on small in-order
// segments from the guest are written straight to the host socket, small reads from the host
// socket go straight to the guest as segments, and ACKs are processed and sent here, without
// entering JavaScript: a 1-byte round trip costs two wake-ups of this process and no call into
// the JS engine. Anything else — a FIN, a RST, a SYN, options other than timestamps, an
// out-of-order or duplicate segment, a segment above `smallMax`, a GSO super-segment, a full
// host socket, a host EOF or error, a closed window, a retransmission timeout, the TAP pushing
// back — makes the flow "exit": its state goes back to the engine (Release), and the segment
// that caused it is handed to the engine as usual, which then handles it with the full RFC
// machinery. The engine may adopt the connection again once it is quiet.
//
// Nothing here drops a segment: a frame that does not match an adopted flow, or that the fast
// path does not handle, is left to the engine.
#pragma once

#include <uv.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

namespace tender {

// Layout of the Uint32Array the engine adopts a flow with (netstack/tcp/offload.ts mirrors it).
enum OffloadParam : uint32_t {
  P_GUEST_IP, P_REMOTE_IP, P_GUEST_PORT, P_REMOTE_PORT,
  P_RCV_NXT, P_SND_UNA, P_SND_NXT, P_SND_WND, P_SND_WL1, P_SND_WL2,
  P_SND_WSCALE, P_RCV_WSCALE, P_RCV_WND_FIELD,
  P_TS_OK, P_TS_RECENT, P_TS_NOW, P_LAST_ACK_SENT,
  P_MSS, P_CWND, P_RTO_MS, P_DELACK_MS, P_ACK_OWED, P_TTL, P_SMALL_MAX, P_MAX_AGE_MS,
  P_COUNT
};

// Layout of the Uint32Array Release fills.
enum OffloadState : uint32_t {
  S_RCV_NXT, S_SND_UNA, S_SND_NXT, S_SND_WND, S_SND_WL1, S_SND_WL2,
  S_TS_RECENT, S_LAST_ACK_SENT, S_ACK_OWED,
  S_BYTES_IN, S_BYTES_OUT, S_SEGS_IN, S_SEGS_OUT,
  S_RTT_MS, S_RX_AGE_MS, S_REASON, S_SENT_LEN, S_UNSENT_LEN,
  S_COUNT
};

// Why a flow left the fast path (counted per reason; S_REASON).
enum OffloadExit : uint32_t {
  X_RELEASED,      // the engine took it back
  X_SEGMENT,       // a segment the fast path does not handle
  X_HOST_EOF,      // the host socket's peer closed (read returned 0)
  X_HOST_ERROR,    // read or send on the host socket failed
  X_HOST_FULL,     // the host socket took less than a whole segment
  X_WINDOW,        // the guest's window is closed
  X_BULK,          // the host sent more than a small segment: bulk data, TSO is the engine's
  X_RTO,           // retransmission timeout
  X_DEVICE_FULL,   // the TAP/socket towards the guest pushed back
  X_MAX_AGE,       // offloaded for maxAgeMs: the engine refreshes what it tracks (MAC ageing)
  X_COUNT
};

extern const char* const kOffloadExitNames[X_COUNT];

class TcpOffload {
 public:
  struct Hooks {
    // Write one Ethernet frame towards the guest. Returns 0 or an errno (EAGAIN: full).
    std::function<int(const uint8_t* frame, size_t len)> writeFrame;
    // A flow left the fast path by itself (not through Release): the engine must Release it.
    std::function<void(uint32_t id)> exited;
  };

  TcpOffload(uv_loop_t* loop, const uint8_t gwMac[6], Hooks hooks);
  ~TcpOffload();

  // A frame from the guest (after any virtio-net header). `csumTrusted`: the device vouched
  // for the checksums (partial or validated). Returns true when the frame was handled here.
  bool OnFrame(const uint8_t* frame, size_t len, bool csumTrusted, bool gso);

  // Adopt a connection: `hostFd` is duplicated (the caller keeps its own descriptor and must
  // stop reading it until Release). `sent` is the unacknowledged payload [sndUna, sndNxt).
  // Returns 0, or an errno (EEXIST: id or tuple taken; EINVAL: bad parameters).
  int Adopt(uint32_t id, int hostFd, const uint32_t* p, const uint8_t guestMac[6],
            const uint8_t* sent, size_t sentLen);

  // Give a flow back (adopted, or exited and not yet released): its state into `out`
  // (S_COUNT words), its unacknowledged then unsent bytes into `data` (S_SENT_LEN and
  // S_UNSENT_LEN say how many; `cap` must be >= 2 * 65536). false: no such flow.
  bool Release(uint32_t id, uint32_t* out, uint8_t* data, size_t cap);

  size_t flows() const { return flows_.size(); }
  // Totals since creation: frames handled in each direction, and exits per reason.
  uint64_t rxSegments = 0, txSegments = 0, rxBytes = 0, txBytes = 0, rxFrameBytes = 0, txFrameBytes = 0;
  uint64_t exits[X_COUNT] = {};

  struct Flow;

 private:
  friend struct Flow;
  void Exit(Flow* f, OffloadExit why, bool notify);
  void HostReadable(Flow* f);
  void DelackFired(Flow* f);
  void RtoFired(Flow* f);
  bool SendSegment(Flow* f, const uint8_t* payload, size_t len, bool keepBytes);
  uint32_t TsNow(const Flow* f) const;
  static uint64_t Key(uint32_t guestIp, uint32_t guestPort, uint32_t remotePort) {
    return (uint64_t(guestIp) << 32) | (uint64_t(guestPort) << 16) | remotePort;
  }

  uv_loop_t* loop_;
  uint8_t gwMac_[6];
  Hooks hooks_;
  std::unordered_map<uint32_t, std::unique_ptr<Flow>> flows_;  // by id
  std::unordered_map<uint64_t, Flow*> byTuple_;                // adopted (not exited) only
  std::vector<uint8_t> frame_;                                 // frames we build
  std::vector<uint8_t> readBuf_;                               // host reads
  uint16_t ipId_ = 1;
};

}  // namespace tender
