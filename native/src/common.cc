#include "common.h"

#include <stdio.h>
#include <string.h>

namespace tender {

Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall, const std::string& path) {
  char name[64];
  // libuv's table (Node's own names) first; it lacks some Linux errnos (EBADFD from a TAP
  // whose interface was deleted), which glibc names.
  uv_err_name_r(-err, name, sizeof name);
  if (strncmp(name, "Unknown", 7) == 0) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
    const char* g = strerrorname_np(err);
    if (g) snprintf(name, sizeof name, "%s", g);
    else
#endif
      snprintf(name, sizeof name, "E%d", err);
  }
  std::string msg = std::string(name) + ": " + strerror(err) + ", " + syscall;
  if (!path.empty()) msg += " '" + path + "'";
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, name));
  e.Set("errno", Napi::Number::New(env, -err));
  e.Set("syscall", Napi::String::New(env, syscall));
  if (!path.empty()) e.Set("path", Napi::String::New(env, path));
  return e;
}

Napi::Value ThrowErrno(Napi::Env env, int err, const char* syscall, const std::string& path) {
  ErrnoError(env, err, syscall, path).ThrowAsJavaScriptException();
  return env.Undefined();
}

Napi::Value ThrowType(Napi::Env env, const std::string& msg) {
  Napi::TypeError::New(env, msg).ThrowAsJavaScriptException();
  return env.Undefined();
}

void CallJs(Napi::Env env, const Napi::FunctionReference& fn, Napi::Object recv,
            Napi::AsyncContext& ctx, std::initializer_list<napi_value> args) {
  if (fn.IsEmpty()) return;
  fn.MakeCallback(recv, args, ctx);
  if (env.IsExceptionPending()) {
    Napi::Error e = env.GetAndClearPendingException();
    napi_fatal_exception(env, e.Value());
  }
}

int Poller::Init(uv_loop_t* loop, int fd, void* owner, Callback cb) {
  auto* h = new uv_poll_t;
  int r = uv_poll_init(loop, h, fd);
  if (r < 0) {
    delete h;
    return r;
  }
  h->data = this;
  handle_ = h;
  owner_ = owner;
  cb_ = cb;
  return 0;
}

void Poller::SetEvents(int events) {
  if (!handle_ || events == events_) return;
  events_ = events;
  if (events)
    uv_poll_start(handle_, events, OnPoll);
  else
    uv_poll_stop(handle_);
}

void Poller::Close() {
  if (!handle_) return;
  uv_poll_stop(handle_);
  handle_->data = nullptr;
  uv_close(reinterpret_cast<uv_handle_t*>(handle_),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); });
  handle_ = nullptr;
  events_ = 0;
}

void Poller::OnPoll(uv_poll_t* h, int status, int events) {
  auto* self = static_cast<Poller*>(h->data);
  if (!self) return;
  self->cb_(self->owner_, status, events);
}

}  // namespace tender
