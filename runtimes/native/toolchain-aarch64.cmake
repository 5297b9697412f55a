# Cross-compiling the native runtime for aarch64 Linux with Debian's g++-aarch64-linux-gnu (make native-arm64).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# g++ 12.2 for aarch64 crashes at -O2 and above on some loops (an internal compiler error); without loop vectorization
# it builds (cross_arm64.sh, which sets CMAKE_CXX_FLAGS, repeats it there)
set(CMAKE_CXX_FLAGS_INIT "-fno-tree-loop-vectorize")
set(CMAKE_C_FLAGS_INIT "-fno-tree-loop-vectorize")
