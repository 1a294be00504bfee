// llmos's onnxruntime custom op library: domain "llmos.gguf", one op per GGUF weight type that reads the
// file's own blocks (see gguf_ops.h; the types are the other .cc files here). This file is the library's
// entry point: RegisterCustomOps adds every op the type files registered.
#include <mutex>

#include "gguf_ops.h"

namespace {

std::vector<Ort::CustomOpDomain> g_domains;  // must outlive every session that registered them
std::mutex g_mu;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  try {
    Ort::CustomOpDomain domain{"llmos.gguf"};
    for (OrtCustomOp* op : llmos::registered_ops()) domain.Add(op);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(g_mu);
    g_domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}

// The op names this build holds, comma-separated: import uses a native op only where the library has it.
extern "C" __attribute__((visibility("default"))) const char* llmos_gguf_op_names() {
  static const std::string names = [] {
    std::string s;
    for (OrtCustomOp* op : llmos::registered_ops()) {
      if (!s.empty()) s += ',';
      s += op->GetName(op);
    }
    return s;
  }();
  return names.c_str();
}
