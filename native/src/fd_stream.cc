// FdStream: a byte stream over any non-blocking descriptor (AF_VSOCK, socketpair, pipe)
// for the cases Node's net.Socket cannot wrap. Only the syscalls live here; the Duplex
// (backpressure, partial writes, end/half-close, errors) is native/index.ts.
//
//   new FdStream({ fd, readSize, onRead(chunk | null, err | null) })
//     chunk: a fresh Buffer (owned by JS); null with null err: EOF; err: read failed.
//   readStart() / readStop()   watch for readable (Duplex _read / push() === false)
//   write(buf, offset) -> bytes written from buf[offset..] (0 when it would block); throws
//   onWritable(cb)             arms POLLOUT once
//   shutdown()                 SHUT_WR (our FIN); throws
//   close()                    idempotent, safe inside callbacks
#include "common.h"

#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

#include <vector>

namespace tender {

namespace {

class FdStream : public Napi::ObjectWrap<FdStream> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FdStream",
                       {
                           InstanceMethod<&FdStream::ReadStart>("readStart"),
                           InstanceMethod<&FdStream::ReadStop>("readStop"),
                           InstanceMethod<&FdStream::Write>("write"),
                           InstanceMethod<&FdStream::OnWritable>("onWritable"),
                           InstanceMethod<&FdStream::Shutdown>("shutdown"),
                           InstanceMethod<&FdStream::Close>("close"),
                           InstanceAccessor<&FdStream::Closed>("closed"),
                       });
  }

  explicit FdStream(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<FdStream>(info), ctx_(info.Env(), "tender.FdStream") {
    Napi::Env env = info.Env();
    if (!info[0].IsObject()) {
      ThrowType(env, "FdStream: options object expected");
      return;
    }
    Napi::Object o = info[0].As<Napi::Object>();
    Napi::Value fdv = o.Get("fd"), sizev = o.Get("readSize"), onRead = o.Get("onRead");
    if (!fdv.IsNumber() || !onRead.IsFunction()) {
      ThrowType(env, "FdStream: { fd, onRead } expected");
      return;
    }
    fd_ = fdv.As<Napi::Number>().Int32Value();
    size_t size = sizev.IsNumber() ? sizev.As<Napi::Number>().Uint32Value() : 65536;
    if (fd_ < 0 || size < 1 || size > (16u << 20)) {
      Napi::RangeError::New(env, "FdStream: fd >= 0, readSize 1..16 MiB").ThrowAsJavaScriptException();
      return;
    }
    scratch_.resize(size);
    onRead_ = Napi::Persistent(onRead.As<Napi::Function>());
    uv_loop_t* loop;
    napi_get_uv_event_loop(env, &loop);
    int r = poller_.Init(loop, fd_, this, &FdStream::OnPoll);
    if (r < 0) {
      ThrowErrno(env, -r, "uv_poll_init");
      return;
    }
    Ref();
    referenced_ = true;
  }

  ~FdStream() override {
    referenced_ = false;
    CloseNow();
  }

 private:
  static void OnPoll(void* owner, int status, int events) {
    static_cast<FdStream*>(owner)->HandlePoll(status, events);
  }

  void HandlePoll(int status, int events) {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    if (status < 0) {
      reading_ = writableArmed_ = false;
      UpdateEvents();
      CallJs(env, onRead_, Value(), ctx_, {env.Null(), ErrnoError(env, -status, "poll").Value()});
      return;
    }
    if ((events & UV_WRITABLE) && writableArmed_) {
      writableArmed_ = false;
      UpdateEvents();
      Napi::FunctionReference cb = std::move(onWritable_);
      CallJs(env, cb, Value(), ctx_, {});
      if (closed_) return;
    }
    if (!(events & (UV_READABLE | UV_DISCONNECT)) || !reading_) return;
    ssize_t n;
    do n = read(fd_, scratch_.data(), scratch_.size());
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n > 0) {
      CallJs(env, onRead_, Value(), ctx_,
             {static_cast<napi_value>(Napi::Buffer<uint8_t>::Copy(env, scratch_.data(), size_t(n))), env.Null()});
      return;
    }
    // EOF or error: reading is over either way.
    int err = n < 0 ? errno : 0;
    reading_ = false;
    eof_ = true;
    UpdateEvents();
    CallJs(env, onRead_, Value(), ctx_,
           {env.Null(), err ? ErrnoError(env, err, "read").Value() : env.Null()});
  }

  Napi::Value ReadStart(const Napi::CallbackInfo& info) {
    if (!closed_ && !eof_) reading_ = true;
    UpdateEvents();
    return info.Env().Undefined();
  }

  Napi::Value ReadStop(const Napi::CallbackInfo& info) {
    reading_ = false;
    UpdateEvents();
    return info.Env().Undefined();
  }

  Napi::Value Write(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (closed_) return ThrowErrno(env, EBADF, "write");
    if (!info[0].IsTypedArray()) return ThrowType(env, "write(buf: Uint8Array, offset) expected");
    Napi::Uint8Array buf = info[0].As<Napi::Uint8Array>();
    size_t off = info[1].IsNumber() ? info[1].As<Napi::Number>().Uint32Value() : 0;
    if (off > buf.ByteLength()) off = buf.ByteLength();
    size_t len = buf.ByteLength() - off;
    if (len == 0) return Napi::Number::New(env, 0);
    ssize_t n;
    do n = write(fd_, buf.Data() + off, len);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)) n = 0;
    if (n < 0) return ThrowErrno(env, errno, "write");
    return Napi::Number::New(env, double(n));
  }

  Napi::Value OnWritable(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!info[0].IsFunction()) return ThrowType(env, "onWritable(cb) expected");
    if (closed_) return env.Undefined();
    onWritable_ = Napi::Persistent(info[0].As<Napi::Function>());
    writableArmed_ = true;
    UpdateEvents();
    return env.Undefined();
  }

  Napi::Value Shutdown(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (closed_) return ThrowErrno(env, EBADF, "shutdown");
    if (shutdown(fd_, SHUT_WR) < 0) return ThrowErrno(env, errno, "shutdown");
    return env.Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    CloseNow();
    return info.Env().Undefined();
  }

  Napi::Value Closed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), closed_); }

  void UpdateEvents() {
    if (closed_) return;
    poller_.SetEvents((reading_ ? UV_READABLE : 0) | (writableArmed_ ? UV_WRITABLE : 0));
  }

  void CloseNow() {
    if (closed_) return;
    closed_ = true;
    reading_ = writableArmed_ = false;
    poller_.Close();
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
  bool reading_ = false, writableArmed_ = false, closed_ = false, eof_ = false, referenced_ = false;
  std::vector<uint8_t> scratch_;
  Napi::FunctionReference onRead_, onWritable_;
};

// FdWatcher: readiness only, for the moments no data moves yet (a non-blocking connect
// waiting for POLLOUT, a listening socket waiting for connections). Never closes the fd.
//   new FdWatcher(fd, cb(events)); start(events: 1 readable | 2 writable); stop(); close()
class FdWatcher : public Napi::ObjectWrap<FdWatcher> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FdWatcher",
                       {
                           InstanceMethod<&FdWatcher::Start>("start"),
                           InstanceMethod<&FdWatcher::Stop>("stop"),
                           InstanceMethod<&FdWatcher::Close>("close"),
                       });
  }

  explicit FdWatcher(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<FdWatcher>(info), ctx_(info.Env(), "tender.FdWatcher") {
    Napi::Env env = info.Env();
    if (!info[0].IsNumber() || !info[1].IsFunction()) {
      ThrowType(env, "FdWatcher(fd, cb) expected");
      return;
    }
    cb_ = Napi::Persistent(info[1].As<Napi::Function>());
    uv_loop_t* loop;
    napi_get_uv_event_loop(env, &loop);
    int r = poller_.Init(loop, info[0].As<Napi::Number>().Int32Value(), this, &FdWatcher::OnPoll);
    if (r < 0) {
      ThrowErrno(env, -r, "uv_poll_init");
      return;
    }
    Ref();
    referenced_ = true;
  }

  ~FdWatcher() override {
    referenced_ = false;
    CloseNow();
  }

 private:
  static void OnPoll(void* owner, int status, int events) {
    auto* self = static_cast<FdWatcher*>(owner);
    Napi::Env env = self->Env();
    Napi::HandleScope scope(env);
    // An error on the descriptor is reported as both events: the caller's next syscall
    // (accept, SO_ERROR) returns the actual error.
    int ev = status < 0 ? (UV_READABLE | UV_WRITABLE) : events;
    CallJs(env, self->cb_, self->Value(), self->ctx_, {Napi::Number::New(env, ev)});
  }

  Napi::Value Start(const Napi::CallbackInfo& info) {
    int ev = info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : UV_READABLE;
    if (!closed_) poller_.SetEvents(ev & (UV_READABLE | UV_WRITABLE));
    return info.Env().Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    if (!closed_) poller_.SetEvents(0);
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    CloseNow();
    return info.Env().Undefined();
  }

  void CloseNow() {
    if (closed_) return;
    closed_ = true;
    poller_.Close();
    if (referenced_) {
      referenced_ = false;
      Unref();
    }
  }

  Napi::AsyncContext ctx_;
  Poller poller_;
  bool closed_ = false, referenced_ = false;
  Napi::FunctionReference cb_;
};

}  // namespace

void InitFdStream(Napi::Env env, Napi::Object exports) { exports.Set("FdStream", FdStream::Define(env)); }

void InitFdWatcher(Napi::Env env, Napi::Object exports) { exports.Set("FdWatcher", FdWatcher::Define(env)); }

}  // namespace tender
