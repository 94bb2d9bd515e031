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
  bool cpu_avx512 = false;
#ifdef PERSEUS_X86
  __builtin_cpu_init();
  cpu_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  const char* generic = std::getenv("PERSEUS_KERNELS_GENERIC");  // tests: the portable C++ paths
  g_avx512 = !(generic && *generic == '1') && __builtin_cpu_supports("avx512f");
  g_vnni = g_avx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
#endif
  static Ort::CustomOpDomain domain("perseus");
  static std::once_flag added;
  std::call_once(added, [cpu_avx512] {
    domain.Add(latent_attention_op());
    // SparseMoE beats onnxruntime's MoE / QMoE kernels only with its AVX-512 loops: on other CPUs
    // the op's body runs (a registered domain without the op still inlines its function)
    if (cpu_avx512) domain.Add(sparse_moe_op());
  });
  return g_api->AddCustomOpDomain(options, domain);
}
