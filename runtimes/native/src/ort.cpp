#include "ort.h"

#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include <cstdlib>
#include <mutex>

#include "errors.h"

namespace mode_edge {

namespace {

// Whether the ELF file at `path` is a shared library for this machine that defines OrtGetApiBase: checked before
// dlopen, which would run the initialisers of any library it is given (onnxruntime-genai's aborts when loaded by
// itself) and reports a library of another architecture as "No such file". "" when it is; else the problem.
std::string not_onnxruntime(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) return std::strerror(errno);
  struct stat st;
  void* map = fstat(fd, &st) == 0 && st.st_size >= (off_t)sizeof(Elf64_Ehdr) && S_ISREG(st.st_mode)
                  ? mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0)
                  : MAP_FAILED;
  close(fd);
  if (map == MAP_FAILED) return "not a readable file";
  const auto* bytes = static_cast<const unsigned char*>(map);
  size_t size = st.st_size;
  std::string problem = "not a shared library (ELF)";
  const auto* eh = static_cast<const Elf64_Ehdr*>(map);
#if defined(__x86_64__)
  const int machine = EM_X86_64;
#elif defined(__aarch64__)
  const int machine = EM_AARCH64;
#else
  const int machine = -1;  // not checked
#endif
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_ident[EI_CLASS] == ELFCLASS64) {
    problem = "a library for another machine";
    if (machine < 0 || eh->e_machine == machine) {
      problem = "not onnxruntime (it does not define OrtGetApiBase)";
      bool in_range = eh->e_shoff + size_t(eh->e_shnum) * sizeof(Elf64_Shdr) <= size;
      const auto* sh = reinterpret_cast<const Elf64_Shdr*>(bytes + (in_range ? eh->e_shoff : 0));
      for (int i = 0; in_range && i < eh->e_shnum; i++) {
        if (sh[i].sh_type != SHT_DYNSYM || sh[i].sh_link >= eh->e_shnum) continue;
        const Elf64_Shdr& strtab = sh[sh[i].sh_link];
        if (sh[i].sh_offset + sh[i].sh_size > size || strtab.sh_offset + strtab.sh_size > size) break;
        const auto* sym = reinterpret_cast<const Elf64_Sym*>(bytes + sh[i].sh_offset);
        for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); k++) {
          if (sym[k].st_name >= strtab.sh_size || sym[k].st_shndx == SHN_UNDEF) continue;
          const char* name = reinterpret_cast<const char*>(bytes + strtab.sh_offset + sym[k].st_name);
          if (std::strncmp(name, "OrtGetApiBase", strtab.sh_size - sym[k].st_name) == 0) problem.clear();
        }
      }
    }
  }
  munmap(map, size);
  return problem;
}

}  // namespace

OrtRuntime& OrtRuntime::get(const std::string& library, int threads) {
  static std::mutex mutex;
  static std::unique_ptr<OrtRuntime> runtime;
  std::lock_guard<std::mutex> lock(mutex);
  std::string path = library;
  const char* env = std::getenv("MODE_EDGE_ORT_LIB");
  if (path.empty()) path = env && *env ? env : "libonnxruntime.so";  // (set but empty: as if unset)
  if (!runtime) runtime.reset(new OrtRuntime(path, threads));
  else if (threads && runtime->threads_ != threads)  // (0: whatever pool the process has)
    throw UserError("this process's onnxruntime thread pool has " +
                    (runtime->threads_ ? std::to_string(runtime->threads_) + " threads" : "onnxruntime's default size") +
                    "; it cannot be remade with " + std::to_string(threads) + " (threads are set at the first open)");
  else if (runtime->library_ != path)
    throw UserError("this process runs onnxruntime from " + runtime->library_ + "; it cannot load " + path + " too");
  return *runtime;
}

OrtRuntime::OrtRuntime(const std::string& path, int threads) : library_(path), threads_(threads) {
  const std::string fix = "; pass --ort-lib PATH to a libonnxruntime.so (the onnxruntime wheel has "
                          "onnxruntime/capi/libonnxruntime.so.VERSION) or set MODE_EDGE_ORT_LIB";
  if (path.find('/') != std::string::npos) {  // a path (not a name for the loader's search): checked first
    std::string problem = not_onnxruntime(path);
    if (!problem.empty()) throw UserError("cannot load onnxruntime from " + path + ": " + problem + fix);
  }
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);  // kept open for the process's life
  if (!handle) throw UserError("cannot load onnxruntime from " + path + " (" + dlerror() + ")" + fix);
  using GetApiBase = const OrtApiBase* (*)();
  auto get_base = reinterpret_cast<GetApiBase>(dlsym(handle, "OrtGetApiBase"));
  if (!get_base) {
    dlclose(handle);
    throw UserError("cannot load onnxruntime from " + path + ": not onnxruntime (no OrtGetApiBase)" + fix);
  }
  version_ = get_base()->GetVersionString();
  int major = 0, minor = 0;  // asked before GetApi, which prints its own complaint for a version it lacks
  std::sscanf(version_.c_str(), "%d.%d", &major, &minor);
  const OrtApi* api = major > 1 || (major == 1 && minor >= int(kOrtApiVersion)) ? get_base()->GetApi(kOrtApiVersion)
                                                                                 : nullptr;
  if (!api) {
    dlclose(handle);
    throw UserError("onnxruntime " + version_ + " at " + path + " is older than 1.23; use onnxruntime >= 1.23");
  }
  Ort::InitApi(api);
  Ort::ThreadingOptions pool;
  pool.SetGlobalIntraOpNumThreads(threads);
  pool.SetGlobalInterOpNumThreads(1);
  pool.SetGlobalSpinControl(1);  // one pool for every session: the next run is its own, spinning helps
  env_ = std::make_unique<Ort::Env>(pool, ORT_LOGGING_LEVEL_FATAL, "mode-edge-native");  // errors: ours, one line
  cpu_ = std::make_unique<Ort::MemoryInfo>(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault));
  try {
    env_->CreateAndRegisterAllocator(*cpu_, nullptr);  // one arena for all sessions (runtimes/backends.share_one_arena)
  } catch (const Ort::Exception&) {
    // an environment made before ours may hold one already: the sessions then use it, or their own
  }
}

namespace {

Ort::SessionOptions session_options(const OrtRuntime& ort, bool optimized_ahead) {
  Ort::SessionOptions options;
  // a graph optimized at export holds its fusions: optimizing again would only cost the time (an expert switch's)
  if (optimized_ahead) options.SetGraphOptimizationLevel(ORT_DISABLE_ALL);
  options.AddConfigEntry("session.use_env_allocators", "1");
  // prepacking the 4-bit weights is most of a session's creation; on the pool it runs in parallel
  options.AddConfigEntry("session.prepack.enable_parallel", "1");
  options.DisableMemPattern();  // a smaller peak, the same speed (runtimes/backends.OnnxGraph says why)
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
      session_ = Ort::Session(ort.env(), path.c_str(), session_options(ort, component.optimized_ahead));
    } catch (const Ort::Exception& e) {
      // an app made onnxruntime's environment before us, without global pools: every graph gets a pool of its own
      if (!ort.global_pool || std::string(e.what()).find("GlobalThreadPools") == std::string::npos) throw;
      ort.global_pool = false;
      session_ = Ort::Session(ort.env(), path.c_str(), session_options(ort, component.optimized_ahead));
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
