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
  find_library(KVPOOL_IBVERBS_LIBRARY ibverbs)
  find_path(KVPOOL_IBVERBS_INCLUDE_DIR infiniband/verbs.h)
  if(KVPOOL_IBVERBS_LIBRARY AND KVPOOL_IBVERBS_INCLUDE_DIR)
    set(KVPOOL_HAVE_IBVERBS ON)
  elseif(KVPOOL_WITH_IBVERBS STREQUAL "ON")
    message(FATAL_ERROR "KVPOOL_WITH_IBVERBS=ON but libibverbs was not found (apt-get install libibverbs-dev)")
  endif()
endif()

# The CUDA copy engine and the RDMA transport are not implemented yet; the switches are resolved
# now so that the build interface stays stable when they land.
message(STATUS "kvpool: cuda=${KVPOOL_HAVE_CUDA} (not yet used) ibverbs=${KVPOOL_HAVE_IBVERBS} (not yet used) "
               "tests=${KVPOOL_BUILD_TESTS} bench=${KVPOOL_BUILD_BENCH} python=${KVPOOL_BUILD_PYTHON}")
