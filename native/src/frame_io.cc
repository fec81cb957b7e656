// FrameIO: batched frame I/O over a non-blocking descriptor that carries one frame per
// read/datagram (a TAP fd or a unix datagram socket).
//
// Receive: on each readiness wake-up, read up to `slots` frames into one pooled buffer
// (slot i at i * slotSize; allocated once, reused for the object's life) with a read() loop
// (TAP: one frame per read; see loneFrames_ for when it stops early) or one recvmmsg
// (sockets), then make ONE call into JS: onFrames(buffer, count, lengths). The buffer is only
// valid during that call.
// lengths[i] == TRUNCATED marks a datagram larger than the slot (MSG_TRUNC).
//
// Send: writeBatch(buf, offsets, lengths, count) writes frames in order (write() per frame
// for TAP, sendmmsg for sockets) and returns how many the device took. A caller that always
// sends from the same arrays registers them once with setSendQueue(buf, offsets, lengths) and
// then calls writeQueued(count): no typed-array lookups per call (they were ~1 µs of a 1-byte
// round trip). It stops at
// EAGAIN/ENOBUFS so the caller can onWritable(cb), which arms POLLOUT once: never retry in a
// loop on ENOBUFS (the CPU-spin bug known from gvisor-tap-vsock/vfkit setups). Any other
// error is thrown only when it hits the first frame; otherwise the count so far is returned
// and the next call meets the error at its first frame. Error policy lives in TypeScript.
//
// learnPeer (unconnected datagram socket, vfkit style): the first datagram that carries a
// source address makes us connect() to that address, then onPeer(path) is called before
// onFrames. Connecting also matters for throughput: Linux applies net.unix.max_dgram_qlen
// (often 10) to a sender only when the receiver is not connected back to it.
#include "common.h"
#include "tcp_offload.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#ifndef __linux__
// macOS has no recvmmsg/sendmmsg: the fallbacks loop over single calls with the same layout.
struct mmsghdr {
  msghdr msg_hdr;
  unsigned msg_len;
};
#endif

namespace tender {

namespace {

constexpr uint32_t TRUNCATED = 0xffffffffu;
// A datagram the TCP offload handled (socket mode): JS skips it.
constexpr uint32_t OFFLOADED = 0xfffffffeu;

class FrameIO : public Napi::ObjectWrap<FrameIO> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FrameIO",
                       {
                           InstanceMethod<&FrameIO::WriteBatch>("writeBatch"),
                           InstanceMethod<&FrameIO::SetSendQueue>("setSendQueue"),
                           InstanceMethod<&FrameIO::WriteQueued>("writeQueued"),
                           InstanceMethod<&FrameIO::OnWritable>("onWritable"),
                           InstanceMethod<&FrameIO::Pause>("pause"),
                           InstanceMethod<&FrameIO::Resume>("resume"),
                           InstanceMethod<&FrameIO::Close>("close"),
                           InstanceMethod<&FrameIO::OffloadEnable>("offloadEnable"),
                           InstanceMethod<&FrameIO::OffloadAdopt>("offloadAdopt"),
                           InstanceMethod<&FrameIO::OffloadRelease>("offloadRelease"),
                           InstanceMethod<&FrameIO::OffloadHold>("offloadHold"),
                           InstanceMethod<&FrameIO::OffloadStats>("offloadStats"),
                           InstanceAccessor<&FrameIO::Closed>("closed"),
                           InstanceAccessor<&FrameIO::Peer>("peer"),
                       });
  }

  // new FrameIO({ fd, socket, slots, slotSize, learnPeer, onFrames, onError, onPeer })
  explicit FrameIO(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<FrameIO>(info), ctx_(info.Env(), "tender.FrameIO") {
    Napi::Env env = info.Env();
    if (!info[0].IsObject()) {
      ThrowType(env, "FrameIO: options object expected");
      return;
    }
    Napi::Object o = info[0].As<Napi::Object>();
    Napi::Value fdv = o.Get("fd"), slotsv = o.Get("slots"), sizev = o.Get("slotSize");
    Napi::Value onFrames = o.Get("onFrames"), onError = o.Get("onError"), onPeer = o.Get("onPeer");
    if (!fdv.IsNumber() || !slotsv.IsNumber() || !sizev.IsNumber() || !onFrames.IsFunction() ||
        !onError.IsFunction()) {
      ThrowType(env, "FrameIO: { fd, slots, slotSize, onFrames, onError } expected");
      return;
    }
    fd_ = fdv.As<Napi::Number>().Int32Value();
    slots_ = slotsv.As<Napi::Number>().Uint32Value();
    slotSize_ = sizev.As<Napi::Number>().Uint32Value();
    if (fd_ < 0 || slots_ < 1 || slots_ > 1024 || slotSize_ < 64 || slotSize_ > 65536 + 64) {
      Napi::RangeError::New(env, "FrameIO: fd >= 0, slots 1..1024, slotSize 64..65600").ThrowAsJavaScriptException();
      return;
    }
    socket_ = o.Get("socket").ToBoolean().Value();
    learnPeer_ = socket_ && o.Get("learnPeer").ToBoolean().Value();
    onFrames_ = Napi::Persistent(onFrames.As<Napi::Function>());
    onError_ = Napi::Persistent(onError.As<Napi::Function>());
    if (onPeer.IsFunction()) onPeer_ = Napi::Persistent(onPeer.As<Napi::Function>());

    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, size_t(slots_) * slotSize_);
    Napi::Uint8Array buf = Napi::Uint8Array::New(env, ab.ByteLength(), ab, 0);
    Napi::Uint32Array lens = Napi::Uint32Array::New(env, slots_);
    data_ = static_cast<uint8_t*>(ab.Data());
    lens_ = lens.Data();
    buffer_ = Napi::Persistent(buf);
    lengths_ = Napi::Persistent(lens);
    info.This().As<Napi::Object>().Set("buffer", buf);
    info.This().As<Napi::Object>().Set("lengths", lens);
    if (socket_) {
      msgs_.resize(slots_);
      iovs_.resize(slots_);
      names_.resize(slots_);
    }

    uv_loop_t* loop;
    napi_get_uv_event_loop(env, &loop);
    int r = poller_.Init(loop, fd_, this, &FrameIO::OnPoll);
    if (r < 0) {
      ThrowErrno(env, -r, "uv_poll_init");
      return;
    }
    Ref();  // keep the JS object (and its callbacks) alive while the handle may fire
    referenced_ = true;
    poller_.SetEvents(UV_READABLE);
  }

  // Collected only after close() (a live handle holds a reference) or at environment teardown,
  // when the reference must not be touched any more.
  ~FrameIO() override {
    referenced_ = false;
    CloseNow();
  }

 private:
  static void OnPoll(void* owner, int status, int events) {
    static_cast<FrameIO*>(owner)->HandlePoll(status, events);
  }

  void HandlePoll(int status, int events) {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    if (status < 0) {
      // libuv turns EPOLLERR into a bare status (e.g. a TAP whose interface was deleted);
      // a read names the real errno (EBADFD) when there is one.
      if (reading_) ReadBatch();
      if (closed_ || !reading_) return;
      return Fail(-status, "poll");
    }
    if ((events & UV_WRITABLE) && writableArmed_) {
      writableArmed_ = false;
      UpdateEvents();
      Napi::FunctionReference cb = std::move(onWritable_);
      CallJs(env, cb, Value(), ctx_, {});
      if (closed_) return;
    }
    if ((events & UV_READABLE) && reading_) ReadBatch();
  }

  void ReadBatch() {
    Napi::Env env = Env();
    uint32_t n = 0;
    int err = 0;
    const char* syscall = socket_ ? "recvmmsg" : "read";
    if (!socket_) {
      // Lone-frame mode (see loneFrames_): one read, unless this wake-up is a probe.
      bool probe = !loneFrames_ || --probeIn_ == 0;
      uint32_t budget = probe ? slots_ : 1;
      bool drained = false;
      uint32_t got = 0, lastLen = 0;  // frames read (some may stay in the offload), last size
      while (got < budget) {
        ssize_t r = read(fd_, data_ + size_t(n) * slotSize_, slotSize_);
        if (r < 0) {
          if (errno == EINTR) continue;
          if (errno != EAGAIN && errno != EWOULDBLOCK) err = errno;
          else drained = true;
          break;
        }
        if (r == 0) {
          err = -1;  // EOF
          break;
        }
        got++;
        lastLen = uint32_t(r);
        if (offload_ && Offered(data_ + size_t(n) * slotSize_, uint32_t(r))) continue;  // slot reused
        lens_[n++] = uint32_t(r);
      }
      if (probe) {
        // One small frame, then nothing: a request/response pattern. More than one: a burst.
        loneFrames_ = drained && got == 1 && lastLen <= LONE_MAX_BYTES;
        probeIn_ = LONE_PROBE_EVERY;
      } else if (got == 1 && lastLen > LONE_MAX_BYTES) {
        loneFrames_ = false;  // a full-sized frame: likely a bulk transfer starting
      }
    } else {
      int r = RecvBatch();
      if (r < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) err = errno;
      } else {
        n = uint32_t(r);
      }
      if (n > 0 && learnPeer_ && !peerKnown_) LearnPeer(n);
      if (closed_) return;
      // Datagrams stay in their slots: one the offload took is marked, and JS skips it.
      if (offload_) {
        uint32_t kept = 0;
        for (uint32_t i = 0; i < n; i++) {
          if (lens_[i] != TRUNCATED && Offered(data_ + size_t(i) * slotSize_, lens_[i])) lens_[i] = OFFLOADED;
          else kept++;
        }
        if (kept == 0) n = 0;
      }
    }
    if (closed_) return;
    // Flows that left the offload while reading: the engine takes them back before it sees
    // the frames that made them leave.
    if (!exitedIds_.empty()) FlushExits();
    if (closed_) return;
    if (n > 0) {
      CallJs(env, onFrames_, Value(), ctx_,
             {buffer_.Value(), Napi::Number::New(env, n), lengths_.Value()});
      if (closed_) return;
    }
    if (err == -1) {
      reading_ = false;
      UpdateEvents();
      Napi::Error e = Napi::Error::New(env, "EOF: end of file");
      e.Set("code", Napi::String::New(env, "EOF"));
      e.Set("errno", Napi::Number::New(env, UV_EOF));
      e.Set("syscall", Napi::String::New(env, syscall));
      CallJs(env, onError_, Value(), ctx_, {e.Value()});
    } else if (err) {
      Fail(err, syscall);
    }
  }

  int RecvBatch() {
#ifdef __linux__
    bool wantNames = learnPeer_ && !peerKnown_;
    for (uint32_t i = 0; i < slots_; i++) {
      iovs_[i].iov_base = data_ + size_t(i) * slotSize_;
      iovs_[i].iov_len = slotSize_;
      msghdr& h = msgs_[i].msg_hdr;
      memset(&h, 0, sizeof h);
      h.msg_iov = &iovs_[i];
      h.msg_iovlen = 1;
      if (wantNames) {
        h.msg_name = &names_[i];
        h.msg_namelen = sizeof(sockaddr_un);
      }
    }
    int r;
    do r = recvmmsg(fd_, msgs_.data(), slots_, MSG_DONTWAIT, nullptr);
    while (r < 0 && errno == EINTR);
    for (int i = 0; i < r; i++)
      lens_[i] = (msgs_[i].msg_hdr.msg_flags & MSG_TRUNC) ? TRUNCATED : msgs_[i].msg_len;
    return r;
#else
    // No recvmmsg (macOS): one recvfrom per datagram, same batching towards JS.
    bool wantNames = learnPeer_ && !peerKnown_;
    int n = 0;
    while (uint32_t(n) < slots_) {
      socklen_t nl = sizeof(sockaddr_un);
      msghdr h;
      memset(&h, 0, sizeof h);
      iovs_[n].iov_base = data_ + size_t(n) * slotSize_;
      iovs_[n].iov_len = slotSize_;
      h.msg_iov = &iovs_[n];
      h.msg_iovlen = 1;
      if (wantNames) {
        h.msg_name = &names_[n];
        h.msg_namelen = nl;
      }
      ssize_t r = recvmsg(fd_, &h, MSG_DONTWAIT);
      if (r < 0) {
        if (errno == EINTR) continue;
        if (n > 0) break;
        return -1;
      }
      msgs_[n].msg_hdr.msg_namelen = h.msg_namelen;
      lens_[n] = (h.msg_flags & MSG_TRUNC) ? TRUNCATED : uint32_t(r);
      n++;
    }
    errno = EAGAIN;
    return n;
#endif
  }

  void LearnPeer(uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
      socklen_t len = msgs_[i].msg_hdr.msg_namelen;
      // An unbound (autobind-less) sender has only the family: it cannot be answered.
      if (len <= offsetof(sockaddr_un, sun_path)) continue;
      const sockaddr_un& sa = names_[i];
      if (connect(fd_, reinterpret_cast<const sockaddr*>(&sa), len) < 0) continue;
      peerKnown_ = true;
      size_t plen = len - offsetof(sockaddr_un, sun_path);
      if (sa.sun_path[0] == '\0') {
        // Linux abstract address: shown with '@' like ss(8) does.
        peer_ = "@" + std::string(sa.sun_path + 1, plen - 1);
      } else {
        peer_ = std::string(sa.sun_path, strnlen(sa.sun_path, plen));
      }
      Napi::Env env = Env();
      CallJs(env, onPeer_, Value(), ctx_, {Napi::String::New(env, peer_)});
      return;
    }
  }

  // writeBatch(buf: Uint8Array, offsets: Uint32Array, lengths: Uint32Array, count) -> written
  Napi::Value WriteBatch(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (closed_) return ThrowErrno(env, EBADF, "write");
    if (!info[0].IsTypedArray() || !info[1].IsTypedArray() || !info[2].IsTypedArray() ||
        !info[3].IsNumber())
      return ThrowType(env, "writeBatch(buf, offsets, lengths, count) expected");
    Napi::Uint8Array buf = info[0].As<Napi::Uint8Array>();
    Napi::Uint32Array offs = info[1].As<Napi::Uint32Array>();
    Napi::Uint32Array lens = info[2].As<Napi::Uint32Array>();
    uint32_t count = info[3].As<Napi::Number>().Uint32Value();
    if (buf.TypedArrayType() != napi_uint8_array || offs.TypedArrayType() != napi_uint32_array ||
        lens.TypedArrayType() != napi_uint32_array)
      return ThrowType(env, "writeBatch: Uint8Array, Uint32Array, Uint32Array expected");
    if (count > offs.ElementLength() || count > lens.ElementLength()) {
      Napi::RangeError::New(env, "writeBatch: count exceeds offsets/lengths").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    return WriteFrames(env, buf.Data(), buf.ByteLength(), offs.Data(), lens.Data(), count, "writeBatch");
  }

  // setSendQueue(buf: Uint8Array, offsets: Uint32Array, lengths: Uint32Array): the arrays
  // writeQueued() sends from. They are kept alive here; their contents may change freely.
  Napi::Value SetSendQueue(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!info[0].IsTypedArray() || !info[1].IsTypedArray() || !info[2].IsTypedArray())
      return ThrowType(env, "setSendQueue(buf, offsets, lengths) expected");
    Napi::Uint8Array buf = info[0].As<Napi::Uint8Array>();
    Napi::Uint32Array offs = info[1].As<Napi::Uint32Array>();
    Napi::Uint32Array lens = info[2].As<Napi::Uint32Array>();
    if (buf.TypedArrayType() != napi_uint8_array || offs.TypedArrayType() != napi_uint32_array ||
        lens.TypedArrayType() != napi_uint32_array)
      return ThrowType(env, "setSendQueue: Uint8Array, Uint32Array, Uint32Array expected");
    qBuf_ = Napi::Persistent(buf);
    qOffs_ = Napi::Persistent(offs);
    qLens_ = Napi::Persistent(lens);
    qBase_ = buf.Data();
    qSize_ = buf.ByteLength();
    qOffsP_ = offs.Data();
    qLensP_ = lens.Data();
    qCap_ = std::min(offs.ElementLength(), lens.ElementLength());
    return env.Undefined();
  }

  // writeQueued(count) -> written: writeBatch over the arrays given to setSendQueue.
  Napi::Value WriteQueued(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (closed_) return ThrowErrno(env, EBADF, "write");
    if (qBase_ == nullptr) return ThrowType(env, "writeQueued: call setSendQueue first");
    if (!info[0].IsNumber()) return ThrowType(env, "writeQueued(count) expected");
    uint32_t count = info[0].As<Napi::Number>().Uint32Value();
    if (count > qCap_) {
      Napi::RangeError::New(env, "writeQueued: count exceeds offsets/lengths").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    return WriteFrames(env, qBase_, qSize_, qOffsP_, qLensP_, count, "writeQueued");
  }

  Napi::Value WriteFrames(Napi::Env env, uint8_t* base, size_t size, const uint32_t* offs,
                          const uint32_t* lens, uint32_t count, const char* what) {
    for (uint32_t i = 0; i < count; i++) {
      if (uint64_t(offs[i]) + lens[i] > size) {
        Napi::RangeError::New(env, std::string(what) + ": frame out of buffer bounds").ThrowAsJavaScriptException();
        return env.Undefined();
      }
    }
    uint32_t done = 0;
    int err = 0;
    if (!socket_) {
      while (done < count) {
        ssize_t r = write(fd_, base + offs[done], lens[done]);
        if (r < 0) {
          if (errno == EINTR) continue;
          err = errno;
          break;
        }
        done++;
      }
    } else {
      while (done < count) {
        uint32_t chunk = count - done;
        if (chunk > 1024) chunk = 1024;  // UIO_MAXIOV
        if (sendMsgs_.size() < chunk) {
          sendMsgs_.resize(chunk);
          sendIovs_.resize(chunk);
        }
        for (uint32_t i = 0; i < chunk; i++) {
          sendIovs_[i].iov_base = base + offs[done + i];
          sendIovs_[i].iov_len = lens[done + i];
          memset(&sendMsgs_[i], 0, sizeof sendMsgs_[i]);
          sendMsgs_[i].msg_hdr.msg_iov = &sendIovs_[i];
          sendMsgs_[i].msg_hdr.msg_iovlen = 1;
        }
        int r = SendBatch(chunk);
        if (r < 0) {
          if (errno == EINTR) continue;
          err = errno;
          break;
        }
        done += uint32_t(r);
        if (uint32_t(r) < chunk) break;  // the next frame would block or fail: stop here
      }
    }
    if (err && err != EAGAIN && err != EWOULDBLOCK && err != ENOBUFS && done == 0)
      return ThrowErrno(env, err, socket_ ? "sendmmsg" : "write");
    return Napi::Number::New(env, done);
  }

  int SendBatch(uint32_t n) {
#ifdef __linux__
    return sendmmsg(fd_, sendMsgs_.data(), n, MSG_DONTWAIT | MSG_NOSIGNAL);
#else
    uint32_t i = 0;
    for (; i < n; i++) {
      if (sendmsg(fd_, &sendMsgs_[i].msg_hdr, MSG_DONTWAIT) < 0) {
        if (i == 0) return -1;
        break;
      }
    }
    return int(i);
#endif
  }

  // ---- TCP offload (tcp_offload.h; netstack/tcp/offload.ts drives it) ----

  // A frame read from the device: true when the offload handled it.
  bool Offered(const uint8_t* p, uint32_t len) {
    if (len < vnet_) return false;
    bool trusted = false, gso = false;
    if (vnet_) {
      trusted = (p[0] & 3) != 0;  // VIRTIO_NET_HDR_F_NEEDS_CSUM | F_DATA_VALID
      gso = (p[1] & 0x7f) != 0;
    }
    inBatch_ = true;
    bool took = offload_->OnFrame(p + vnet_, len - vnet_, trusted, gso);
    inBatch_ = false;
    return took;
  }

  // Also called from the offload's own poll and timer callbacks, outside HandlePoll: it
  // opens its own handle scope.
  void FlushExits() {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    std::vector<uint32_t> ids;
    ids.swap(exitedIds_);
    for (uint32_t id : ids) {
      CallJs(env, onOffloadExit_, Value(), ctx_, {Napi::Number::New(env, id)});
      if (closed_) return;
    }
  }

  // A frame from the offload towards the guest: written at once (with a zeroed virtio-net
  // header: checksums are complete). Not while the JS send queue waits for the device
  // (offloadHold): a segment must not overtake the engine's frames of the same connection.
  int WriteOffloaded(const uint8_t* frame, size_t len) {
    if (closed_) return EBADF;
    if (held_) return EAGAIN;
    uint8_t hdr[12] = {};
    iovec iov[2] = {{hdr, vnet_}, {const_cast<uint8_t*>(frame), len}};
    ssize_t r;
    if (!socket_) {
      do r = writev(fd_, vnet_ ? iov : iov + 1, vnet_ ? 2 : 1);
      while (r < 0 && errno == EINTR);
    } else {
      msghdr m;
      memset(&m, 0, sizeof m);
      m.msg_iov = iov + 1;
      m.msg_iovlen = 1;
#ifdef MSG_NOSIGNAL
      const int flags = MSG_DONTWAIT | MSG_NOSIGNAL;
#else
      const int flags = MSG_DONTWAIT;  // macOS: no MSG_NOSIGNAL (Node ignores SIGPIPE)
#endif
      do r = sendmsg(fd_, &m, flags);
      while (r < 0 && errno == EINTR);
    }
    if (r < 0) return errno ? errno : EIO;
    return 0;
  }

  // offloadEnable(gatewayMac: Uint8Array(6), vnetHdrLen: number, onExit: (id) => void)
  Napi::Value OffloadEnable(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!info[0].IsTypedArray() || !info[1].IsNumber() || !info[2].IsFunction())
      return ThrowType(env, "offloadEnable(gatewayMac, vnetHdrLen, onExit) expected");
    Napi::Uint8Array mac = info[0].As<Napi::Uint8Array>();
    uint32_t vnet = info[1].As<Napi::Number>().Uint32Value();
    if (mac.ElementLength() != 6 || (vnet != 0 && vnet != 10))
      return ThrowType(env, "offloadEnable: a 6-byte MAC and a header of 0 or 10 bytes expected");
    if (offload_) return ThrowType(env, "offloadEnable: already enabled");
    uv_loop_t* loop;
    napi_get_uv_event_loop(env, &loop);
    vnet_ = vnet;
    onOffloadExit_ = Napi::Persistent(info[2].As<Napi::Function>());
    TcpOffload::Hooks hooks;
    hooks.writeFrame = [this](const uint8_t* f, size_t l) { return WriteOffloaded(f, l); };
    hooks.exited = [this](uint32_t id) {
      // From inside a read batch: reported before that batch's frames reach JS.
      exitedIds_.push_back(id);
      if (!inBatch_) FlushExits();
    };
    offload_ = std::make_unique<TcpOffload>(loop, mac.Data(), std::move(hooks));
    return env.Undefined();
  }

  // offloadAdopt(id, hostFd, params: Uint32Array(P_COUNT), guestMac: Uint8Array(6), sent: Uint8Array) -> 0 | errno
  Napi::Value OffloadAdopt(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!offload_) return ThrowType(env, "offloadAdopt: call offloadEnable first");
    if (!info[0].IsNumber() || !info[1].IsNumber() || !info[2].IsTypedArray() || !info[3].IsTypedArray() ||
        !info[4].IsTypedArray())
      return ThrowType(env, "offloadAdopt(id, fd, params, guestMac, sent) expected");
    Napi::Uint32Array p = info[2].As<Napi::Uint32Array>();
    Napi::Uint8Array mac = info[3].As<Napi::Uint8Array>();
    Napi::Uint8Array sent = info[4].As<Napi::Uint8Array>();
    if (p.TypedArrayType() != napi_uint32_array || p.ElementLength() < P_COUNT || mac.ElementLength() != 6 ||
        sent.TypedArrayType() != napi_uint8_array)
      return ThrowType(env, "offloadAdopt: Uint32Array params, 6-byte MAC and Uint8Array expected");
    if (closed_) return Napi::Number::New(env, EBADF);
    int r = offload_->Adopt(info[0].As<Napi::Number>().Uint32Value(), info[1].As<Napi::Number>().Int32Value(),
                            p.Data(), mac.Data(), sent.Data(), sent.ElementLength());
    return Napi::Number::New(env, r);
  }

  // offloadRelease(id, out: Uint32Array(S_COUNT), data: Uint8Array(>= 128 KiB)) -> boolean
  Napi::Value OffloadRelease(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!offload_) return Napi::Boolean::New(env, false);
    if (!info[0].IsNumber() || !info[1].IsTypedArray() || !info[2].IsTypedArray())
      return ThrowType(env, "offloadRelease(id, out, data) expected");
    Napi::Uint32Array out = info[1].As<Napi::Uint32Array>();
    Napi::Uint8Array data = info[2].As<Napi::Uint8Array>();
    if (out.TypedArrayType() != napi_uint32_array || out.ElementLength() < S_COUNT ||
        data.TypedArrayType() != napi_uint8_array || data.ElementLength() < 2 * 65536)
      return ThrowType(env, "offloadRelease: Uint32Array state and a 128 KiB Uint8Array expected");
    bool ok = offload_->Release(info[0].As<Napi::Number>().Uint32Value(), out.Data(), data.Data(), data.ElementLength());
    return Napi::Boolean::New(env, ok);
  }

  // offloadHold(on): while on, the offload writes nothing (the JS send queue waits for POLLOUT).
  Napi::Value OffloadHold(const Napi::CallbackInfo& info) {
    held_ = info[0].ToBoolean().Value();
    return info.Env().Undefined();
  }

  // offloadStats(out: Float64Array(7 + exits)): flows, rx/tx segments, rx/tx payload bytes,
  // rx/tx frame bytes, then exits per reason (kOffloadExitNames order).
  Napi::Value OffloadStats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!info[0].IsTypedArray()) return ThrowType(env, "offloadStats(out) expected");
    Napi::Float64Array out = info[0].As<Napi::Float64Array>();
    if (out.TypedArrayType() != napi_float64_array || out.ElementLength() < 7 + X_COUNT)
      return ThrowType(env, "offloadStats: Float64Array too short");
    double* o = out.Data();
    if (!offload_) {
      for (size_t i = 0; i < 7 + X_COUNT; i++) o[i] = 0;
      return env.Undefined();
    }
    TcpOffload& t = *offload_;
    o[0] = double(t.flows());
    o[1] = double(t.rxSegments);
    o[2] = double(t.txSegments);
    o[3] = double(t.rxBytes);
    o[4] = double(t.txBytes);
    o[5] = double(t.rxFrameBytes);
    o[6] = double(t.txFrameBytes);
    for (size_t i = 0; i < X_COUNT; i++) o[7 + i] = double(t.exits[i]);
    return env.Undefined();
  }

  // onWritable(cb): call cb once when the descriptor is writable again (arms POLLOUT once).
  Napi::Value OnWritable(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!info[0].IsFunction()) return ThrowType(env, "onWritable(cb) expected");
    if (closed_) return env.Undefined();
    onWritable_ = Napi::Persistent(info[0].As<Napi::Function>());
    writableArmed_ = true;
    UpdateEvents();
    return env.Undefined();
  }

  Napi::Value Pause(const Napi::CallbackInfo& info) {
    reading_ = false;
    UpdateEvents();
    return info.Env().Undefined();
  }

  Napi::Value Resume(const Napi::CallbackInfo& info) {
    if (!closed_) reading_ = true;
    UpdateEvents();
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    CloseNow();
    return info.Env().Undefined();
  }

  Napi::Value Closed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), closed_); }

  Napi::Value Peer(const Napi::CallbackInfo& info) {
    if (!peerKnown_) return info.Env().Null();
    return Napi::String::New(info.Env(), peer_);
  }

  void UpdateEvents() {
    if (closed_) return;
    poller_.SetEvents((reading_ ? UV_READABLE : 0) | (writableArmed_ ? UV_WRITABLE : 0));
  }

  void Fail(int err, const char* syscall) {
    reading_ = false;
    writableArmed_ = false;
    UpdateEvents();
    Napi::Env env = Env();
    CallJs(env, onError_, Value(), ctx_, {ErrnoError(env, err, syscall).Value()});
  }

  // Idempotent; safe from inside any callback (every loop above re-checks closed_).
  void CloseNow() {
    if (closed_) return;
    closed_ = true;
    reading_ = false;
    writableArmed_ = false;
    poller_.Close();
    offload_.reset();  // every flow's poll handle, timers and duplicate descriptor
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    if (referenced_) {
      referenced_ = false;
      Unref();
    }
  }

  Napi::AsyncContext ctx_;
  Poller poller_;
  int fd_ = -1;
  uint32_t slots_ = 0, slotSize_ = 0;
  bool socket_ = false, learnPeer_ = false, peerKnown_ = false;
  bool reading_ = true, writableArmed_ = false, closed_ = false, referenced_ = false;
  // TAP only. A TUN read returns one frame and the device has no FIONREAD, so draining to
  // EAGAIN costs one empty read() per wake-up: for a 1-byte round trip, where each wake-up
  // brings exactly one frame, that is a third of the TAP's syscalls. While wake-ups bring
  // lone frames we read one frame and return to the loop: epoll is level-triggered, so a
  // frame left behind wakes us again at once (one epoll_wait instead of one read). Every
  // LONE_PROBE_EVERY-th wake-up drains as before, to notice a burst and go back to
  // batching (bulk transfers bring many frames per wake-up), and so does the wake-up after
  // a frame above LONE_MAX_BYTES (bulk data; an upload must not pay a loop turn per frame).
  static constexpr uint32_t LONE_PROBE_EVERY = 8;
  static constexpr uint32_t LONE_MAX_BYTES = 512;
  bool loneFrames_ = false;
  uint32_t probeIn_ = 0;
  std::string peer_;
  uint8_t* data_ = nullptr;
  uint32_t* lens_ = nullptr;
  Napi::Reference<Napi::Uint8Array> buffer_;
  Napi::Reference<Napi::Uint32Array> lengths_;
  Napi::FunctionReference onFrames_, onError_, onPeer_, onWritable_;
  // setSendQueue's arrays (kept alive by the references) and their data.
  Napi::Reference<Napi::Uint8Array> qBuf_;
  Napi::Reference<Napi::Uint32Array> qOffs_, qLens_;
  uint8_t* qBase_ = nullptr;
  size_t qSize_ = 0, qCap_ = 0;
  const uint32_t* qOffsP_ = nullptr;
  const uint32_t* qLensP_ = nullptr;
  std::vector<mmsghdr> msgs_, sendMsgs_;
  std::vector<iovec> iovs_, sendIovs_;
  std::vector<sockaddr_un> names_;
  // TCP offload (null until offloadEnable).
  std::unique_ptr<TcpOffload> offload_;
  Napi::FunctionReference onOffloadExit_;
  std::vector<uint32_t> exitedIds_;
  uint32_t vnet_ = 0;
  bool inBatch_ = false, held_ = false;
};

}  // namespace

void InitFrameIO(Napi::Env env, Napi::Object exports) {
  exports.Set("FrameIO", FrameIO::Define(env));
  exports.Set("FRAME_TRUNCATED", Napi::Number::New(env, TRUNCATED));
  exports.Set("FRAME_OFFLOADED", Napi::Number::New(env, OFFLOADED));
  Napi::Array names = Napi::Array::New(env, X_COUNT);
  for (uint32_t i = 0; i < X_COUNT; i++) names.Set(i, Napi::String::New(env, kOffloadExitNames[i]));
  exports.Set("OFFLOAD_EXITS", names);
  exports.Set("OFFLOAD_PARAMS", Napi::Number::New(env, P_COUNT));
  exports.Set("OFFLOAD_STATE", Napi::Number::New(env, S_COUNT));
}

}  // namespace tender
