# Resolves the AUTO feature switches and prints one summary line.
find_path(KVPOOL_XXHASH_INCLUDE_DIR xxhash.h REQUIRED)

set(KVPOOL_HAVE_CUDA OFF)
if(NOT KVPOOL_WITH_CUDA STREQUAL "OFF")
  # Only the runtime's headers are needed to build: libcudart.so.13 is loaded at run time, so the
  # extension imports without CUDA. They come with the toolkit, or with pip's CUDA runtime wheel.
  find_path(KVPOOL_CUDA_INCLUDE_DIR cuda_runtime_api.h
    HINTS ENV CUDA_HOME ENV CUDA_PATH
    PATHS /usr/local/cuda /usr/local/cuda-13.0 /opt/cuda
    PATH_SUFFIXES include targets/x86_64-linux/include targets/sbsa-linux/include)
  if(KVPOOL_CUDA_INCLUDE_DIR)
    set(KVPOOL_HAVE_CUDA ON)
  elseif(KVPOOL_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "KVPOOL_WITH_CUDA=ON but cuda_runtime_api.h was not found (install the CUDA toolkit or set KVPOOL_CUDA_INCLUDE_DIR)")
  endif()
endif()

set(KVPOOL_HAVE_IBVERBS OFF)
if(NOT KVPOOL_WITH_IBVERBS STREQUAL "OFF")
  # Only the headers are needed at build time: libibverbs.so.1 is loaded at run time.
  find_path(KVPOOL_IBVERBS_INCLUDE_DIR infiniband/verbs.h)
  if(KVPOOL_IBVERBS_INCLUDE_DIR)
    set(KVPOOL_HAVE_IBVERBS ON)
  elseif(KVPOOL_WITH_IBVERBS STREQUAL "ON")
    message(FATAL_ERROR "KVPOOL_WITH_IBVERBS=ON but infiniband/verbs.h was not found (apt-get install libibverbs-dev)")
  endif()
endif()

message(STATUS "kvpool: cuda=${KVPOOL_HAVE_CUDA} (copy engine) ibverbs=${KVPOOL_HAVE_IBVERBS} (RDMA) "
               "tests=${KVPOOL_BUILD_TESTS} bench=${KVPOOL_BUILD_BENCH} python=${KVPOOL_BUILD_PYTHON}")
