// onnxruntime for the native runtime, loaded at run time: dlopen of libonnxruntime.so and OrtGetApiBase, so one
// binary works with the library an app already ships (any release whose C API reaches version kOrtApiVersion).
// The C++ wrappers of onnxruntime_cxx_api.h run on the API table fetched that way (ORT_API_MANUAL_INIT).
#pragma once
#define ORT_API_MANUAL_INIT
#include <onnxruntime/onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <memory>
#include <string>
#include <vector>

#include "bundle.h"

namespace mode_edge {

// The C API version asked of the library: 23 is onnxruntime 1.23, the oldest release whose headers we build with.
constexpr uint32_t kOrtApiVersion = 23;

// The process's onnxruntime: the library, one environment with one global intra-op thread pool that every graph
// runs on (a model here is a chain of small sessions per token; pools per session would steal each other's cores,
// runtimes/backends.py measured it), and one CPU arena registered in it for every session's activations. In an app
// that made onnxruntime's environment first (without global pools), the graphs fall back to a pool each that does not
// spin, as the Python runtime does outside a process of its own.
class OrtRuntime {
 public:
  // The runtime of this process, made at the first call with `library` ("" : $MODE_EDGE_ORT_LIB, else
  // libonnxruntime.so on the loader's path) and `threads` (0: one per physical core). A later call with another
  // thread count or library throws UserError (both are made once). Throws UserError when the library cannot be loaded.
  static OrtRuntime& get(const std::string& library, int threads);
  Ort::Env& env() { return *env_; }
  const Ort::MemoryInfo& cpu() const { return *cpu_; }
  std::string version() const { return version_; }
  int threads() const { return threads_; }
  // False once a session was refused the global pool (an environment made before ours): sessions get pools of their own.
  bool global_pool = true;

 private:
  OrtRuntime(const std::string& library, int threads);
  // (made only after the API table is set: their destructors call into it)
  std::unique_ptr<Ort::Env> env_;
  std::unique_ptr<Ort::MemoryInfo> cpu_;
  std::string library_, version_;
  int threads_ = 0;
};

// One ONNX graph of a bundle or pack, run with caller-owned input and output tensors (outputs preallocated: an
// output bound to an input's memory, as the KV cache's present_* to past_*, is written in place).
class Graph {
 public:
  // Throws UserError when onnxruntime refuses the file (damaged) or the graph's input and output names are not the
  // component's (in order).
  Graph(OrtRuntime& ort, const std::string& path, const Component& component, const std::string& fix);
  // Runs with n_in inputs and n_out outputs, which must be the graph's counts (std::logic_error otherwise).
  void run(const Ort::Value* inputs, size_t n_in, Ort::Value* outputs, size_t n_out);
  const std::vector<std::string>& input_names() const { return input_names_; }
  const std::vector<std::string>& output_names() const { return output_names_; }

 private:
  Ort::Session session_{nullptr};
  std::vector<std::string> input_names_, output_names_;
  std::vector<const char*> inputs_, outputs_;
};

}  // namespace mode_edge
