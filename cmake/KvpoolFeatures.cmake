# Resolves the AUTO feature switches and prints one summary line.
find_path(KVPOOL_XXHASH_INCLUDE_DIR xxhash.h REQUIRED)

set(KVPOOL_HAVE_CUDA OFF)
if(NOT KVPOOL_WITH_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(KVPOOL_HAVE_CUDA ON)
  elseif(KVPOOL_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "KVPOOL_WITH_CUDA=ON but no CUDA compiler was found")
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

# The CUDA copy engine is not implemented yet; ibverbs is used for device discovery only so far
# (the RDMA transport lands on it next).
message(STATUS "kvpool: cuda=${KVPOOL_HAVE_CUDA} (not yet used) ibverbs=${KVPOOL_HAVE_IBVERBS} (device probe) "
               "tests=${KVPOOL_BUILD_TESTS} bench=${KVPOOL_BUILD_BENCH} python=${KVPOOL_BUILD_PYTHON}")
