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
  std::string path = library;
  if (path.empty()) path = std::getenv("MODE_EDGE_ORT_LIB") ? std::getenv("MODE_EDGE_ORT_LIB") : "libonnxruntime.so";
  if (!runtime) runtime.reset(new OrtRuntime(path, threads));
  else if (runtime->threads_ != threads)
    throw UserError("this process's onnxruntime thread pool has " + std::to_string(runtime->threads_) +
                    " threads; it cannot be remade with " + std::to_string(threads));
  else if (runtime->library_ != path)
    throw UserError("this process runs onnxruntime from " + runtime->library_ + "; it cannot load " + path + " too");
  return *runtime;
}

OrtRuntime::OrtRuntime(const std::string& path, int threads) : library_(path), threads_(threads) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);  // kept open for the process's life
  if (!handle)
    throw UserError("cannot load onnxruntime from " + path + " (" + dlerror() + "); pass --ort-lib PATH to a "
                    "libonnxruntime.so (the onnxruntime wheel has one in onnxruntime/capi/) or set MODE_EDGE_ORT_LIB");
  using GetApiBase = const OrtApiBase* (*)();
  auto get_base = reinterpret_cast<GetApiBase>(dlsym(handle, "OrtGetApiBase"));
  const OrtApi* api = get_base ? get_base()->GetApi(kOrtApiVersion) : nullptr;
  version_ = get_base ? get_base()->GetVersionString() : "";
  if (!api) {
    dlclose(handle);
    if (!get_base) throw UserError(path + " is not onnxruntime (no OrtGetApiBase); pass --ort-lib PATH to libonnxruntime.so");
    throw UserError("onnxruntime " + version_ + " at " + path + " is older than 1.23; use onnxruntime >= 1.23");
  }
  Ort::InitApi(api);
  Ort::ThreadingOptions pool;
  pool.SetGlobalIntraOpNumThreads(threads);
  pool.SetGlobalInterOpNumThreads(1);
  pool.SetGlobalSpinControl(1);  // one pool for every session: the next run is its own, spinning helps
  env_ = std::make_unique<Ort::Env>(pool, ORT_LOGGING_LEVEL_ERROR, "mode-edge-native");
  cpu_ = std::make_unique<Ort::MemoryInfo>(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault));
  try {
    env_->CreateAndRegisterAllocator(*cpu_, nullptr);  // one arena for all sessions (runtimes/backends.share_one_arena)
  } catch (const Ort::Exception&) {
    // an environment made before ours may hold one already: the sessions then use it, or their own
  }
}

namespace {

Ort::SessionOptions session_options(const OrtRuntime& ort) {
  Ort::SessionOptions options;
  options.AddConfigEntry("session.use_env_allocators", "1");
  // prepacking the 4-bit weights is most of a session's creation; on the pool it runs in parallel
  options.AddConfigEntry("session.prepack.enable_parallel", "1");
  if (ort.global_pool) {
    options.DisablePerSessionThreads();
  } else {  // a pool of its own, which must not spin (it would steal the cores from the next graph's)
    options.AddConfigEntry("session.intra_op.allow_spinning", "0");
    if (ort.threads()) options.SetIntraOpNumThreads(ort.threads());
    options.SetInterOpNumThreads(1);
  }
  return options;
}

std::vector<std::string> names(const Ort::Session& s, bool inputs) {
  Ort::AllocatorWithDefaultOptions allocator;
  std::vector<std::string> out;
  size_t n = inputs ? s.GetInputCount() : s.GetOutputCount();
  for (size_t i = 0; i < n; i++)
    out.push_back(inputs ? s.GetInputNameAllocated(i, allocator).get() : s.GetOutputNameAllocated(i, allocator).get());
  return out;
}

}  // namespace

Graph::Graph(OrtRuntime& ort, const std::string& path, const Component& component, const std::string& fix)
    : input_names_(component.inputs), output_names_(component.outputs) {
  try {
    try {
      session_ = Ort::Session(ort.env(), path.c_str(), session_options(ort));
    } catch (const Ort::Exception& e) {
      // an app made onnxruntime's environment before us, without global pools: every graph gets a pool of its own
      if (!ort.global_pool || std::string(e.what()).find("GlobalThreadPools") == std::string::npos) throw;
      ort.global_pool = false;
      session_ = Ort::Session(ort.env(), path.c_str(), session_options(ort));
    }
  } catch (const Ort::Exception& e) {
    throw UserError(path + " cannot be loaded by onnxruntime (" + e.what() + "); " + fix);
  }
  if (names(session_, true) != input_names_ || names(session_, false) != output_names_)
    throw UserError(path + " does not have the inputs and outputs its manifest lists, in order; " + fix);
  for (auto& n : input_names_) inputs_.push_back(n.c_str());
  for (auto& n : output_names_) outputs_.push_back(n.c_str());
}

void Graph::run(const Ort::Value* inputs, size_t n_in, Ort::Value* outputs, size_t n_out) {
  if (n_in != inputs_.size() || n_out != outputs_.size())
    throw std::logic_error("a graph given " + std::to_string(n_in) + " inputs and " + std::to_string(n_out) +
                           " outputs for its " + std::to_string(inputs_.size()) + " and " + std::to_string(outputs_.size()));
  session_.Run(Ort::RunOptions{nullptr}, inputs_.data(), inputs, n_in, outputs_.data(), outputs, n_out);
}

}  // namespace mode_edge
