# leankv: `make` builds ./leankv, `make test` sets up and runs every CPU test.
#
# CUDA=1 (default when nvcc is on PATH) adds the GPU side (leankv.cu); CUDA=0 forces a
# CPU-only build.

CC      ?= gcc
CFLAGS  ?= -O3 -march=native -std=gnu11 -Wall -Wextra -Wno-unused-parameter
OMP     ?= -fopenmp
LDLIBS  += -lm
PYTHON  ?= .venv/bin/python
SAN     = -O3 -g -march=native -std=gnu11 $(OMP) -fsanitize=address,undefined -fno-omit-frame-pointer \
          -fno-sanitize-recover=undefined

SRC = leankv.c tokenizer.c
HDR = leankv.h

# the GPU side: nvcc for sm_90 (H100/H200) machine code plus PTX for later GPUs
NVCC    ?= nvcc
CUDA    ?= $(if $(shell command -v $(NVCC) 2>/dev/null),1,0)
CUDA_HOME ?= $(patsubst %/bin/,%,$(dir $(shell command -v $(NVCC) 2>/dev/null)))
NVFLAGS ?= -O3 -std=c++17 -gencode arch=compute_90,code=[sm_90,compute_90] \
           -Xcompiler -Wall
CUDA_LDLIBS = -L$(CUDA_HOME)/lib64 -lcublas -lcudart -lstdc++ -lpthread -ldl -lrt

.PHONY: all test test-setup test-gpu clean fuzz

all: leankv

ifeq ($(CUDA),1)
# one binary: the CPU path plus leankv.cu's engine, chosen at run time by --device
leankv: $(SRC) $(HDR) leankv-cuda.o
	$(CC) $(CFLAGS) $(OMP) -DLKV_CUDA -o $@ $(SRC) leankv-cuda.o $(LDLIBS) $(CUDA_LDLIBS) \
	    -Wl,-rpath,$(CUDA_HOME)/lib64
else
leankv: $(SRC) $(HDR)
	$(CC) $(CFLAGS) $(OMP) -o $@ $(SRC) $(LDLIBS)
endif

# the same program built with AddressSanitizer and UndefinedBehaviorSanitizer (CPU only), for
# the bad-input tests and the sanitizer pass of `make test`
leankv-asan: $(SRC) $(HDR)
	$(CC) $(SAN) -o $@ $(SRC) $(LDLIBS)

# CPU only, no OpenMP, with debug information: what valgrind runs in `make test` (the CUDA
# runtime that ./leankv may link makes memcheck report the driver's own allocations)
leankv-cpu: $(SRC) $(HDR)
	$(CC) -O2 -g -std=gnu11 -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas -o $@ \
	    $(SRC) $(LDLIBS)

# The tests that run the program, again with LEANKV_BIN=./leankv-asan (LEANKV_SAN=1 also builds
# the C unit tests with the sanitizers). The other files test Python or drivers that the first
# pass already runs under the sanitizers where it matters (test_tokenizer's asan_driver).
ASAN_TESTS = tests/test_cli.py tests/test_batch.py tests/test_forward.py tests/test_prefill.py \
             tests/test_units.py tests/test_fuzz.py

# installs what the tests need (Debian packages, .venv, the default model), then runs them:
# the suite, the suite's program tests under ASan + UBSan, and a short run under valgrind
test: test-setup leankv leankv-asan leankv-cpu
	$(PYTHON) -m pytest -q tests
	LEANKV_BIN=$(CURDIR)/leankv-asan LEANKV_SAN=1 $(PYTHON) -m pytest -q -rs $(ASAN_TESTS)
	./tests/valgrind.sh ./leankv-cpu models/smollm2-135m-instruct.bin

test-setup:
	./run.sh --setup

# leankv.cu's engine and its standalone driver (bench/gpu_bench.c includes leankv.c)
leankv-cuda.o: leankv.cu $(HDR)
	$(NVCC) $(NVFLAGS) -DLKV_CUDA -c leankv.cu -o $@

leankv-gpu-bench: bench/gpu_bench.c leankv-cuda.o $(SRC) $(HDR)
	$(CC) $(CFLAGS) $(OMP) -Wno-unused-function -DLKV_CUDA -o $@ bench/gpu_bench.c tokenizer.c \
	    leankv-cuda.o $(LDLIBS) $(CUDA_LDLIBS) -Wl,-rpath,$(CUDA_HOME)/lib64

# GPU tests: they skip, saying why, where there is no GPU (CI)
test-gpu:
	$(PYTHON) -m pytest -q -rs tests/test_gpu.py

# ---- fuzzing (tests/fuzz/) ------------------------------------------------------------------
# `make fuzz` runs every libFuzzer target (ASan + UBSan) for FUZZ_SECONDS each, or for FUZZ_RUNS
# executions when that is set; tests/fuzz/run.sh installs clang with apt-get when missing.
# build/fuzz/replay_<target> is the same target under gcc with a plain main()
# (tests/fuzz/replay.c), which the test suite uses to replay the seeds and regression inputs.
FUZZ_SECONDS ?= 60
FUZZ_RUNS    ?= 0
FUZZ_CC      ?= clang
FUZZ_TARGETS = model legacy tokfile encode jsonl flags
FUZZ_CFLAGS  = -g -O1 -std=gnu11 -Wno-unknown-pragmas -fno-omit-frame-pointer
# the tokenizer targets include tokenizer.c themselves (they check its internals)
fuzz_src = tests/fuzz/fuzz_$(1).c $(if $(filter tokfile encode,$(1)),,tokenizer.c)

fuzz:
	./tests/fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_RUNS)

build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_leankv.h $(SRC) $(HDR)
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer,address,undefined \
	    -fno-sanitize-recover=undefined -o $@ $(call fuzz_src,$*) -lm

build/fuzz/replay_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_leankv.h tests/fuzz/replay.c $(SRC) $(HDR)
	@mkdir -p build/fuzz
	$(CC) $(FUZZ_CFLAGS) -fsanitize=address,undefined -fno-sanitize-recover=all -o $@ \
	    $(call fuzz_src,$*) tests/fuzz/replay.c -lm

clean:
	rm -f leankv leankv-asan leankv-cpu leankv-gpu-bench *.o
	rm -rf build/fuzz/fuzz_* build/fuzz/replay_*
