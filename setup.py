"""Build proxyattn and its CUDA extension ``proxyattn._C``.

Environment:
  CUTLASS_PATH      CUTLASS ``include`` folder (or the CUTLASS root); otherwise the
                    headers shipped by the ``nvidia-cutlass`` wheel are used.
  PROXYATTN_ARCHS   semicolon list of targets, default "80;90a" (sm_80 portable
                    kernels, sm_90a Hopper kernels).
  MAX_JOBS          parallel compile jobs (ninja), honoured by torch.
  NVCC_THREADS      threads per nvcc invocation (--threads), default 2.
  CUDA_HOME         the CUDA toolkit root (the folder whose lib64 holds libcudart).
"""
import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _fail(msg):
    sys.stderr.write(f"\nproxyattn build error: {msg}\n\n")
    raise SystemExit(1)


def cutlass_include_dirs():
    env = os.environ.get("CUTLASS_PATH")
    if env:
        env = os.path.abspath(env)
        # Accept either the CUTLASS root or its include folder.
        root = env if os.path.isdir(os.path.join(env, "include", "cute")) else os.path.dirname(env)
        inc = os.path.join(root, "include")
        if not os.path.isdir(os.path.join(inc, "cute")):
            _fail(f"CUTLASS_PATH={env} holds no include/cute; point it at the CUTLASS root or its include folder")
        dirs = [inc]
        util = os.path.join(root, "tools", "util", "include")
        if os.path.isdir(util):
            dirs.append(util)
        return dirs
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        _fail("CUTLASS headers not found: set CUTLASS_PATH or `pip install nvidia-cutlass==4.2.0.0`")
    src = os.path.join(list(spec.submodule_search_locations)[0], "source")
    dirs = [os.path.join(src, "include"), os.path.join(src, "tools", "util", "include")]
    if not os.path.isdir(os.path.join(dirs[0], "cute")):
        _fail(f"the nvidia-cutlass wheel at {src} holds no include/cute")
    return dirs


def gencode_flags():
    archs = [a.strip() for a in os.environ.get("PROXYATTN_ARCHS", "80;90a").split(";") if a.strip()]
    allowed = {"80", "86", "89", "90", "90a"}
    bad = [a for a in archs if a not in allowed]
    if bad or not archs:
        _fail(f"PROXYATTN_ARCHS must name targets from {sorted(allowed)}, got {archs}")
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def _default_cuda_home():
    # nvcc on the PATH may be a wrapper script, from whose folder torch would guess a wrong
    # toolkit root; prefer the conventional /usr/local/cuda when CUDA_HOME is unset.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def extension():
    _default_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        _fail("PyTorch is required to build proxyattn: install a CUDA build of torch first, "
              "then `pip install --no-build-isolation .`")
    if torch.version.cuda is None:
        _fail(f"torch {torch.__version__} is a CPU-only build; proxyattn needs a CUDA build of torch")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        _fail(f"nvcc not found (CUDA_HOME={CUDA_HOME}): install the CUDA toolkit and set CUDA_HOME to its root")
    if not glob.glob(os.path.join(CUDA_HOME, "lib*", "libcudart.so*")):
        _fail(f"CUDA_HOME={CUDA_HOME} has no lib64/libcudart.so: set CUDA_HOME to the toolkit root")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # our own -gencode flags decide

    sources = ["csrc/torch_bindings.cpp"]
    sources += sorted(glob.glob("csrc/ops/*.cpp"))
    for folder in ("ops", "instantiations", "kernels"):  # every .cu below them, subfolders included
        sources += sorted(glob.glob(f"csrc/{folder}/**/*.cu", recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")] + cutlass_include_dirs()
    nvcc_threads = os.environ.get("NVCC_THREADS", "2")
    common = ["-O3", "-DNDEBUG", "-std=c++20"]
    gencode = gencode_flags()
    if "arch=compute_90a,code=sm_90a" in gencode:
        common.append("-DPROXYATTN_HOPPER_KERNELS")  # the Hopper kernel has code to run (bsa_launch.h)
    nvcc = common + gencode + [
        "-lineinfo",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-Xptxas=--warn-on-spills",
        f"--threads={nvcc_threads}",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    return CUDAExtension(
        name="proxyattn._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": common, "nvcc": nvcc},
        py_limited_api=False,
    )


def torch_requirement():
    """The torch this build compiles against, pinned to major.minor.patch: the extension's ABI
    follows torch's C++ API, so the installed distribution requires that torch release (any
    local build label, e.g. +cu130, matches)."""
    import torch

    release = torch.__version__.split("+")[0]
    return f"torch=={release}"


def build_ext_cls():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


if __name__ == "__main__":
    setup(
        packages=find_packages(include=["proxyattn", "proxyattn.*"]),
        ext_modules=[extension()],
        install_requires=[torch_requirement()],
        cmdclass={"build_ext": build_ext_cls()},
    )
