// tender's native addon: only what JavaScript cannot do (see native/index.ts for the typed API).
#include "common.h"

namespace tender {

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  InitTap(env, exports);
  InitSockets(env, exports);
  InitFrameIO(env, exports);
  InitFdStream(env, exports);
  InitFdWatcher(env, exports);
  return exports;
}

}  // namespace tender

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return tender::Init(env, exports); }

NODE_API_MODULE(tender_native, InitAddon)
