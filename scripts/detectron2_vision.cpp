// Minimal replacement for detectron2/layers/csrc/vision.cpp, written for this project.
//
// The PyPI sdist pb1-detectron2==0.6 ships detectron2 without its csrc/ folder, so
// `detectron2._C` cannot be built as upstream does. DeeperLab needs none of the custom
// detectron2 kernels (NMS and ROIAlign come from torchvision); detectron2 only needs the
// module to exist and to answer the three introspection calls below.
// Only pybind11 (shipped with torch's headers), not torch/extension.h: nothing here uses torch,
// and the full torch headers would make this file take ~1 min of CPU to compile.
#include <pybind11/pybind11.h>

#include <string>

namespace deeperlab_d2_shim {

std::string get_compiler_version() {
#if defined(__GNUC__) && !defined(__clang__)
  return "GCC " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#elif defined(__clang_major__)
  return "clang " + std::to_string(__clang_major__) + "." + std::to_string(__clang_minor__);
#else
  return "unknown";
#endif
}

std::string get_cuda_version() { return "not built"; }

bool has_cuda() { return false; }

}  // namespace deeperlab_d2_shim

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("get_compiler_version", &deeperlab_d2_shim::get_compiler_version,
        "compiler that built this module");
  m.def("get_cuda_version", &deeperlab_d2_shim::get_cuda_version,
        "CUDA version this module was built with");
  m.def("has_cuda", &deeperlab_d2_shim::has_cuda, "whether CUDA kernels were built");
}
