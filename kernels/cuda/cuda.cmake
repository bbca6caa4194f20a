# The CUDA backend (kernels/cuda/*.cu → static library tessera_cuda), included from the top
# CMakeLists.txt. TESSERA_CUDA=AUTO builds it when nvcc is found, ON requires it, OFF never
# builds it; the CPU build needs no CUDA at all. Never in the sanitizer tree: nvcc does not
# take -fsanitize (AUTO then turns it off; ON is refused). Sets TSR_HAVE_CUDA.
set(TESSERA_CUDA AUTO CACHE STRING "Build the CUDA backend: AUTO (when nvcc is found), ON, OFF")
set_property(CACHE TESSERA_CUDA PROPERTY STRINGS AUTO ON OFF)
string(TOUPPER "${TESSERA_CUDA}" _tsr_cuda_mode)
set(TSR_HAVE_CUDA OFF)
set(_tsr_cuda_why "")
if(_tsr_cuda_mode STREQUAL "OFF")
  set(_tsr_cuda_why "TESSERA_CUDA=OFF")
elseif(NOT _tsr_cuda_mode MATCHES "^(AUTO|ON)$")
  message(FATAL_ERROR "TESSERA_CUDA must be AUTO, ON or OFF (got '${TESSERA_CUDA}')")
elseif(TSR_SANITIZE)
  if(_tsr_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "TESSERA_CUDA=ON with TSR_SANITIZE=ON: nvcc does not take -fsanitize; "
                        "build the CUDA backend in the release tree (ops/build.sh release)")
  endif()
  set(_tsr_cuda_why "sanitizer build (nvcc does not take -fsanitize)")
else()
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  if(CMAKE_CUDA_COMPILER AND NOT EXISTS "${CMAKE_CUDA_COMPILER}")
    unset(CMAKE_CUDA_COMPILER CACHE) # a stale or wrong path counts as "not found"
    unset(CMAKE_CUDA_COMPILER)
  else()
    check_language(CUDA)
  endif()
  if(CMAKE_CUDA_COMPILER)
    set(TSR_HAVE_CUDA ON)
  elseif(_tsr_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "TESSERA_CUDA=ON but no CUDA compiler (nvcc) was found: install the "
                        "CUDA toolkit, put nvcc on PATH or pass -DCMAKE_CUDA_COMPILER=/path/nvcc, "
                        "or configure with -DTESSERA_CUDA=OFF")
  else()
    set(_tsr_cuda_why "no nvcc found")
  endif()
endif()

if(TSR_HAVE_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 80 90)
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  add_library(tessera_cuda STATIC ${CMAKE_SOURCE_DIR}/kernels/cuda/backend.cu
                                  ${CMAKE_SOURCE_DIR}/kernels/cuda/kernels.cu)
  target_include_directories(tessera_cuda PUBLIC ${CMAKE_SOURCE_DIR})
  # --fmad=false: no FMA contraction, so numerics.h computes on the device exactly what the
  # host test checked (see numerics.h). Warnings are errors: the build is warning-free.
  target_compile_options(tessera_cuda PRIVATE
      $<$<COMPILE_LANGUAGE:CUDA>:--fmad=false --Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Wno-unused-parameter>)
  set_target_properties(tessera_cuda PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON
                        POSITION_INDEPENDENT_CODE ON)
  # cuBLAS is dlopen'ed by backend.cu (only GPU runs pay for loading it); its headers come
  # with the toolkit's include folder.
  target_link_libraries(tessera_cuda PUBLIC CUDA::cudart ${CMAKE_DL_LIBS})
  target_compile_definitions(tessera_cuda PUBLIC TSR_HAVE_CUDA)
  message(STATUS "CUDA backend: on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures "
                 "${CMAKE_CUDA_ARCHITECTURES})")
else()
  message(STATUS "CUDA backend: off (${_tsr_cuda_why})")
endif()
