#include "ort.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

#include "errors.h"

namespace mode_edge {

OrtRuntime& OrtRuntime::get(const std::string& library, int threads) {
  static std::mutex mutex;
  static std::unique_ptr<OrtRuntime> runtime;
  std::lock_guard<std::mutex> lock(mutex);
  if (!runtime) runtime.reset(new OrtRuntime(library, threads));
  else if (runtime->threads_ != threads)
    throw UserError("this process's onnxruntime thread pool has " + std::to_string(runtime->threads_) +
                    " threads; it cannot be remade with " + std::to_string(threads));
  return *runtime;
}

OrtRuntime::OrtRuntime(const std::string& library, int threads) : threads_(threads) {
  std::string path = library;
  if (path.empty()) path = std::getenv("MODE_EDGE_ORT_LIB") ? std::getenv("MODE_EDGE_ORT_LIB") : "libonnxruntime.so";
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);  // kept open for the process's life
  if (!handle)
    throw UserError("cannot load onnxruntime from " + path + " (" + dlerror() + "); pass --ort-lib PATH to a "
                    "libonnxruntime.so (the onnxruntime wheel has one in onnxruntime/capi/) or set MODE_EDGE_ORT_LIB");
  using GetApiBase = const OrtApiBase* (*)();
  auto get_base = reinterpret_cast<GetApiBase>(dlsym(handle, "OrtGetApiBase"));
  if (!get_base) throw UserError(path + " is not onnxruntime (no OrtGetApiBase); pass --ort-lib PATH to libonnxruntime.so");
  const OrtApiBase* base = get_base();
  const OrtApi* api = base->GetApi(kOrtApiVersion);
  version_ = base->GetVersionString();
  if (!api) throw UserError("onnxruntime " + version_ + " at " + path + " is older than 1.23; use onnxruntime >= 1.23");
  Ort::InitApi(api);
  Ort::ThreadingOptions pool;
  pool.SetGlobalIntraOpNumThreads(threads);
  pool.SetGlobalInterOpNumThreads(1);
  pool.SetGlobalSpinControl(1);  // one pool for every session: the next run is its own, spinning helps
  env_ = std::make_unique<Ort::Env>(pool, ORT_LOGGING_LEVEL_ERROR, "mode-edge-native");
  cpu_ = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  env_->CreateAndRegisterAllocator(cpu_, nullptr);  // one arena for all sessions (runtimes/backends.share_one_arena)
}

Graph::Graph(OrtRuntime& ort, const std::string& path, const Component& component, const std::string& fix)
    : input_names_(component.inputs), output_names_(component.outputs) {
  Ort::SessionOptions options;
  options.DisablePerSessionThreads();
  options.AddConfigEntry("session.use_env_allocators", "1");
  // prepacking the 4-bit weights is most of a session's creation; on the pool it runs in parallel
  options.AddConfigEntry("session.prepack.enable_parallel", "1");
  try {
    session_ = Ort::Session(ort.env(), path.c_str(), options);
  } catch (const Ort::Exception& e) {
    throw UserError(path + " cannot be loaded by onnxruntime (" + e.what() + "); " + fix);
  }
  if (session_.GetInputCount() != input_names_.size() || session_.GetOutputCount() != output_names_.size())
    throw UserError(path + " does not have the inputs and outputs its manifest lists; " + fix);
  for (auto& n : input_names_) inputs_.push_back(n.c_str());
  for (auto& n : output_names_) outputs_.push_back(n.c_str());
}

void Graph::run(const Ort::Value* inputs, Ort::Value* outputs) {
  session_.Run(Ort::RunOptions{nullptr}, inputs_.data(), inputs, inputs_.size(), outputs_.data(), outputs,
               outputs_.size());
}

}  // namespace mode_edge
