# CTest script (cmake -P): moa_core as an outside project sees it.
#   1. cmake --install the build into a fresh prefix;
#   2. check the installed headers stand alone (no private or nlohmann headers);
#   3. configure examples/cpp on its own with find_package(MoaEngine) from that prefix and
#      torch's CMake prefix as the README shows, build it;
#   4. run the built moa_generate on a few cpp_vs_python.py cases (ids == the Python engine's;
#      moa_generate_matches_python runs them all on the in-tree build).
# Variables: SOURCE_DIR, BUILD_DIR, WORK_DIR, PYTHON, TEST_DATA, GENERATOR.
foreach(var SOURCE_DIR BUILD_DIR WORK_DIR PYTHON TEST_DATA)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "installed_package_test.cmake: -D${var}=... is required")
  endif()
endforeach()

function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "installed package test: ${what} failed (${rc})")
  endif()
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")
run("cmake --install" "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}")

foreach(f include/moa/engine.h include/moa/errors.h include/moa/ops.h)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "installed package test: ${prefix}/${f} was not installed")
  endif()
endforeach()
file(GLOB_RECURSE config_files "${prefix}/*/MoaEngineConfig.cmake")
if(NOT config_files)
  message(FATAL_ERROR "installed package test: no MoaEngineConfig.cmake under ${prefix}")
endif()
file(GLOB_RECURSE headers "${prefix}/include/*")
foreach(h IN LISTS headers)
  file(STRINGS "${h}" includes REGEX "#include")
  foreach(line IN LISTS includes)
    if(line MATCHES "nlohmann|\"engine/|\"ops/|\"kernels/")
      message(FATAL_ERROR "installed package test: ${h} includes a header that is not installed: ${line}")
    endif()
  endforeach()
endforeach()

execute_process(
  COMMAND "${PYTHON}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
  OUTPUT_VARIABLE torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "installed package test: ${PYTHON} cannot import torch")
endif()
set(generator_args)
if(GENERATOR)
  set(generator_args -G "${GENERATOR}")
endif()
run("configuring examples/cpp from the installed package"
  "${CMAKE_COMMAND}" -S "${SOURCE_DIR}/examples/cpp" -B "${WORK_DIR}/build" ${generator_args}
  -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=${prefix}\;${torch_prefix}")
run("building examples/cpp" "${CMAKE_COMMAND}" --build "${WORK_DIR}/build")
run("moa_generate from the installed package against the Python engine"
  "${PYTHON}" "${SOURCE_DIR}/csrc/tests/cpp_vs_python.py" check "${TEST_DATA}" "${WORK_DIR}/build/moa_generate" --quick)
