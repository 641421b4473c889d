"""Thin setup.py: metadata lives in pyproject.toml; this file only declares compiled extensions.

``deeperlab_d2._C`` holds the keypoint Hough-voting ops ``hough_voting`` and ``splat_points``
(``deeperlab_d2/layers/csrc``): the CPU kernels always, the CUDA kernels too when nvcc is found
(``CUDA_HOME``, or ``FORCE_CUDA=1``). ``DEEPERLAB_NO_CUDA=1`` builds the CPU kernels only. It
also holds the fused CPU kernels of the post-processing, ``class_argmax`` and ``keypoint_votes``
(``postprocess_cpu.cpp``; on other devices the post-processing composes the ops above).

GPU architectures: when ``TORCH_CUDA_ARCH_LIST`` is unset, the CUDA kernels are built for
``"8.0;9.0+PTX"`` (DEFAULT_CUDA_ARCH_LIST), whether or not a GPU is visible: machine code (SASS)
for sm_80 (A100, and by binary compatibility the other 8.x GPUs: A10, RTX 30xx, L4, L40, ...) and
sm_90 (H100/H200), plus compute_90 PTX that the driver JIT-compiles on first use for newer
GPUs (Blackwell sm_100/sm_120, ...), so that a new GPU does not fail with "no kernel image is
available". Older GPUs (e.g. T4 = 7.5) need their own entry, e.g.
``TORCH_CUDA_ARCH_LIST="7.5;8.0;9.0+PTX"``. A GPU is not needed to compile.

Build in place (no Detectron2 needed): ``python setup.py build_ext --inplace``.
"""

import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CSRC = os.path.join("deeperlab_d2", "layers", "csrc")
#: Used when TORCH_CUDA_ARCH_LIST is unset (see the module docstring); scripts/install.sh
#: exports the same value.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _build_cuda():
    """Whether to compile the CUDA kernel: never with DEEPERLAB_NO_CUDA=1, always with
    FORCE_CUDA=1, otherwise when torch is a CUDA build and nvcc exists under CUDA_HOME. Whether a
    GPU is visible does not matter, so that a CUDA compile error fails CI on a CPU machine."""
    import torch

    if _env_flag("DEEPERLAB_NO_CUDA"):
        return False
    if _env_flag("FORCE_CUDA"):
        return True
    if CUDA_HOME is None or torch.version.cuda is None:
        return False
    if not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False
    cudart = [os.path.join(CUDA_HOME, d, "libcudart.so") for d in ("lib64", "lib")]
    if not any(os.path.exists(p) for p in cudart):
        # e.g. nvcc is a wrapper script in /usr/local/bin and torch guessed CUDA_HOME=/usr/local
        sys.exit(
            f"deeperlab_d2: nvcc found under CUDA_HOME={CUDA_HOME} but no libcudart.so in its"
            " lib64/ or lib/: set CUDA_HOME to the CUDA toolkit (e.g. /usr/local/cuda), or set"
            " DEEPERLAB_NO_CUDA=1 to build the CPU kernel only"
        )
    return True


def get_extensions():
    sources = [
        os.path.join(CSRC, name)
        for name in ("hough_voting.cpp", "splat_points.cpp", "postprocess_cpu.cpp")
    ]
    define_macros = []
    # -fno-trapping-math lets GCC vectorize the branch-free first pass of the CPU kernel (NaN/inf
    # are still handled exactly: it only drops the assumption that FP exceptions are observed).
    # -ffp-contract=off: no a * b + c is fused into an FMA (GCC does so by default on targets
    # with FMA instructions, e.g. aarch64 or -march=native), so that the CPU kernels round every
    # operation as the CUDA kernels (round-to-nearest intrinsics) and the reference do.
    # -g0 overrides the -g of Python's CFLAGS: debug info for the torch headers is most of the
    # object files and a quarter of their compile time (measured: 43 -> 32 s CPU for
    # hough_voting.cpp); it changes no generated code.
    extra_compile_args = {
        "cxx": ["-O3", "-g0", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    }
    extra_link_args = []
    if sys.platform != "win32":
        # at::parallel_for runs OpenMP code inlined from the ATen headers: without -fopenmp it
        # silently runs on one thread. The libgomp already loaded by torch is the one used.
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")
    if _build_cuda():
        print(f"deeperlab_d2: building the CPU and CUDA kernels (CUDA_HOME={CUDA_HOME})")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        print(f"deeperlab_d2: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        sources += [os.path.join(CSRC, n) for n in ("hough_voting_cuda.cu", "splat_points_cuda.cu")]
        define_macros.append(("WITH_CUDA", None))
        # The .cu files hold only the kernels and their launchers and include no torch header
        # (csrc/voting_cuda.h): nvcc parses each one once per architecture plus once for the
        # host, which with ATen/ATen.h took ~95 s of CPU per file, now ~3.5 s.
        # The kernels use __fmul_rn/__fadd_rn/__fsub_rn (never contracted); --fmad=false keeps
        # any other float expression from being fused into an FMA as well.
        extra_compile_args["nvcc"] = ["-O3", "--fmad=false"]
        extension = CUDAExtension
    else:
        print("deeperlab_d2: building the CPU kernel only (no nvcc, or DEEPERLAB_NO_CUDA=1)")
        extension = CppExtension
    return [
        extension(
            "deeperlab_d2._C",
            sources,
            depends=[
                os.path.join(CSRC, n) for n in ("voting_common.h", "voting_cuda.h", "cpu_alloc.h")
            ],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


setup(ext_modules=get_extensions(), cmdclass={"build_ext": BuildExtension})
