// The perseus custom-op library's entry point: onnxruntime calls RegisterCustomOps when the
// runtime registers the library with a session (runtime/session.py), and then runs these kernels
// in place of the ops' function bodies.

#include "common.h"

extern "C" __attribute__((visibility("default")))
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace perseus;
  g_api = api_base->GetApi(ORT_API_VERSION);
  if (g_api == nullptr) {  // an onnxruntime older than these headers: refuse, so the bodies run
    const OrtApi* oldest = api_base->GetApi(1);
    return oldest->CreateStatus(ORT_FAIL, "perseus kernels need onnxruntime >= 1.21");
  }
  Ort::InitApi(g_api);
  const char* generic = std::getenv("PERSEUS_KERNELS_GENERIC");  // tests: the portable loops of both kernels
  const bool forced = generic && *generic == '1';
#ifdef PERSEUS_X86
  __builtin_cpu_init();
  g_avx512 = !forced && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  const char* no_vnni = std::getenv("PERSEUS_KERNELS_NO_VNNI");  // tests: the AVX-512BW integer paths
  g_vnni = g_avx512 && !(no_vnni && *no_vnni == '1') && __builtin_cpu_supports("avx512vnni");
#endif
  // Without AVX-512 (or off x86) SparseMoE alone, on its portable loops: they keep 4-bit experts
  // in place, where the body's QMoE holds ~3.5x the memory, while LatentAttention's portable
  // loops lost to its body (onnxruntime's kernels) at a long context (studies/perf/README.md,
  // section 14), and Linear's were not measured against onnxruntime's own (AVX2) MatMul. They
  // still serve shapes the AVX-512 loops do not take, and the tests.
  const bool attention = g_avx512 || forced;
  // Two domains, each filled once and kept for the process (sessions refer to them); a domain
  // without an op leaves onnxruntime to inline that op's function body. The session entry
  // "perseus.kernels" = "moe" asks for SparseMoE alone: the runtime's retry when onnxruntime
  // refused LatentAttention's signature (an int8 cache), so the experts stay native.
  static Ort::CustomOpDomain all("perseus"), experts("perseus");
  static std::once_flag added;
  std::call_once(added, [] {
    all.Add(latent_attention_op()), all.Add(sparse_moe_op()), all.Add(linear_op());
    experts.Add(sparse_moe_op());
  });
  int asked = 0;
  char value[16] = {0};
  size_t size = sizeof(value);
  if (g_api->HasSessionConfigEntry(options, "perseus.kernels", &asked) == nullptr && asked &&
      g_api->GetSessionConfigEntry(options, "perseus.kernels", value, &size) == nullptr &&
      std::string(value) == "moe")
    return g_api->AddCustomOpDomain(options, experts);
  return g_api->AddCustomOpDomain(options, attention ? all : experts);
}
