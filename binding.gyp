{
  "targets": [
    {
      "target_name": "tender_native",
      "sources": [
        "native/src/addon.cc",
        "native/src/common.cc",
        "native/src/tap.cc",
        "native/src/sockets.cc",
        "native/src/frame_io.cc",
        "native/src/tcp_offload.cc",
        "native/src/fd_stream.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
      "cflags_cc": ["-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
      "xcode_settings": {
        "CLANG_CXX_LANGUAGE_STANDARD": "c++17",
        "MACOSX_DEPLOYMENT_TARGET": "11.0"
      }
    }
  ]
}
