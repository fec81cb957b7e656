// Shared helpers for the addon: errno errors shaped like Node's system errors, and a thin
// wrapper around uv_poll used by every class that waits on a descriptor.
#pragma once

#include <napi.h>
#include <uv.h>

#include <string>

namespace tender {

// An Error whose `code` is the errno name ('EPERM'), `errno` the negative errno (Node's
// convention for system errors: fs and net report ENOENT as -2) and `syscall` the call that
// failed; `path` when a path was involved. TypeScript maps these, C++ never interprets them.
Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall, const std::string& path = "");

// Throws ErrnoError as a pending JS exception and returns undefined (C++ exceptions are off).
Napi::Value ThrowErrno(Napi::Env env, int err, const char* syscall, const std::string& path = "");

Napi::Value ThrowType(Napi::Env env, const std::string& msg);

// Calls a JS callback from a libuv callback: MakeCallback (so process.nextTick and microtasks
// queued by the callback run when it returns, as for any Node I/O callback), and an exception
// thrown by the callback goes to process 'uncaughtException' rather than being lost.
void CallJs(Napi::Env env, const Napi::FunctionReference& fn, Napi::Object recv,
            Napi::AsyncContext& ctx, std::initializer_list<napi_value> args);

// One uv_poll handle on a descriptor. The handle memory outlives the owner when uv_close is
// still pending (the close callback frees it), so an owner may be collected at any time.
class Poller {
 public:
  using Callback = void (*)(void* owner, int status, int events);

  ~Poller() { Close(); }
  // Returns 0 or a negative uv error.
  int Init(uv_loop_t* loop, int fd, void* owner, Callback cb);
  // Sets the watched events (UV_READABLE | UV_WRITABLE); 0 stops the handle.
  void SetEvents(int events);
  int events() const { return events_; }
  bool active() const { return handle_ != nullptr; }
  void Close();

 private:
  static void OnPoll(uv_poll_t* h, int status, int events);
  uv_poll_t* handle_ = nullptr;
  void* owner_ = nullptr;
  Callback cb_ = nullptr;
  int events_ = 0;
};

void InitTap(Napi::Env env, Napi::Object exports);
void InitSockets(Napi::Env env, Napi::Object exports);
void InitFrameIO(Napi::Env env, Napi::Object exports);
void InitFdStream(Napi::Env env, Napi::Object exports);
void InitFdWatcher(Napi::Env env, Napi::Object exports);

}  // namespace tender
