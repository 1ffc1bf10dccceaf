# leankv: `make` builds ./leankv, `make test` sets up and runs every CPU test.
#
# CUDA=1 (default when nvcc is on PATH) adds the GPU side (leankv.cu); CUDA=0 forces a
# CPU-only build.

CC      ?= gcc
CFLAGS  ?= -O3 -march=native -std=gnu11 -Wall -Wextra -Wno-unused-parameter
OMP     ?= -fopenmp
LDLIBS  += -lm
PYTHON  ?= .venv/bin/python
SAN     = -O1 -g -std=gnu11 -fsanitize=address,undefined -fno-omit-frame-pointer \
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

.PHONY: all test test-setup test-gpu clean

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

# the same program built with AddressSanitizer and UndefinedBehaviorSanitizer, for the
# bad-input tests
leankv-asan: $(SRC) $(HDR)
	$(CC) $(SAN) -o $@ $(SRC) $(LDLIBS)

# installs what the tests need (Debian packages, .venv, the default model), then runs them
test: test-setup leankv leankv-asan
	$(PYTHON) -m pytest -q tests

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

clean:
	rm -f leankv leankv-asan leankv-gpu-bench *.o
