// The memory floor of a decode step: read exactly the weights one step multiplies by, and nothing else.
//
//   g++ -O3 -march=native -pthread -o step_reads studies/llama_cpp/step_reads.cc
//   ./step_reads PLAN THREADS STEPS [stream]     (fp32_bound.py writes PLAN and runs this)
//
// PLAN, one line per read, in the graph's order (each weight its own allocation, as an engine
// holds them): `w BYTES` (a weight read whole), `moe FC1 FC2 EXPERTS ROUTED TOP_K` (an expert
// layer [EXPERTS, ...]: per step TOP_K distinct random experts of the first ROUTED plus the
// shared ones after them, each expert's fc1 rows then its fc2 rows). Every step draws new
// experts, so they come from DRAM as in a generation. With THREADS > 1 each thread reads its
// share of every weight and the threads meet once per step (no per-op barrier: a floor, not a
// model of an engine). With `stream`, the experts and the weights of 4 MiB and more (the head) are
// read with non-temporal prefetches, so that they need not push the rest of the step out of the
// last-level cache (whether that pays depends on the CPU and on who shares its cache). Prints the
// median and best step in ms.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

typedef float v16 __attribute__((vector_size(64)));

struct Read { const char* p; size_t n; bool stream; };  // n: read in 256-byte granules (the tail is dropped)

static float sum(const char* p, size_t n, bool stream) {  // four 64-byte loads per iteration, four chains
  v16 a = {}, b = {}, c = {}, d = {}, x;
  for (size_t i = 0; i + 256 <= n; i += 256) {
    if (stream)
      for (int line = 0; line < 4; ++line) __builtin_prefetch(p + i + 1024 + 64 * line, 0, 0);  // 0: non-temporal
    std::memcpy(&x, p + i, 64), a += x;
    std::memcpy(&x, p + i + 64, 64), b += x;
    std::memcpy(&x, p + i + 128, 64), c += x;
    std::memcpy(&x, p + i + 192, 64), d += x;
  }
  const v16 s = (a + b) + (c + d);
  float t = 0;
  for (int i = 0; i < 16; ++i) t += s[i];
  return t;
}

static char* filled(size_t n) {
  char* p = static_cast<char*>(std::aligned_alloc(64, (n + 63) / 64 * 64));
  for (size_t i = 0; i < n; i += 4) { const float one = 1.f; std::memcpy(p + i, &one, std::min<size_t>(4, n - i)); }
  return p;
}

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) return std::fprintf(stderr, "usage: step_reads PLAN THREADS STEPS [stream]\n"), 2;
  const int threads = std::atoi(argv[2]), steps = std::atoi(argv[3]);
  const bool streaming = argc == 5 && std::strcmp(argv[4], "stream") == 0;
  struct Moe { char *fc1, *fc2; size_t f1, f2; int experts, routed, top_k; };
  struct Item { char* w = nullptr; size_t n = 0; int moe = -1; };
  std::vector<Item> plan;
  std::vector<Moe> moes;
  FILE* f = std::fopen(argv[1], "r");
  if (!f) return std::fprintf(stderr, "cannot read %s\n", argv[1]), 2;
  char kind[8];
  while (std::fscanf(f, "%7s", kind) == 1) {
    if (std::strcmp(kind, "w") == 0) {
      size_t n;
      if (std::fscanf(f, "%zu", &n) != 1) return 2;
      plan.push_back({filled(n), n, -1});
    } else {
      Moe m;
      if (std::fscanf(f, "%zu %zu %d %d %d", &m.f1, &m.f2, &m.experts, &m.routed, &m.top_k) != 5) return 2;
      m.fc1 = filled(m.f1), m.fc2 = filled(m.f2);
      plan.push_back({nullptr, 0, static_cast<int>(moes.size())});
      moes.push_back(m);
    }
  }
  std::fclose(f);

  std::mt19937 rng(1);
  std::vector<Read> reads;  // this step's reads, in order
  auto draw = [&] {
    reads.clear();
    for (const Item& it : plan) {
      if (it.moe < 0) { reads.push_back({it.w, it.n, streaming && it.n >= (size_t{4} << 20)}); continue; }
      const Moe& m = moes[it.moe];
      std::vector<int> pick(m.routed);
      for (int e = 0; e < m.routed; ++e) pick[e] = e;
      std::shuffle(pick.begin(), pick.end(), rng);
      pick.resize(m.top_k);
      for (int e = m.routed; e < m.experts; ++e) pick.push_back(e);
      const size_t e1 = m.f1 / m.experts, e2 = m.f2 / m.experts;
      for (int e : pick) reads.push_back({m.fc1 + e * e1, e1, streaming}), reads.push_back({m.fc2 + e * e2, e2, streaming});
    }
  };

  std::atomic<int> go{0}, done{0};
  std::atomic<bool> stop{false};
  volatile float sink = 0;
  auto share = [&](int t) {  // thread t's slice of every read (256-byte granules)
    float s = 0;
    for (const Read& r : reads) {
      const size_t g = r.n / 256, lo = g * t / threads * 256, hi = g * (t + 1) / threads * 256;
      s += sum(r.p + lo, hi - lo, r.stream);
    }
    return s;
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int seen = 0;;) {
        while (go.load() == seen && !stop.load()) {}
        if (stop.load()) return;
        seen = go.load();
        sink = sink + share(t);
        done.fetch_add(1);
      }
    });
  std::vector<double> ms;
  for (int s = 0; s < steps + 10; ++s) {
    draw();
    const auto t0 = std::chrono::steady_clock::now();
    done.store(0);
    go.fetch_add(1);
    sink = sink + share(0);
    while (done.load() != threads - 1) {}
    const double took = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (s >= 10) ms.push_back(took);  // the first steps page the weights in
  }
  stop.store(true);
  for (auto& th : pool) th.join();
  std::sort(ms.begin(), ms.end());
  size_t bytes = 0;
  for (const Read& r : reads) bytes += r.n / 256 * 256;
  std::printf("%zu bytes, median %.4f ms, best %.4f ms\n", bytes, ms[ms.size() / 2], ms[0]);
}
