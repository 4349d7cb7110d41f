// Runs harness_entry (one kernel thread) over a grid in forward, reverse and shuffled order.
// usage: launcher DIR GX GY GZ KINDS   (KINDS: one letter per buffer, i = input, o = output)
// Buffer j is read from DIR/pJ.bin into its own exactly-sized allocation; outputs are filled
// with 0xa5 (0x5a for the reverse order) before each run and written to DIR/pJ.ORDER.out.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

struct uint3 {
  unsigned int x, y, z;
};

extern "C" void harness_entry(void** buffers, uint3 t);

static void* load(const std::string& path, size_t* n) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    std::perror(path.c_str());
    std::exit(3);
  }
  std::fseek(f, 0, SEEK_END);
  *n = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  void* p = std::malloc(*n);
  if (*n && std::fread(p, 1, *n, f) != *n) std::exit(3);
  std::fclose(f);
  return p;
}

int main(int argc, char** argv) {
  if (argc != 6) return 2;
  std::string dir = argv[1];
  unsigned gx = std::atoi(argv[2]), gy = std::atoi(argv[3]), gz = std::atoi(argv[4]);
  std::string kinds = argv[5];
  std::vector<void*> buffers(kinds.size());
  std::vector<size_t> sizes(kinds.size());
  for (size_t j = 0; j < kinds.size(); ++j)
    buffers[j] = load(dir + "/p" + std::to_string(j) + ".bin", &sizes[j]);

  std::vector<uint3> grid;
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) grid.push_back(uint3{x, y, z});

  const char* names[] = {"forward", "reverse", "shuffle"};
  std::mt19937 rng(12345);
  for (int o = 0; o < 3; ++o) {
    std::vector<uint3> order = grid;
    if (o == 1) std::reverse(order.begin(), order.end());
    if (o == 2) std::shuffle(order.begin(), order.end(), rng);
    for (size_t j = 0; j < kinds.size(); ++j)
      if (kinds[j] == 'o') std::memset(buffers[j], o == 1 ? 0x5a : 0xa5, sizes[j]);
    for (const uint3& t : order) harness_entry(buffers.data(), t);
    for (size_t j = 0; j < kinds.size(); ++j) {
      if (kinds[j] != 'o') continue;
      std::string path = dir + "/p" + std::to_string(j) + "." + names[o] + ".out";
      FILE* f = std::fopen(path.c_str(), "wb");
      std::fwrite(buffers[j], 1, sizes[j], f);
      std::fclose(f);
    }
  }
  for (void* p : buffers) std::free(p);
  return 0;
}
